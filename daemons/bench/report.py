"""The bench's report: the progress line, the table, the per-minute rows of a soak and
the HTML charts (inline SVG, no dependency)."""

from __future__ import annotations

import html
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_RATE = "1000000"  # PRODUCER_RATE's upper bound: what "flat out" offers


class Progress:
    """One status line on stderr: rewritten in place on a terminal, else every 5 s."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif now - self.last >= 5:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self.last = now

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


MINUTE_HEAD = (
    f"{'minute':>6} {'tasks/s':>9} {'p99>work ms':>11} {'pg s/1k':>8} {'db MB':>8} {'parts':>5}"
    f" {'prod MB':>7} {'cons MB':>7}"
)


def minute_line(row: dict[str, Any]) -> str:
    return (
        f"{row['minute']:6d} {row['tasks_per_s']:9,.0f} {row['p99_beyond_work_ms']:11.1f}"
        f" {row['pg_cpu_s_per_1k']:8.4f} {row['db_size_mb']:8.0f} {row['partitions']:5d}"
        f" {row.get('producer_rss_mb', 0):7.1f} {row.get('consumer_rss_mb', 0):7.1f}"
    )


def print_minute(row: dict[str, Any], progress: Progress) -> None:
    """A soak's row as its minute ends, under the progress line."""
    progress.done()
    if row["minute"] == 1:
        print(MINUTE_HEAD, file=sys.stderr)
    print(minute_line(row), file=sys.stderr, flush=True)


def cell(key: str, sub: str, spec: str) -> Callable[[dict[str, Any]], str]:
    """A table cell: the figure workload[key][sub], formatted with `spec`."""
    return lambda w: format(w[key][sub], spec)


def fmt_table(result: dict[str, Any]) -> str:
    wls = result["workloads"]
    names = list(wls)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> None:
        rows.append((label, [get(wls[n]) for n in names]))

    row("tasks/s end to end (done)", lambda w: f"{w['tasks_per_s']:,.0f}")
    row(
        "  min / max over 1 s",
        lambda w: f"{w['min_1s_tasks_per_s']:,} / {w['max_1s_tasks_per_s']:,}",
    )
    row(
        "tasks/s offered (PRODUCER_RATE)",
        lambda w: "max" if w["rate_offered"] == MAX_RATE else f"{int(w['rate_offered']):,}",
    )
    for p in ("p50", "p95", "p99"):
        row(f"latency {p} ms (create->done)", cell("latency_ms", p, ",.1f"))
    row("  p99 ms beyond the task's work", lambda w: f"{w['latency_ms']['p99_beyond_work']:,.1f}")
    for n in ("producer", "consumer", "postgres"):
        row(f"CPU s / 1k tasks, {n}", cell("cpu_s_per_1k", n, ".4f"))
    for n in ("producer", "consumer", "postgres", "other"):
        row(f"CPU cores busy, {n}", cell("cpu_cores", n, ".2f"))
    for n in ("producer", "consumer"):
        row(f"peak RSS MB, {n}", cell("peak_rss_mb", n, ".0f"))
    for n in ("producer", "consumer"):
        row(f"RSS growth over window %, {n}", cell("rss_growth_pct", n, "+.1f"))
    row("pg commits / 1k tasks (approx)", lambda w: f"{w['postgres']['commits_per_1k']:.1f}")
    row("pg WAL bytes / task (approx)", lambda w: f"{w['postgres']['wal_bytes_per_task']:.0f}")
    if any("ceiling" in wls[n] for n in names):
        row(
            "ceiling tasks/s (plain table, 1k)",
            lambda w: f"{w['ceiling']['tasks_per_s']:,.0f}" if "ceiling" in w else "-",
        )
        row(
            "  before / after our window",
            lambda w: (
                f"{w['ceiling']['before_tasks_per_s']:,.0f} / "
                f"{w['ceiling']['after_tasks_per_s']:,.0f}"
                if "ceiling" in w
                else "-"
            ),
        )
        row(
            "  ceiling CPU s/1k py / pg",
            lambda w: (
                f"{w['ceiling']['cpu_s_per_1k']['python']:.4f} / "
                f"{w['ceiling']['cpu_s_per_1k']['postgres']:.4f}"
                if "ceiling" in w
                else "-"
            ),
        )
        row(
            "ours / ceiling",
            lambda w: f"{w['ratio_to_ceiling'] * 100:.1f} %" if "ceiling" in w else "-",
        )
    row("exit codes producer/consumer", lambda w: "{producer}/{consumer}".format(**w["exit_codes"]))
    row(
        "lost / double-counted",
        lambda w: "{lost_processing}/{double_counted}".format(**w["check"]),
    )
    lines: list[str] = []
    if names:
        width = max(len(r[0]) for r in rows)
        colw = max(14, *(len(v) for _, vs in rows for v in vs))
        head = f"{'workload'.ljust(width)}  " + "  ".join(n.rjust(colw) for n in names)
        lines += [head, "-" * len(head)]
        lines += [
            f"{lab.ljust(width)}  " + "  ".join(v.rjust(colw) for v in vs) for lab, vs in rows
        ]
    for name in names:
        lines += statement_lines(name, wls[name])
        lines += minute_lines(name, wls[name])
    if result.get("rpc"):
        lines += rpc_lines(result["rpc"])
    return "\n".join(lines)


