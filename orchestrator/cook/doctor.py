"""`soup doctor --sweep ID`: the doctor's measurements (`soups.doctor`) on a finished sweep, into
MLflow.

The ingredients are fetched and checked as the cook fetches them; the base is the classifier the
trials started from (the pretrained tower with its initial head, built as the cook builds it);
the held-out images are a seeded, class-stratified subsample of `images` (all of them when the
split is smaller). The greedy soup's decisions come from the cook's record (the greedy soup
run's kept ingredients) when the sweep was cooked. On the sweep's run: the table
(`doctor/table.json`), the figure (`doctor/paths.png`: accuracy along each path; angle against the
2-model soup's gain, the paper's Figure 3) and the findings, appended to its description.

The measurements run in a Ray task with the cook's resources (`cook.resources`: its device,
its threads), as the cook's build does; forward passes are counted as the cook counts them.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from orchestrator import data
from orchestrator.config import FinetuneConfig, validate
from orchestrator.cook.build import (
    BuildResources,
    TrialCheckpoint,
    fetch_checkpoints,
    reference_state,
    with_progress,
)
from orchestrator.cook.driver import (
    CookError,
    cook_resources,
    find_target,
    load_ingredients,
    ray_for,
)
from orchestrator.data.splits import to_float_images
from orchestrator.record.schema import (
    DESCRIPTION,
    KEPT_INGREDIENTS,
    RECIPE,
    ROLE,
    ROLE_SOUP,
    SWEEP_ID,
)
from orchestrator.record.tracking import tag_is
from orchestrator.runtime import task
from orchestrator.soups.doctor import ALPHAS, PathRow, diagnose, findings
from orchestrator.soups.io.stream import bytes_read
from orchestrator.soups.learned import heldout_loss_and_acc
from orchestrator.train import models

TABLE, FIGURE = "doctor/table.json", "doctor/paths.png"


@dataclass
class Diagnosis:
    """What `doctor` found and where it put it."""

    sweep_id: str
    best: str
    rows: list[PathRow]
    findings: list[str]
    images: int
    passes: int
    seconds: float
    bytes: int = 0  # read from the checkpoint files by the measurements

    def lines(self) -> list[str]:
        head = (f"{'ingredient':<44}{'a=0.25':>8}{'0.5':>7}{'0.75':>7}{'end':>7}{'barrier':>9}"
                f"{'angle':>7}{'basin':>7}{'greedy':>8}")
        best = f" ({100 * self.rows[0].accuracy[0.0]:.1f}% on them)" if self.rows else ""
        out = [f"doctor: sweep {self.sweep_id}, best model {self.best}; {self.images:,} held-out images{best}",
               head]
        for r in self.rows:
            acc = [100 * r.accuracy[a] for a in (*ALPHAS, 1.0)]
            greedy = "-" if r.kept is None else ("kept" if r.kept else "left")
            out.append(f"{r.name[:43]:<44}" + "".join(f"{a:7.1f}%" if i == 0 else f"{a:6.1f}%"
                                                       for i, a in enumerate(acc))
                       + f"{r.barrier:+9.2f}{r.angle:7.1f}{'in' if r.in_basin else 'OUT':>7}{greedy:>8}")
        out += ["findings:"] + ([f"- {f}" for f in self.findings] or ["- no finding"])
        out.append(f"cost: {self.passes:,} forward passes, {self.bytes / 2**20:,.1f} MiB read, {self.seconds:.1f} s")
        return out


def stratified(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """About `n` indices of `labels`, each class in its share, seeded; every index if n >= len."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().view(-1)
        take = max(1, round(len(idx) * n / len(labels)))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    return torch.cat(picked).sort().values


