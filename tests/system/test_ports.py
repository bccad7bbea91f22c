"""Private bundles take ports below the ephemeral range, where an outgoing connection
cannot be given the same number as its source port before the daemon binds it."""

import socket

from daemons.bench import ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = ports._ephemeral_low()
    got = [ports.free_port() for _ in range(50)]
    assert len(set(got)) == len(got)
    assert all(1024 <= p < low for p in got), got
    with socket.socket() as s:
        s.bind(("127.0.0.1", got[-1]))  # still free


def test_a_taken_port_is_never_handed_out() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert not ports._bindable(port)