def statement_lines(name: str, w: dict[str, Any]) -> list[str]:
    stmts = w["postgres"].get("statements")
    if not stmts:
        return []
    return ["", f"pg_stat_statements, workload {name} (exec ms per s, calls, rows/call):"] + [
        f"  {st['exec_ms_per_s']:7.1f} {st['calls']:8,} {st['rows_per_call']:8.1f}  {st['query']}"
        for st in stmts
    ]


def minute_lines(name: str, w: dict[str, Any]) -> list[str]:
    """A soak's rows again, then the first minutes against the last."""
    minutes = w.get("minutes")
    if not minutes:
        return []
    lines = ["", f"per minute, workload {name}:", MINUTE_HEAD]
    lines += [minute_line(m) for m in minutes]
    edge = w["minutes_first_vs_last"]
    lines.append(f"first {edge['minutes_each']} min vs last {edge['minutes_each']} min:")
    for key, v in edge.items():
        if key != "minutes_each":
            ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
            lines.append(f"  {key:20} {v['first']:10.4g} -> {v['last']:10.4g}  {ratio}")
    return lines


def rpc_lines(rpc: dict[str, Any]) -> list[str]:
    lat, cores = rpc["latency_ms"], rpc["cpu_cores"]
    return [
        "",
        f"single-task Submit RPC ({rpc['concurrency']} concurrent calls, generator "
        f"{rpc['generator']} x{rpc['generator_procs']}, {rpc['seconds']:.0f} s):",
        f"  {rpc['ok_per_s']:,.0f} OK calls/s ({rpc['calls_per_s']:,.0f} calls/s), "
        f"latency p50 {lat['p50']:.2f} / p95 {lat['p95']:.2f} / p99 {lat['p99']:.2f} ms",
        f"  consumer CPU {rpc['cpu_s_per_1k_calls']['consumer']:.4f} s / 1k calls, "
        f"{cores['consumer']:.2f} cores busy; postgres {cores['postgres']:.2f}, load generators "
        f"{cores['generators']:.2f}, other {cores['other']:.2f} cores",
        f"  codes {rpc['codes']}; rows registered in the database "
        f"{rpc['db_registered_per_s']:,.0f}/s",
    ]


def nice_ceiling(y: float) -> float:
    """The next 1, 2, 2.5 or 5 times a power of ten at or above y (axis top)."""
    if y <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(y))
    return float(next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= y))


