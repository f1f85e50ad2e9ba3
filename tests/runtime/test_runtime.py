"""orchestrator.runtime without Ray: the one stop-signal handler (interrupt once, then a bounded
cleanup; the first signal handed to a library's own handler while one runs) and the one check of
a request against the nodes of a Ray."""

import signal
import threading

import pytest

from orchestrator.runtime import connect, signals


def _handlers():
    return {s: signal.getsignal(s) for s in signals.STOPS}


def test_a_block_inside_another_shares_its_signal_and_changes_no_handler():
    """The sweep's block inside ``soup sweep``'s: the command's ``except`` still reads the signal."""
    before = _handlers()
    with signals.stop_signals():
        ours = _handlers()
        with pytest.raises(KeyboardInterrupt), signals.stop_signals():
            assert _handlers() == ours
            signal.raise_signal(signal.SIGTERM)
        assert _handlers() == ours and signals.stop_signal() == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)  # later signals only wait
        assert signals.stop_signal() == signal.SIGTERM
    assert _handlers() == before and signals.received() is None


@pytest.mark.parametrize("sig", signals.STOPS, ids=["SIGINT", "SIGTERM"])
def test_the_first_signal_goes_to_the_library_and_later_ones_wait(sig):
    """While Tune runs: the first SIGINT or SIGTERM reaches Tune's handler as a SIGINT, once,
    and interrupts nothing; left, the signals are ours again."""
    handed = []
    with signals.stop_signals():
        with signals.handing_over():
            signals.hand_first_to(lambda signum, frame: handed.append(signum))
            signal.raise_signal(sig)
            signal.raise_signal(sig)
            signal.raise_signal(signal.SIGINT)
        assert handed == [signal.SIGINT] and signals.received() == sig
        assert all(h is signals._stop for h in _handlers().values())


def test_no_library_handler_means_the_first_signal_interrupts():
    with signals.stop_signals(), signals.handing_over():
        signals.hand_first_to(signal.getsignal(signal.SIGINT))  # ours: the library installed none
        signals.hand_first_to(signal.SIG_DFL)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_nothing_is_handed_over_outside_a_block():
    before = _handlers()
    signals.hand_first_to(lambda signum, frame: None)
    with signals.stop_signals():
        signals.hand_first_to(lambda signum, frame: None)  # not inside handing_over
        assert all(h is signals._stop for h in _handlers().values())
    assert _handlers() == before


def test_a_bounded_cleanup_returns_raises_or_is_left_behind():
    assert signals.bounded(5, lambda: None, "quick")
    with pytest.raises(ValueError, match="its own"):
        signals.bounded(5, lambda: (_ for _ in ()).throw(ValueError("its own")), "failing")
    hold = threading.Event()
    try:
        assert not signals.bounded(0.1, hold.wait, "stuck")
    finally:
        hold.set()


@pytest.mark.parametrize("nodes, local, cpu, gpu, count, expected", [
    ([{"CPU": 8, "GPU": 1}], True, 2, 1, 1, None),
    ([{"CPU": 8, "GPU": 1}], True, 2, 0, 4, None),  # 4 workers of 2 CPU fill the local Ray
    ([{"CPU": 8, "GPU": 1}], True, 2, 0, 5, (True, {"CPU": 8, "GPU": 1})),  # one fits, not five
    ([{"CPU": 8, "GPU": 1}], False, 2, 0, 5, None),  # a cluster runs them on other nodes
    ([{"CPU": 4}, {"CPU": 16, "GPU": 1}, {"CPU": 32}], False, 64, 0, 1, (False, {"CPU": 16, "GPU": 1})),
    ([], True, 1, 0, 1, (False, {})),
])
def test_misfit_is_the_one_node_check(monkeypatch, nodes, local, cpu, gpu, count, expected):
    monkeypatch.setattr(connect, "node_resources", lambda: nodes)
    monkeypatch.setattr(connect, "is_local", lambda: local)
    miss = connect.misfit(cpu, gpu, count)
    assert (miss and (miss.one_fits, miss.largest)) == expected
    if miss is not None:
        assert miss.local == local
        assert miss.largest_has == f"{miss.largest.get('CPU', 0):g} CPU and {miss.largest.get('GPU', 0):g} GPU"
