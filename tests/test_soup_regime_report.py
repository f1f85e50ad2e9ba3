"""The regime probe's summary (benchmarks/soup_regime.py): each soup and the ensemble against the
best individual model, paired by seed, with the 95% interval over seeds. The probe itself
fine-tunes for minutes; its numbers here are made up."""

import math

import pytest
from benches import load_benchmark


@pytest.fixture(scope="module")
def regime():
    return load_benchmark("soup_regime")


def _seed(regime, best: float, greedy: float, ensemble: float) -> dict:
    got = {"mean ingredient": best - 0.01, "best individual": best, "uniform soup": best - 0.005,
           "greedy soup": greedy, "ensemble": ensemble, "greedy kept": 2.0}
    for rule in regime.RULES:
        got.setdefault(f"{rule} soup", best)
        got.setdefault(f"{rule} kept", 1.0)
    return got


def test_soups_and_the_ensemble_are_paired_with_the_best_model_by_seed(regime):
    # greedy - best: +0.1, +0.2, +0.3 points (mean +0.2, sd 0.1, t(0.975, 2) = 4.302653)
    got = [_seed(regime, 0.80, 0.801, 0.79), _seed(regime, 0.82, 0.822, 0.83), _seed(regime, 0.79, 0.793, 0.79)]
    lines = regime.report("probe", got)
    half = 4.302653 * 0.1 / math.sqrt(3)
    greedy = next(line for line in lines if line.strip().startswith("greedy - best"))
    assert f"mean +0.20 points [{0.2 - half:+.2f}, {0.2 + half:+.2f}]" in greedy
    assert greedy.endswith("per seed +0.10 +0.20 +0.30")
    ensemble = next(line for line in lines if line.strip().startswith("ensemble - best"))
    assert ensemble.endswith("per seed -1.00 +1.00 +0.00") and "mean +0.00 points [" in ensemble


def test_one_seed_has_no_interval(regime):
    lines = regime.report("probe", [_seed(regime, 0.80, 0.801, 0.79)])
    greedy = next(line for line in lines if line.strip().startswith("greedy - best"))
    assert "[" not in greedy and greedy.endswith("per seed +0.10")
