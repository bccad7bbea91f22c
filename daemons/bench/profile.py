"""CPU profiles for the benchmark: py-spy in raw (folded stacks) format, a hot-spot
summary (self and inclusive share of samples per function, self share per package),
and a self-contained flame graph (inline SVG, no dependency).

    python -m daemons.bench.profile profiles/bench-zero-consumer-<ts>.folded.txt
"""

from __future__ import annotations

import colorsys
import html
import re
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemons.bench.process import stop

Spies = dict[str, tuple[subprocess.Popen[bytes], Path]]  # name -> (py-spy, its output)

RATE = 100  # py-spy samples per second

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


def start_record(
    py_spy: Path, pid: int, seconds: float, out: Path, rate: int = RATE
) -> subprocess.Popen[bytes]:
    """py-spy record in raw format, aggregated by function (first line number), of the
    thread holding the GIL only (--gil): samples are then interpreter CPU, not threads
    parked in C (gRPC's poller, the metrics server), and samples / (rate x seconds) is
    how busy the GIL was."""
    return subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--gil",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--function",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait(spies: Spies) -> None:
    """Until each recorder has written its profile (its --duration is over)."""
    for spy, _ in spies.values():
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            stop(spy, signal.SIGINT, 10)


def finish(spies: Spies, seconds: float, label: str, stamp: str) -> dict[str, Any]:
    """Wait for the py-spy recorders, print each hot-spot summary, write flame graphs."""
    wait(spies)
    out: dict[str, Any] = {}
    for name, (_, path) in spies.items():
        if not path.exists():
            continue
        stacks = read_folded(path)
        summary = summarize(stacks, max(1, round(seconds)) * RATE)
        title = f"{name}, {label} ({stamp})"
        flame = path.with_name(path.name.replace(".folded.txt", ".flame.html"))
        flame.write_text(flame_html(title, stacks, summary))
        print(format_summary(title, summary, 15), file=sys.stderr)
        out[name] = {**summary.as_dict(10), "folded": str(path), "flame": str(flame)}
    return out


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def package_of(frame: str) -> str:
    """`emit (logging/__init__.py:1)` -> `logging`; `acquire (daemons/limiter.py:40)` ->
    `daemons.limiter`; a frame of a stdlib top-level module -> its module name."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    parts = m["file"].replace("\\", "/").split("/")
    if parts[0] == "daemons" and len(parts) > 1:
        return "daemons." + parts[1].removesuffix(".py")
    if len(parts) == 1:
        return parts[0].removesuffix(".py")
    return parts[0]


@dataclass
class Summary:
    samples: int
    expected: int = 0  # rate x seconds: what a GIL held all the time would give
    self_share: list[tuple[str, float]] = field(default_factory=list)
    total_share: list[tuple[str, float]] = field(default_factory=list)
    package_self: list[tuple[str, float]] = field(default_factory=list)

    def busy(self) -> float:
        return self.samples / self.expected if self.expected else 0.0

    def as_dict(self, top: int = 15) -> dict[str, Any]:
        def rows(xs: list[tuple[str, float]]) -> list[list[Any]]:
            return [[name, round(share * 100, 1)] for name, share in xs[:top]]

        return {
            "samples": self.samples,
            "gil_busy_pct": round(self.busy() * 100, 1),
            "self_pct": rows(self.self_share),
            "inclusive_pct": rows(self.total_share),
            "package_self_pct": rows(self.package_self),
        }


def summarize(stacks: list[tuple[list[str], int]], expected: int = 0) -> Summary:
    total = sum(n for _, n in stacks)
    if not total:
        return Summary(0, expected)
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        pkg[package_of(frames[-1])] += n
        for f in set(frames):
            incl[f] += n
    return Summary(
        total,
        expected,
        [(f, n / total) for f, n in own.most_common()],
        [(f, n / total) for f, n in incl.most_common()],
        [(p, n / total) for p, n in pkg.most_common()],
    )


def format_summary(title: str, s: Summary, top: int = 15) -> str:
    busy = f", GIL busy {s.busy() * 100:.0f} % of the time" if s.expected else ""
    lines = [f"{title}: {s.samples} samples{busy}; shares are of these samples"]
    for head, rows in (
        ("self (function)", s.self_share),
        ("inclusive (function)", s.total_share),
        ("self by package", s.package_self),
    ):
        lines.append(f"  {head}")
        lines += [f"    {share * 100:5.1f}%  {name}" for name, share in rows[:top]]
    return "\n".join(lines)


# --- flame graph ----------------------------------------------------------------------


def _color(name: str) -> str:
    h = 0
    for ch in package_of(name):
        h = (h * 31 + ord(ch)) & 0xFFFFFF
    r, g, b = colorsys.hls_to_rgb((h % 360) / 360, (62 + h % 15) / 100, 0.65)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def flame_svg(stacks: list[tuple[list[str], int]], width: int = 1200, row: int = 16) -> str:
    """An icicle flame graph (root on top); boxes under 0.05 % are left out."""
    tree: dict[str, Any] = {}
    total = 0
    for frames, n in stacks:
        total += n
        node = tree
        for f in frames:
            child = node.setdefault(f, {"n": 0, "kids": {}})
            child["n"] += n
            node = child["kids"]
    if not total:
        return "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'></svg>"
    boxes: list[str] = []
    depth_max = 0

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        nonlocal depth_max
        for name, child in sorted(node.items(), key=lambda kv: -kv[1]["n"]):
            w = child["n"] / total * width
            if child["n"] / total >= 0.0005:
                depth_max = max(depth_max, depth)
                label = html.escape(name)
                share = child["n"] / total * 100
                text = label if w > 40 else ""
                boxes.append(
                    f"<g><title>{label} — {child['n']} samples ({share:.1f}%)</title>"
                    f"<rect x='{x:.2f}' y='{depth * row}' width='{max(w - 0.3, 0.1):.2f}' "
                    f"height='{row - 1}' fill='{_color(name)}'/>"
                    + (
                        f"<text x='{x + 3:.2f}' y='{depth * row + row - 4}' "
                        f"textLength='{max(w - 6, 1):.0f}' lengthAdjust='spacingAndGlyphs'>"
                        f"{html.escape(_short(name, int(w / 7)))}</text>"
                        if text
                        else ""
                    )
                    + "</g>"
                )
                walk(child["kids"], x, depth + 1)
            x += w

    walk(tree, 0.0, 0)
    height = (depth_max + 1) * row
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"font-family='monospace' font-size='11'>{''.join(boxes)}</svg>"
    )


def _short(name: str, chars: int) -> str:
    return name if len(name) <= chars else name[: max(chars - 1, 0)] + "…"


def flame_html(title: str, stacks: list[tuple[list[str], int]], summary: Summary) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:16px} pre{font-size:12px}</style>"
        f"</head><body><h2>{html.escape(title)}</h2>"
        "<p>py-spy samples of the thread holding the GIL, root frame on top; hover a box "
        "for its share.</p>"
        f"{flame_svg(stacks)}<pre>{html.escape(format_summary(title, summary, 25))}</pre>"
        "</body></html>"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m daemons.bench.profile FILE.folded.txt ...", file=sys.stderr)
        return 2
    for name in args:
        print(format_summary(name, summarize(read_folded(Path(name)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