def _heldout(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = stratified(split.labels, n)
    if hasattr(split, "images"):
        return to_float_images(split.images[idx]), split.labels[idx]
    return to_float_images(torch.stack([split.dataset[int(i)][0] for i in idx])), split.labels[idx]


def _greedy_kept(target) -> set[str] | None:
    """Run ids the sweep's latest greedy soup kept, from its run's tag; None if never cooked."""
    runs = target.tracker.search(target.experiment_id, f"{tag_is(ROLE, ROLE_SOUP)} and "
                                 f"{tag_is(SWEEP_ID, target.parent.data.tags.get(SWEEP_ID, ''))} and "
                                 f"{tag_is(RECIPE, 'greedy')}", order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    return set(filter(None, runs[0].data.tags.get(KEPT_INGREDIENTS, "").split(",")))


def doctor(sweep_id: str, tracking_uri: str | None = None, images: int | None = None,
           use_ray: bool = True, resources: Mapping[str, float | None] | None = None,
           log: Callable[[str], None] = print) -> Diagnosis:
    """Diagnose sweep `sweep_id`'s ingredients against its best one, and log what was found.

    The ingredients are checked here as the cook checks them; the measurements run in a Ray task
    with the cook's resources (`cook.resources`, overridden by `resources`), on its device, or
    in this process without `use_ray`. `images`: the held-out subsample (default the space's
    ``doctor.images``)."""
    start = time.perf_counter()
    target = find_target(sweep_id, tracking_uri, None, partial=False)
    space, tracker, parent = target.space, target.tracker, target.parent
    res = cook_resources(space, **(resources or {}))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, excluded = load_ingredients(tracker, target.runs, parent.data.tags,
                                                 reference_state(space), Path(tmp), log)
        if len(checkpoints) < 2:
            raise CookError(f"sweep {sweep_id!r}: {len(checkpoints)} usable ingredient(s), the doctor "
                            f"compares two or more (left out: {excluded or 'none'})")
        for rid, why in excluded.items():
            log(f"doctor: run {rid} left out: {why}")
        best = max(range(len(checkpoints)), key=lambda i: checkpoints[i].heldout_acc)
        kept_ids = _greedy_kept(target)
        by_id = {r.info.run_id: r for r in target.runs}
        params = [{k: _number(by_id[c.run_id].data.params.get(k)) for k in space.search} for c in checkpoints]
        kept = None if kept_ids is None else [i for i, c in enumerate(checkpoints) if c.run_id in kept_ids]
        args = (space.base.model_dump(), checkpoints, best, kept, params, images or space.doctor.images, tracker.uri,
                BuildResources(res.cpu, res.gpu))
        if use_ray:
            ray_for(res, space.sweep.autoscale)
            found = task.run_with_progress(examine_with_progress, args, num_cpus=res.cpu, num_gpus=res.gpu,
                                           log=log, memory_bytes=int(res.memory_gib * 2**30))
        else:
            found = examine(*args, log=log)
    said = findings(found["rows"], found["heldout"])
    out = Diagnosis(sweep_id, checkpoints[best].name, found["rows"], said, found["images"], found["passes"],
                    time.perf_counter() - start, found["bytes"])
    _log(tracker, parent, out)
    return out


def examine(base_cfg: dict, checkpoints: list[TrialCheckpoint], best: int, kept: list[int] | None,
            params: list[dict], images: int, tracking_uri: str | None, resources: BuildResources,
            log: Callable[[str], None] = print) -> dict:
    """The measurements, on the device and with the threads of `resources` (wherever this runs:
    the checkpoints are the driver's copies when this node sees them, else downloaded here)."""
    cfg = validate(FinetuneConfig, base_cfg)
    accel = resources.accel()
    torch.set_num_threads(resources.threads)
    task_data = data.load_task(cfg.data)
    model = accel.prepare(models.build_classifier(cfg.model, task_data.classnames))
    model.eval()
    base = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    x, y = _heldout(task_data.heldout, images)
    passes = [0]
    hook = model.register_forward_pre_hook(lambda m, a: passes.__setitem__(0, passes[0] + a[0].shape[0]))

    def accuracy(state) -> float:
        return heldout_loss_and_acc(model, state, x, y)[1]

    try:
        with tempfile.TemporaryDirectory(prefix="soup-doctor-") as tmp:
            paths, _, _ = fetch_checkpoints(checkpoints, tracking_uri, Path(tmp))
            read0 = bytes_read()
            rows = diagnose(paths, [c.name for c in checkpoints], best, base, accuracy, kept=kept,
                            params=params, log=log)
            nbytes = bytes_read() - read0
    finally:
        hook.remove()
    return {"rows": rows, "images": len(y), "passes": passes[0], "bytes": nbytes,
            "heldout": len(task_data.heldout.labels)}


def examine_with_progress(*args) -> Iterator[tuple[str, object]]:
    """`examine` as a generator, for a streaming Ray task."""
    yield from with_progress(examine, *args)


def _number(v: str | None):
    """A logged param back as a number when it is one."""
    if v is None:
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def _log(tracker, parent, out: Diagnosis) -> None:
    """The table, the figure and the findings on the sweep's run."""
    rid = parent.info.run_id
    table = {"best": out.best, "images": out.images, "passes": out.passes, "bytes": out.bytes,
             "rows": [{**asdict(r), "accuracy": {str(a): v for a, v in r.accuracy.items()}} for r in out.rows],
             "findings": out.findings}
    tracker.log_text(rid, json.dumps(table, indent=1), TABLE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(FIGURE).name
        path.write_bytes(figure(out))
        tracker.log_artifact(rid, path, str(Path(FIGURE).parent))
    before = tracker.client.get_run(rid).data.tags.get(DESCRIPTION, "")
    section = "\n\n**Doctor**" + ("".join(f"\n- {f}" for f in out.findings) or "\n- no finding")
    tracker.describe(rid, before.split("\n\n**Doctor**")[0] + section)


def figure(out: Diagnosis) -> bytes:
    """Accuracy along each path; angle against the 2-model soup's gain over its two ends."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in out.rows:
        a = sorted(r.accuracy)
        left.plot(a, [100 * r.accuracy[k] for k in a], marker="o", color="tab:blue" if r.in_basin else "tab:red",
                  alpha=0.8, label=None)
    left.set_xlabel(f"a: (1 - a) x best ({out.best[:24]}) + a x ingredient")
    left.set_ylabel("held-out accuracy (%)")
    left.set_title("accuracy along each path (red: outside the basin)")
    gain = [100 * (r.accuracy[0.5] - (r.accuracy[0.0] + r.accuracy[1.0]) / 2) for r in out.rows]
    right.scatter([r.angle for r in out.rows], gain, c=["tab:blue" if r.in_basin else "tab:red" for r in out.rows])
    right.axhline(0, color="grey", lw=0.8)
    right.set_xlabel("angle between the updates from the base (degrees)")
    right.set_ylabel("2-model soup - mean of its ends (points)")
    right.set_title("angle and the soup's gain (the paper's Figure 3)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["Diagnosis", "doctor", "figure", "stratified"]
