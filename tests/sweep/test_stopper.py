"""The soup-patience stopper's rule (`sweep.online.stop_reason`, `first_stop`) and the curves it
reads from the online soup's record (`curves`), on hand-made figures; and the driver's `Feed`
reading the rule as the soup actor's answers come in, on a real local Ray."""

import os
import time

import pytest

from orchestrator.sweep.online import curves, first_stop, stop_reason


def test_the_soup_alone_stops_after_patience_trials_without_a_rise_above_min_delta():
    soup = [0.80, 0.82, 0.821, 0.821, 0.8215]
    assert stop_reason(soup[:3], 3, 0.001) is None  # not yet `patience` trials after a first one
    assert stop_reason(soup[:4], 3, 0.001) is None  # 0.80 -> 0.821: a rise
    assert stop_reason(soup, 3, 0.001) is None  # 0.82 -> 0.8215: 0.15 points, above min_delta
    why = stop_reason(soup, 3, 0.002)  # ... not above 0.2 points
    assert why.startswith("soup patience: the online soup's held-out accuracy rose by 0.15 points")
    assert "best trial" not in why and why.endswith("stopped after 5 trials")
    assert stop_reason(soup, None, 0.0) is None


def test_watching_the_best_trial_waits_until_neither_the_soup_nor_the_best_trial_rises():
    soup = [0.80, 0.82, 0.82, 0.82, 0.82, 0.82]
    best = [0.80, 0.82, 0.82, 0.83, 0.83, 0.83]  # a late best trial that the soup did not take
    assert stop_reason(soup[:5], 3, 0.001) is not None  # the soup alone would stop after 5
    assert stop_reason(soup[:5], 3, 0.001, best[:5]) is None  # 0.82 -> 0.83 within the last 3
    assert stop_reason(soup, 3, 0.001, best) is None
    why = stop_reason(soup + [0.82], 3, 0.001, best + [0.83])
    assert ", the best trial's by 0.00 (83.00% -> 83.00%) over the last 3 finished trials" in why
    assert why.endswith("stopped after 7 trials")


def test_two_answers_in_together_stop_after_the_trial_that_brought_the_verdict():
    """A trial that finished while another was being judged: both answers arrive in one poll,
    and the verdict is the one the first of them brought (the sweep's CI once read "stopped
    after 4 trials" where patience 2 had spoken after the third)."""
    soup, best = [0.72, 0.75, 0.77, 0.78], [0.79, 0.80, 0.82, 0.82]
    judged, why = first_stop(soup, 2, 0.5, best)  # nothing read yet: trials 3 and 4 came in together
    assert judged == 3 and why.endswith("stopped after 3 trials") and "(72.00% -> 77.00%)" in why, why
    assert first_stop(soup, 2, 0.5, best, checked=3) == (4, stop_reason(soup, 2, 0.5, best))
    # 5 points over the last 2 at the third, 3 at the fourth
    assert first_stop(soup, 2, 0.04, best)[0] == 4
    assert first_stop(soup, 2, 0.01, best) is None
    assert first_stop(soup, None, 0.0) is None and first_stop([], 2, 0.5) is None


def test_curves_align_the_soup_with_the_best_trial_so_far_as_the_record_lists_them():
    entries = [{"heldout_acc": 0.70, "kept": False, "excluded": "not finite"},  # before any soup
               {"heldout_acc": 0.81, "kept": True, "soup_acc": 0.81},
               {"heldout_acc": 0.85, "kept": False, "soup_acc": 0.81},
               {"heldout_acc": None, "kept": False, "soup_acc": 0.81, "excluded": "no figure"},
               {"heldout_acc": 0.83, "kept": True, "soup_acc": 0.84}]
    assert curves(entries) == {"soup": [0.81, 0.81, 0.81, 0.84], "best": [0.81, 0.85, 0.85, 0.85]}
    assert curves([]) == {"soup": [], "best": []}


def test_the_benchmark_replays_the_live_stopper():
    """benchmarks/online_soup.py --replay stops a full sweep's curve where the live stopper would:
    after the trial that brought the verdict, plus the trials running beside it."""
    from benches import load_benchmark

    replayed_stop = load_benchmark("online_soup").replayed_stop
    entries = [{"heldout_acc": h, "kept": True, "soup_acc": s}
               for h, s in [(0.79, 0.72), (0.80, 0.75), (0.82, 0.77), (0.81, 0.78), (0.83, 0.79)]]
    full = {"curve": entries, "trials": 5}
    trained, why = replayed_stop(full, 2, 0.5, watch_best=True, concurrent=2)
    assert trained == 4 and why.endswith("stopped after 3 trials"), (trained, why)
    assert replayed_stop(full, 2, 0.01, watch_best=False, concurrent=2) == (5, None)


@pytest.mark.integration
def test_the_feed_speaks_after_the_third_trial_while_the_fourth_is_still_judged(hermetic, tiny_finetune_config):
    """The race that once failed CI: trial 4 finished while trial 3 was judged. The verdict comes
    with trial 3's answer, trial 4's still in flight, and it names trial 3."""
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.runtime.connect import init_ray
    from orchestrator.sweep.online import Feed, OnlineContext

    class Answers:  # defined here, so that Ray ships it by value to the actor's process
        """What the soup actor answers (the figures of the test above), with the fourth offer held
        until `gate` exists: the driver's `Feed` is what is under test."""

        SOUP, BEST = [0.72, 0.75, 0.77, 0.78], [0.79, 0.80, 0.82, 0.82]

        def __init__(self, gate: str):
            self.gate, self.n = gate, 0

        def catch_up(self) -> dict:
            return {"soup": [], "best": []}

        def offer(self, key: str) -> dict:
            self.n += 1
            while self.n == 4 and not os.path.exists(self.gate):
                time.sleep(0.05)
            return {"soup": self.SOUP[:self.n], "best": self.BEST[:self.n]}

    client = MlflowClient(hermetic["uri"])
    run_id = client.create_run(client.create_experiment("stopper")).info.run_id
    ctx = OnlineContext(hermetic["uri"], "0", run_id, "race", tiny_finetune_config, patience=2,
                        min_delta=0.5, watch_best=True)
    gate = hermetic["tmp"] / "gate"
    init_ray(lambda line: None, dashboard=False)  # `hermetic` shuts it down
    feed = Feed(ray.remote(Answers).remote(str(gate)), ctx, lambda line: None)
    for key in "abcd":
        feed.offer(key)
    deadline = time.monotonic() + 300
    while len(feed.accs) < 3 and not feed.failed and time.monotonic() < deadline:
        feed.poll(timeout=1)
    assert len(feed.accs) == 3 and len(feed.pending) == 1, (feed.accs, feed.pending)
    assert feed.verdict() == (False, feed.stopped)
    assert feed.stopped and feed.stopped.endswith("stopped after 3 trials"), feed.stopped
    assert client.get_run(run_id).data.tags["stop_reason"] == feed.stopped
    gate.touch()
    feed.poll(timeout=300)
    assert len(feed.accs) == 4 and not feed.pending and feed.stopped.endswith("after 3 trials")
