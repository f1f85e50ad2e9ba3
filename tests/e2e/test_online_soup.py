"""The online soup and its stopper, on a real local Ray and a real MLflow store.

One sweep of eight tiny trials, two at a time, with ``sweep.online_soup`` and a stopper that can
never be satisfied (``min_delta`` of 50 points over ``soup_patience: 2``, for the soup and, with
``watch_best``, for the best trial so far: the verdict reads both curves): after the third
finished trial the stopper speaks, a trial still running then finishes, the others never start.
The soup actor is SIGKILLed once it has taken the first trial, and comes back from its record.
The sweep run holds one soup point per finished trial, the record says what the greedy rule
decided in the order the soup took them, and the registered ``online-greedy`` version's kept
list equals a replay of that rule, here, over the trials' checkpoints in that order.

(The driver killed and resumed with an online soup: tests/e2e/test_preemption.py.)
"""

import json
import os
import re
import signal
import threading
import time

import pytest
from conftest import SPACES
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRIALS = 8


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    import ray

    from orchestrator.cook.driver import cook_online
    from orchestrator.sweep.driver import run_sweep

    tmp = tmp_path_factory.mktemp("online")
    text = (SPACES / "tiny4.yaml").read_text().replace("num_samples: 4", f"num_samples: {TRIALS}")
    # two trials and the soup actor side by side on two cores
    text = text.replace("resources: {cpu: 1}", "resources: {cpu: 0.75}\n  online_soup: true\n"
                        "  stop: {soup_patience: 2, min_delta: 0.5, watch_best: true}")
    text += "cook:\n  resources: {cpu: 0.5}\n"
    space = tmp / "online.yaml"
    space.write_text(text)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    lines: list[str] = []
    done, killed = threading.Event(), {}
    killer = threading.Thread(target=_kill_the_soup_once, args=(uri, done, killed), daemon=True)
    killer.start()
    try:
        out = run_sweep(space, name="on8", storage_path=str(tmp / "ray_results"), tracking_uri=uri,
                        log=lines.append)
    finally:
        done.set()
        killer.join(timeout=600)
    cooked = cook_online("on8", tracking_uri=uri, log=lines.append)
    ray.shutdown()
    return {"out": out, "cooked": cooked, "uri": uri, "lines": lines, "client": MlflowClient(uri),
            "killed": killed}


def _kill_the_soup_once(uri: str, done: threading.Event, killed: dict) -> None:
    """Once the soup has taken its first trial (its record says so), SIGKILL the soup actor's
    process; Ray restarts it, and it must rebuild the soup from the record (the pid it answers
    with afterwards is kept, to show it was a new process)."""
    import ray

    from orchestrator.record.soups import locate_sweep, online_record
    from orchestrator.record.tracking import Tracker

    try:
        tracker = Tracker(uri)
        while not done.is_set():
            _, parent = locate_sweep(tracker, "on8")
            if parent is not None and online_record(tracker, parent.info.run_id):
                break
            time.sleep(0.1)
        actor = ray.get_actor("soup-online-on8")
        killed["pid"] = ray.get(actor.pid.remote(), timeout=600)
        killed["during_sweep"] = not done.is_set()
        os.kill(killed["pid"], signal.SIGKILL)
        killed["restarted_pid"] = ray.get(actor.pid.remote(), timeout=600)
    except Exception as err:  # noqa: BLE001 - asserted by the test
        killed["error"] = repr(err)


def _trials(client, out):
    return client.search_runs([out.experiment_id], f"tags.sweep_id = '{out.sweep_id}' and "
                                                   "tags.`soup.role` = 'trial'")


def test_the_stopper_ends_the_sweep_and_the_unstarted_trials_never_run(stopped):
    out, client = stopped["out"], stopped["client"]
    runs = _trials(client, out)
    # patience 2: the third judged trial brings the verdict. No trial starts while a finished one
    # is being judged, so at that moment at most one trial runs beside it (two run at once): it
    # finishes, and whether it had started depends on how long the soup took to judge (here it is
    # also killed and restarted once)
    judged = int(re.search(r"stopped after (\d+) trials", out.stopped or "")[1])
    assert judged == 3, out.stopped
    assert out.finished == len(runs), [r.info.run_name for r in runs]
    assert judged <= out.finished <= judged + 1, [r.info.run_name for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}  # none stopped midway
    assert out.stopped and "soup patience" in out.stopped, out.stopped
    assert ", the best trial's by " in out.stopped, out.stopped  # watch_best: both curves were read
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["stop_reason"] == out.stopped
    description = parent.data.tags["mlflow.note.content"]
    assert "Stopped early" in description and "soup patience" in description, description
    print(f"stopped after {out.finished} of {TRIALS} trials: {out.stopped}")


