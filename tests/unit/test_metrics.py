from prometheus_client import CollectorRegistry, Histogram

from daemons.metrics import observe_many


def test_observe_many_matches_one_observe_per_value() -> None:
    registry = CollectorRegistry()
    buckets = (0.01, 0.1, 1.0)
    one = Histogram("one", "x", buckets=buckets, registry=registry)
    many = Histogram("many", "x", buckets=buckets, registry=registry)
    values = [0.0, 0.01, 0.010001, 0.05, 0.1, 0.5, 1.0, 3.0, 7.5]
    for v in values:
        one.observe(v)
    observe_many(many, values)
    observe_many(many, [])

    def samples(name: str) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name.removeprefix(name), s.labels, s.value)
            for m in registry.collect()
            if m.name == name
            for s in m.samples
            if not s.name.endswith("_created")
        ]

    assert samples("one") == samples("many")
