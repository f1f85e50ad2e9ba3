"""First sights of the tiny world: the base model's zero-shot accuracy and a two-run soup."""

from __future__ import annotations

from typing import Callable

from orchestrator import data
from orchestrator.config import FinetuneConfig
from orchestrator.data import splits
from orchestrator.soups import weighted_average
from orchestrator.train import evaluate, models
from orchestrator.train.finetune import finetune


def _row(name: str, model, task: splits.TaskData) -> dict:
    accs = {k: v[0] for k, v in evaluate.evaluate_all(
        model, {"heldout": task.heldout, **task.reporting()}).items()}
    return {"model": name, **accs, "shift_mean": evaluate.shift_mean(accs, task.shifts)}


def zeroshot_report(cfg: FinetuneConfig) -> dict:
    """Accuracy of the zero-shot classifier (base weights, text-tower head) on every split."""
    task = data.load_task(cfg.data)
    return _row("zero-shot", models.build_classifier(cfg.model, task.classnames), task)


def pair_soup(cfg_a: FinetuneConfig, cfg_b: FinetuneConfig,
              log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Fine-tune twice from the same base, average the weights 50/50, and report all three."""
    task = data.load_task(cfg_a.data)
    runs = []
    for name, cfg in (("A", cfg_a), ("B", cfg_b)):
        log(f"fine-tuning parent {name} ({cfg.train.epochs} epochs)...")
        runs.append(finetune(cfg, task=task))
    model = models.build_classifier(cfg_a.model, task.classnames)
    rows = []
    for name, res in zip(("parent A", "parent B"), runs):
        model.load_state_dict(res.state_dict)
        rows.append(_row(name, model, task))
    model.load_state_dict(weighted_average([r.state_dict for r in runs], [0.5, 0.5]))
    rows.append(_row("average 50/50", model, task))
    return rows