def test_the_soup_actor_killed_mid_sweep_is_restarted_from_its_record(stopped):
    """The soup actor's process SIGKILLed after it took the first trial: Ray restarts it
    (`max_restarts`), it rebuilds the soup from the record, the offer in flight is retried, and
    the sweep ends as it would have: nothing taken twice (the other tests check the points and
    the kept list on this sweep)."""
    killed = stopped["killed"]
    assert "error" not in killed, killed
    assert killed["during_sweep"] and killed["restarted_pid"] != killed["pid"], killed


def test_one_soup_point_per_finished_trial(stopped):
    out, client = stopped["out"], stopped["client"]
    for key in ("soup_heldout_acc", "soup_kept", "best_trial_heldout_acc"):
        steps = sorted(m.step for m in client.get_metric_history(out.parent_run_id, key))
        assert steps == list(range(1, out.finished + 1)), (key, steps)
    accs = [m.value for m in sorted(client.get_metric_history(out.parent_run_id, "soup_heldout_acc"),
                                    key=lambda m: m.step)]
    assert accs == sorted(accs)  # the greedy rule never lets the soup drop


def _base(stopped):
    """The sweep's base config, from the space logged on its run (as the cook reads it)."""
    import yaml

    from orchestrator.config import SearchSpace, validate
    from orchestrator.record.schema import RESOLVED_SPACE
    from orchestrator.record.tracking import Tracker, read_artifact_text

    text = read_artifact_text(Tracker(stopped["uri"]), stopped["out"].parent_run_id, RESOLVED_SPACE)
    return validate(SearchSpace, yaml.safe_load(text)).base


def test_the_registered_online_soup_is_a_replay_of_the_rule_in_finishing_order(stopped, tmp_path):
    from orchestrator import data
    from orchestrator.record.schema import CHECKPOINT_PATH, ONLINE_RECORD
    from orchestrator.record.tracking import Tracker, read_artifact_text
    from orchestrator.soups.greedy import GreedyRun
    from orchestrator.train import models
    from orchestrator.train.evaluate import heldout_counter

    out, client, cooked = stopped["out"], stopped["client"], stopped["cooked"]
    tracker = Tracker(stopped["uri"])
    record = json.loads(read_artifact_text(tracker, out.parent_run_id, ONLINE_RECORD))["entries"]
    assert len(record) == out.finished and len({e["run_id"] for e in record}) == out.finished
    # the replay: the trials' checkpoints in the record's order, the greedy rule, in this process
    base = _base(stopped)
    task = data.load_task(base.data)
    model = models.build_classifier(base.model, task.classnames)
    greedy = GreedyRun(heldout_counter(model, task.heldout), log=lambda s: None)
    for n, e in enumerate(record):
        greedy.offer(n, tracker.download(e["run_id"], CHECKPOINT_PATH, tmp_path / e["run_id"]), e["name"])
    replay = [record[i]["run_id"] for i in greedy.kept]
    live = [e["run_id"] for e in record if e["kept"]]
    (model_version,) = client.search_model_versions("name = 'tiny4-soup'")
    assert model_version.tags["recipe"] == "online-greedy"
    registered = model_version.tags["ingredients"].split(",")
    print(f"online soup kept {len(live)} of {len(record)}; replay kept {len(replay)}; registered {len(registered)}")
    assert registered == replay == live
    assert cooked.versions == {"online-greedy": model_version.version}
    assert any("online soup kept, in its order" in line for line in stopped["lines"]), stopped["lines"]
    assert [e["soup_acc"] for e in record] == pytest.approx([s["heldout_acc"] for s in greedy.steps])


def test_the_record_rebuilds_the_same_soup(stopped):
    """What a restarted actor does: the kept ingredients re-added from the record, no forward
    pass, give the soup whose held-out count the record holds; a trial offered twice, or one
    that never finished, adds nothing."""
    from orchestrator.sweep.online import OnlineContext, OnlineSoup, curves

    out = stopped["out"]
    soup = OnlineSoup(OnlineContext(stopped["uri"], out.experiment_id, out.parent_run_id, out.sweep_id,
                                    _base(stopped)))
    try:
        assert sum(r for r, _ in soup.counter.correct(soup.run.soup())) == soup.entries[-1]["correct"]
        before = [dict(e) for e in soup.entries]
        assert soup.offer("no-such-trial") == soup.catch_up() == curves(before)
        assert curves(before)["soup"] == [e["soup_acc"] for e in before]
        assert soup.entries == before
    finally:
        soup.close()