def line_chart(
    title: str,
    unit: str,
    lines: list[tuple[str, str, list[tuple[float, float]]]],
    shade_to: float,
    width: int = 900,
    height: int = 260,
) -> str:
    """An SVG line chart: x = seconds since the producer started; the warm-up is shaded."""
    pad_l, pad_r, pad_t, pad_b = 70, 20, 30, 35
    xs = [x for _, _, pts in lines for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, _, pts in lines for _, y in pts] or [0.0, 1.0]
    x_max = max(max(xs), 1.0)
    y_max = nice_ceiling(max(ys) * 1.05)
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x: float) -> float:
        return pad_l + x / x_max * pw

    def sy(y: float) -> float:
        return pad_t + ph - y / y_max * ph

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        "font-family='sans-serif' font-size='11'>",
        f"<text x='{pad_l}' y='18' font-size='13' font-weight='bold'>{html.escape(title)}</text>",
        f"<rect x='{pad_l}' y='{pad_t}' width='{max(sx(shade_to) - pad_l, 0):.1f}' "
        f"height='{ph}' fill='#eee'/>",
        f"<text x='{pad_l + 4}' y='{pad_t + 12}' fill='#888'>warm-up</text>",
    ]
    for i in range(6):
        y = y_max * i / 5
        parts.append(
            f"<line x1='{pad_l}' x2='{width - pad_r}' y1='{sy(y):.1f}' y2='{sy(y):.1f}' "
            "stroke='#ddd'/>"
            f"<text x='{pad_l - 6}' y='{sy(y) + 4:.1f}' text-anchor='end'>{y:,.0f}</text>"
        )
    step = max(1, round(x_max / 10))
    for x in range(0, int(x_max) + 1, step):
        parts.append(
            f"<text x='{sx(x):.1f}' y='{height - pad_b + 15}' text-anchor='middle'>{x}</text>"
        )
    parts.append(
        f"<text x='{pad_l + pw / 2}' y='{height - 4}' text-anchor='middle'>seconds</text>"
        f"<text x='14' y='{pad_t + ph / 2}' transform='rotate(-90 14 {pad_t + ph / 2})' "
        f"text-anchor='middle'>{html.escape(unit)}</text>"
    )
    for i, (label, color, pts) in enumerate(lines):
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(
                f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{path}'/>"
            )
        parts.append(
            f"<text x='{width - pad_r - 60 * (len(lines) - i)}' y='18' fill='{color}' "
            "font-weight='bold'>"
            f"{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def workload_html(name: str, w: dict[str, Any]) -> str:
    pts = w["series"]
    # The last second is partial (the window ends inside it): left out of the chart.
    pts = pts[:-1] if len(pts) > 1 else pts
    tput = [(p["t"] + 0.5, float(p["tasks"])) for p in pts]
    p50 = [(p["t"] + 0.5, p["p50_ms"]) for p in pts]
    p99 = [(p["t"] + 0.5, p["p99_ms"]) for p in pts]
    shade = w["window_from_s"]
    lat = w["latency_ms"]
    summary = (
        f"{w['tasks_per_s']:,.0f} tasks/s over {w['window_s']} s; latency p50 "
        f"{lat['p50']:.1f} / p95 {lat['p95']:.1f} / p99 {lat['p99']:.1f} ms"
    )
    if "ratio_to_ceiling" in w:
        summary += (
            f"; ceiling {w['ceiling']['tasks_per_s']:,.0f} tasks/s "
            f"(ours {w['ratio_to_ceiling'] * 100:.1f} %)"
        )
    per_minute = ""
    if w.get("minutes"):
        ms = w["minutes"]

        def mline(key: str) -> list[tuple[float, float]]:
            return [(float(m["minute"]), float(m[key])) for m in ms]

        per_minute = "".join(
            "<br>" + line_chart(title, unit, [(label, color, mline(key))], 0)
            for title, unit, label, color, key in (
                ("tasks/s per minute", "tasks/s", "done/s", "#1f77b4", "tasks_per_s"),
                ("p99 beyond the work, per minute", "ms", "p99", "#d62728", "p99_beyond_work_ms"),
                ("PostgreSQL CPU per 1,000 tasks", "s", "pg", "#9467bd", "pg_cpu_s_per_1k"),
                ("database size on disk", "MB", "size", "#8c564b", "db_size_mb"),
            )
        )
        per_minute += "<br>" + line_chart(
            "RSS of the first producer and consumer",
            "MB",
            [
                (r, color, mline(f"{r}_rss_mb"))
                for r, color in (("producer", "#ff7f0e"), ("consumer", "#17becf"))
                if f"{r}_rss_mb" in ms[0]
            ],
            0,
        )
    return (
        f"<h2>workload {html.escape(name)} (CONSUMER_WORK_SCALE={w['work_scale']:g})</h2>"
        f"<p>{html.escape(summary)}</p>"
        + line_chart("tasks done per second", "tasks/s", [("done/s", "#1f77b4", tput)], shade)
        + "<br>"
        + line_chart(
            "latency creation -> done, per second of completion",
            "ms",
            [("p50", "#2ca02c", p50), ("p99", "#d62728", p99)],
            shade,
        )
        + per_minute
    )


def write_charts(result: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    head = (
        "<!doctype html><html><head><meta charset='utf-8'><title>{t}</title>"
        "<style>body{{font-family:sans-serif;margin:16px}} pre{{font-size:12px}}</style>"
        "</head><body><h1>{t}</h1>"
    )
    table = f"<pre>{html.escape(fmt_table(result))}</pre>"
    paths = []
    for name, w in result["workloads"].items():
        path = out / f"bench-{name}-{stamp}.html"
        path.write_text(
            head.format(t=f"bench {name} {stamp}") + workload_html(name, w) + "</body></html>"
        )
        paths.append(path)
    latest = out / "bench-latest.html"
    latest.write_text(
        head.format(t=f"bench {stamp}")
        + table
        + "".join(workload_html(n, w) for n, w in result["workloads"].items())
        + "</body></html>"
    )
    return [*paths, latest]
