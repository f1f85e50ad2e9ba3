"""The online soup: a greedy soup cooked while the sweep runs, and the stopper that watches it.

With ``sweep.online_soup: true`` the driver starts `OnlineSoup` as a Ray actor with the cook's
resources (``cook.resources``), named after the sweep. Each trial that finishes is offered to it
(`SoupFeed`, a Tune callback, as Tune hears of the trial's end): it reads the trial's checkpoint
from MLflow, tries it against the current soup on held-out (one pass, with the greedy soup's
exact early rejection: `soups.greedy.GreedyRun`) and keeps it if held-out does not drop. After
each trial it logs ``soup_heldout_acc``, ``soup_kept`` and ``best_trial_heldout_acc`` on the
sweep run at step = trials finished, and its record (`schema.ONLINE_RECORD`: every trial
offered, in order, and what was decided), the record first.

The record is what survives: a restarted actor (Ray restarts it; the offer in flight is retried)
or a resumed sweep's new one rebuilds the soup from it, re-adding the kept ingredients without
a forward pass, then takes any FINISHED trial the record lacks (no trial is counted twice: the
record is keyed by run id, and byte-identical checkpoints are taken once, as the cook does).

``sweep.stop.soup_patience: K`` ends the sweep when the soup's held-out accuracy has not risen by
more than ``sweep.stop.min_delta`` over the last K finished trials (`stop_reason`; with
``sweep.stop.watch_best``, when the best single trial's has not either): the search
algorithm (`PatientVariants`, Tune's random/grid generator) starts no trial while a finished one
is still being judged, and none once the stopper has spoken; running trials finish.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from orchestrator.config import FinetuneConfig
from orchestrator.record.schema import (
    BEST_TRIAL_HELDOUT_ACC,
    CHECKPOINT_PATH,
    CHECKPOINT_SHA,
    FINISHED,
    HELDOUT_ACC,
    SOUP_HELDOUT_ACC,
    SOUP_KEPT,
    STOP_REASON,
)
from orchestrator.record.soups import online_record, save_online_record
from orchestrator.record.tracking import Tracker
from orchestrator.sweep.trial import trial_key


@dataclass(frozen=True)
class OnlineContext:
    """What the soup actor needs: the store and the sweep's run, the base config, the greedy
    rule, its resources (the cook's) and the stopper's settings."""

    tracking_uri: str
    experiment_id: str
    sweep_run_id: str
    sweep_id: str
    base: FinetuneConfig
    cpu: float = 1.0
    gpu: float = 0.0
    memory_gib: float = 0.0
    strict: bool = False
    patience: int | None = None
    min_delta: float = 0.0
    watch_best: bool = False


def stop_reason(accs: list[float], patience: int | None, min_delta: float,
                best: list[float] | None = None) -> str | None:
    """Why the sweep should stop after these soup accuracies (one per finished trial, in order),
    or None: the last `patience` trials did not raise the soup's held-out accuracy by more than
    `min_delta`, nor, when `best` is given (the best single trial's held-out accuracy so far,
    after each of the same trials: ``sweep.stop.watch_best``), the best trial's."""
    if patience is None or len(accs) <= patience:
        return None
    then, now = accs[-1 - patience], accs[-1]
    if now - then > min_delta:
        return None
    also = ""
    if best is not None:
        b_then, b_now = best[-1 - patience], best[-1]
        if b_now - b_then > min_delta:
            return None
        also = f", the best trial's by {100 * (b_now - b_then):.2f} ({b_then:.2%} -> {b_now:.2%})"
    return (f"soup patience: the online soup's held-out accuracy rose by {100 * (now - then):.2f} points "
            f"({then:.2%} -> {now:.2%}){also} over the last {patience} finished trials, not more than "
            f"sweep.stop.min_delta ({100 * min_delta:.2f} points); stopped after {len(accs)} trials")


def first_stop(accs: list[float], patience: int | None, min_delta: float,
               best: list[float] | None = None, checked: int = 0) -> tuple[int, str] | None:
    """The first judged trial after the first `checked` at which `stop_reason` holds, as (how
    many trials were judged then, the reason), or None: when two trials' answers come in
    together (one finished while the other was being judged), the sweep stops after the one
    that brought the verdict."""
    for n in range(checked + 1, len(accs) + 1):
        why = stop_reason(accs[:n], patience, min_delta, best[:n] if best is not None else None)
        if why:
            return n, why
    return None


def curves(entries: list[dict]) -> dict[str, list[float]]:
    """From the online record: after each judged trial, in order, the soup's held-out accuracy
    (``soup``) and the best single trial's so far (``best``), aligned (a trial judged before the
    soup had any ingredient adds neither)."""
    soup, best, top = [], [], None
    for e in entries:
        if e.get("heldout_acc") is not None:
            top = e["heldout_acc"] if top is None else max(top, e["heldout_acc"])
        if e.get("soup_acc") is not None:
            soup.append(e["soup_acc"])
            best.append(top if top is not None else e["soup_acc"])
    return {"soup": soup, "best": best}


# --- the actor ----------------------------------------------------------------------------------

class OnlineSoup:
    """The soup actor's class (`start` makes it a Ray actor): the greedy soup of the trials
    offered so far, rebuilt from the sweep run's record when it starts."""

    def __init__(self, ctx: OnlineContext):
        import torch

        from orchestrator import data
        from orchestrator.data.splits import resident
        from orchestrator.soups.greedy import GreedyRun
        from orchestrator.train import models
        from orchestrator.train.accel import for_resources
        from orchestrator.train.evaluate import heldout_counter

        torch.set_num_threads(max(1, int(ctx.cpu)))
        self.ctx, self.tracker = ctx, Tracker(ctx.tracking_uri)
        self.tmp = Path(tempfile.mkdtemp(prefix="soup-online-"))
        accel = for_resources(ctx.gpu)
        task = data.load_task(ctx.base.data)
        model = accel.prepare(models.build_classifier(ctx.base.model, task.classnames))
        self.counter = heldout_counter(model, resident(task).heldout)
        self.run = GreedyRun(self.counter, ctx.strict, log=self._log, prefix="online soup")
        self.entries = online_record(self.tracker, ctx.sweep_run_id)
        for n, e in enumerate(self.entries):  # the kept ones re-added, no forward pass
            if e.get("kept"):
                path = self._fetch(e["run_id"], e["sha256"])
                self.run.restore(n, path, e["name"], True, e["correct"])
                self._drop(path)
        if self.entries:
            self.run.best = self.entries[-1].get("correct")
        self._top_up()

    def _log(self, line: str) -> None:
        print(line, flush=True)

    def history(self) -> dict[str, list[float]]:
        """The soup's held-out accuracy after each finished trial, in order, and the best
        trial's so far (`curves`)."""
        return curves(self.entries)

    def offer(self, key: str) -> dict[str, list[float]]:
        """Take the FINISHED run of trial `key` (once; a trial that did not finish adds nothing);
        the soup's `history` after it."""
        runs = [r for r in self.tracker.find_trial(self.ctx.experiment_id, self.ctx.sweep_id, key)
                if r.info.status == FINISHED]
        if runs and runs[0].info.run_id not in {e["run_id"] for e in self.entries}:
            self._take(runs[0])
        return self.history()

    def catch_up(self) -> dict[str, list[float]]:
        """Take every FINISHED trial the record lacks, by end time: those that finished while no
        soup was listening (a killed driver, a restarted actor)."""
        seen = {e["run_id"] for e in self.entries}
        runs = self.tracker.trial_runs(self.ctx.experiment_id, self.ctx.sweep_id, FINISHED)
        for run in sorted(runs, key=lambda r: (r.info.end_time or 0, r.info.run_id)):
            if run.info.run_id not in seen:
                self._take(run)
        return self.history()

    def _take(self, run) -> None:
        rid, tags = run.info.run_id, run.data.tags
        name = run.info.run_name or rid
        entry = {"run_id": rid, "name": name, "sha256": tags.get(CHECKPOINT_SHA, ""), "kept": False,
                 "heldout_acc": run.data.metrics.get(HELDOUT_ACC)}
        why = self._why_not(entry)
        if why:
            entry["excluded"] = why
            self._log(f"online soup: {name} excluded: {why}")
        else:
            try:
                path = self._fetch(rid, entry["sha256"])
                step = self.run.offer(len(self.entries), path, name)
                self._drop(path)
                entry.update(kept=step["accepted"], candidate_acc=step["candidate_acc"],
                             evaluated=step["evaluated"], rejected_early=step["rejected_early"])
            except Exception as err:  # noqa: BLE001 - one that cannot be fetched, read or mixed is left out, as the cook leaves it
                entry["excluded"] = f"{type(err).__name__}: {err}"[:500]
                self._log(f"online soup: {name} excluded: {entry['excluded']}")
        if self.run.best is not None:
            entry["correct"], entry["soup_acc"] = self.run.best, self.run.best / self.counter.size
        entry["n_kept"] = len(self.run.kept)
        self.entries.append(entry)
        save_online_record(self.tracker, self.ctx.sweep_run_id, self.entries)  # first: never taken twice
        self._point(len(self.entries))

    def _why_not(self, entry: dict) -> str | None:
        for e in self.entries:
            if e["sha256"] and e["sha256"] == entry["sha256"] and not e.get("excluded"):
                return f"checkpoint byte-identical to run {e['run_id']} ({e['name']}): taken once, as that run"
        return None

    def _fetch(self, run_id: str, sha256: str) -> Path:
        from orchestrator.soups.io.stream import scan_file

        path = self.tracker.download(run_id, CHECKPOINT_PATH, self.tmp / run_id)
        scan = scan_file(path)
        if scan.sha256 != sha256:
            raise ValueError("checkpoint sha256 does not match its tag")
        if scan.nonfinite:
            raise ValueError(scan.nonfinite)
        return path

    def _drop(self, path: Path) -> None:
        """A downloaded checkpoint deleted once read, but the soup's first (the compatibility
        reference): the actor's disk holds one or two checkpoints, not the sweep's."""
        if self.run.first is None or Path(self.run.first[0]) != path:
            path.unlink(missing_ok=True)

    def _point(self, n: int) -> None:
        """The sweep run's metrics for the `n`-th finished trial (step n)."""
        entries = self.entries[:n]
        e = entries[-1]
        best = max((x["heldout_acc"] for x in entries if x.get("heldout_acc") is not None), default=None)
        metrics = {SOUP_KEPT: e["n_kept"]}
        if e.get("soup_acc") is not None:
            metrics[SOUP_HELDOUT_ACC] = e["soup_acc"]
        if best is not None:
            metrics[BEST_TRIAL_HELDOUT_ACC] = best
        self.tracker.log_metrics(self.ctx.sweep_run_id, metrics, step=n)

    def _top_up(self) -> None:
        """After a restart: the points of trials recorded but not yet logged (a kill between the
        record and its metrics), so that every finished trial has its point, once."""
        logged = {m.step for m in self.tracker.client.get_metric_history(self.ctx.sweep_run_id, SOUP_KEPT)}
        for n in range(1, len(self.entries) + 1):
            if n not in logged:
                self._point(n)

    def pid(self) -> int:
        """The actor's process (to find it among Ray's workers)."""
        return os.getpid()

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- the driver's side --------------------------------------------------------------------------

# The driver's live feeds, by sweep id: what the Tune callback and search algorithm of a sweep
# (pickled with Tune's experiment state, so holding only the sweep id) reach the actor through.
_FEEDS: dict[str, Feed] = {}


class Feed:
    """The driver's handle on the soup actor: offers in flight, the latest history, the verdict."""

    def __init__(self, actor, ctx: OnlineContext, log: Callable[[str], None]):
        self.actor, self.ctx, self.log = actor, ctx, log
        # the actor's first call takes what finished before it started (a resumed sweep's trials);
        # it does not hold trials back: only offers are waited for
        self.starting: list = [actor.catch_up.remote()]
        self.pending: list = []
        self.accs: list[float] = []  # the soup's held-out accuracy after each judged trial
        self.best: list[float] = []  # the best trial's so far, after each of them
        self.checked = 0  # how many of them the stopper has read
        self.stopped: str | None = None
        self.failed = False

    @property
    def gates(self) -> bool:
        """Whether trials wait for the soup's verdict (only with a stopper)."""
        return self.ctx.patience is not None and not self.failed

    def offer(self, key: str) -> None:
        if not self.failed:
            self.pending.append(self.actor.offer.remote(key))

    def poll(self, timeout: float | None = 0) -> None:
        """Collect the answers that are in (waiting up to `timeout` s for all; None: for ever)."""
        refs = self.starting + self.pending
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        self.starting = [r for r in self.starting if r not in ready]
        self.pending = [r for r in self.pending if r not in ready]
        for ref in ready:
            try:
                got = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the sweep goes on without its soup
                self._fail(err)
                return
            if len(got["soup"]) >= len(self.accs):
                self.accs, self.best = got["soup"], got["best"]
        if self.stopped is None:
            # each judged trial in turn, as soon as its answer is in (not once all are: a trial
            # that finished while another was judged must not move the verdict past that one)
            verdict = first_stop(self.accs, self.ctx.patience, self.ctx.min_delta,
                                 self.best if self.ctx.watch_best else None, self.checked)
            self.checked = len(self.accs)
            self.stopped = verdict[1] if verdict else None
            if self.stopped:
                self.log(f"sweep {self.ctx.sweep_id}: {self.stopped}: no new trial starts, running ones finish")
                Tracker(self.ctx.tracking_uri).set_tags(self.ctx.sweep_run_id, {STOP_REASON: self.stopped})

    def _fail(self, err: Exception) -> None:
        self.failed, self.pending, self.starting = True, [], []
        self.log(f"sweep {self.ctx.sweep_id}: the online soup failed ({type(err).__name__}: "
                 f"{str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}); the sweep goes on "
                 "without it (its record stays on the sweep run; a resumed sweep starts it again)")

    def verdict(self) -> tuple[bool, str | None]:
        """(no offer still being judged, the stopper's reason or None), without waiting."""
        self.poll(0)
        return not self.pending, self.stopped


def start(ctx: OnlineContext, log: Callable[[str], None]) -> Feed:
    """The soup actor started (a restart after a crash rebuilds it from the record; in-flight
    offers are retried) and its feed registered for the sweep's callback and search algorithm."""
    actor = ray.remote(OnlineSoup).options(
        name=f"soup-online-{ctx.sweep_id}", num_cpus=ctx.cpu, num_gpus=ctx.gpu,
        memory=int(ctx.memory_gib * 2**30) or None, max_restarts=3, max_task_retries=3,
    ).remote(ctx)
    feed = _FEEDS[ctx.sweep_id] = Feed(actor, ctx, log)
    log(f"sweep {ctx.sweep_id}: online soup on {ctx.gpu:g} GPU and {ctx.cpu:g} CPU (cook.resources)"
        + (f"; stops after {ctx.patience} trials in which {'neither it nor the best trial' if ctx.watch_best else 'it'}"
           f" rose by more than {100 * ctx.min_delta:.2f} points" if ctx.patience else ""))
    return feed


# How long the end of a sweep waits for the soup to judge its last trials (each is one held-out
# pass; a real held-out split on a GPU takes seconds to a minute).
DRAIN_S = 3600.0


def finish(feed: Feed, wait: bool) -> None:
    """The sweep's end: with `wait`, the last offers judged (progress every minute); then the
    actor stopped and the feed dropped."""
    start_t = time.monotonic()
    if wait:
        feed.poll(timeout=10)
    while wait and (feed.pending or feed.starting) and time.monotonic() - start_t < DRAIN_S:
        feed.log(f"sweep {feed.ctx.sweep_id}: waiting for the online soup to judge its last trial(s)")
        feed.poll(timeout=60)
    _FEEDS.pop(feed.ctx.sweep_id, None)
    with contextlib.suppress(Exception):  # its scratch folder is all there is to lose
        ray.get(feed.actor.close.remote(), timeout=60)
    ray.kill(feed.actor, no_restart=True)


class SoupFeed(tune.Callback):
    """Driver-side: each trial Tune sees complete is offered to the sweep's online soup (a trial
    stopped early or failed adds nothing: the actor takes FINISHED runs only). Holds only the
    sweep id: Tune saves its callbacks with the experiment state."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        feed = _FEEDS.get(self.sweep_id)
        if feed is not None:
            feed.offer(trial_key(trial.trial_id, trial.config))


class PatientVariants(BasicVariantGenerator):
    """Tune's random/grid search algorithm, which with the sweep's stopper starts no trial while
    a finished one is being judged, and none once the stopper has spoken (`Feed.verdict`);
    running trials finish and the experiment then ends. Holds only the sweep id beside Tune's
    own state (saved with the experiment)."""

    def __init__(self, sweep_id: str, **kwargs):
        super().__init__(**kwargs)
        self.sweep_id = sweep_id

    def next_trial(self):
        feed = _FEEDS.get(self.sweep_id)
        if feed is not None and feed.gates and not self.is_finished():
            judged, stop = feed.verdict()
            if stop:
                self.set_finished()
                return None
            if not judged:
                return None
        return super().next_trial()
