"""The cook's table in words (the demo's verdict), and the quality benchmark's statistics."""

import math
from pathlib import Path

import pytest
from benches import load_benchmark

from orchestrator.cook.report import verdict

ROOT = Path(__file__).resolve().parents[2]


def rows(best, greedy, ensemble=(0.95, 0.53)):
    def row(name, test, shift):
        return {"name": name, "kind": "baseline", "heldout": 0.9, "test": test, "shift_mean": shift}
    return [row("zero-shot", 0.42, 0.42), row("best individual", *best), row("ensemble", *ensemble),
            row("greedy soup", *greedy)]


def test_a_soup_that_wins_both_ways_is_promoted_with_its_margins():
    said = verdict(rows(best=(0.929, 0.506), greedy=(0.935, 0.520)))
    assert said[0] == ("greedy soup vs best individual: +0.6 points on test (93.5% vs 92.9%), "
                       "+1.4 under shift (52.0% vs 50.6%).")
    assert said[1] == "Promote the greedy soup: +0.6 on test, +1.4 under shift, same inference cost as one model."
    assert said[2].startswith("(The logit ensemble of every ingredient: 95.0% test, 53.0% under shift")


def test_a_tie_in_distribution_counts_as_not_worse():
    said = verdict(rows(best=(0.93, 0.50), greedy=(0.93, 0.51)))
    assert said[1].startswith("Promote the greedy soup: +0.0 on test, +1.0 under shift")


def test_a_soup_that_wins_only_under_shift_is_a_trade_and_says_so():
    said = verdict(rows(best=(0.965, 0.509), greedy=(0.944, 0.528)))
    assert said[1] == ("The greedy soup trades -2.1 on test for +1.9 under shift: promote it if shifted "
                       "data is what production sees, else keep the best individual.")


def test_a_soup_that_loses_both_ways_is_not_promoted():
    said = verdict(rows(best=(0.96, 0.53), greedy=(0.95, 0.52)))
    assert said[1] == "Keep the best individual model: the greedy soup is -1.0 on test and -1.0 under shift in this sweep."


def test_without_a_greedy_soup_there_is_no_verdict():
    assert verdict([r for r in rows((0.9, 0.5), (0.9, 0.5)) if r["name"] != "greedy soup"]) == []


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("soup_quality")


def test_paired_interval_is_students_t_on_the_differences(quality):
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3)
    m, lo, hi = quality.paired([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert m == 2.0
    assert lo == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-6)
    assert hi == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-6)


def test_summary_orders_rows_like_the_paper_and_pairs_by_sweep(quality):
    def sweep(seed, best, greedy):
        names = ["zero-shot", "best individual", "ensemble", "greedy ensemble", "uniform soup",
                 "greedy soup", "learned soup", "model-stock soup"]
        return {"seed": seed, "rows": [{"name": n, "heldout": 0.9, "test": greedy if n == "greedy soup" else best,
                                        "shift_mean": 0.5} for n in names], "ingredients": []}
    s = quality.summarise([sweep(0, 0.90, 0.91), sweep(1, 0.80, 0.82)])
    assert list(s["per"]) == ["zero-shot", "best individual", "uniform soup", "greedy soup", "learned soup",
                              "model-stock soup", "ensemble", "greedy ensemble"]
    assert s["diffs"]["greedy soup"]["test"][0] == pytest.approx(0.015)
    assert "best individual" not in s["diffs"] and "zero-shot" not in s["diffs"]
    assert quality.findings(s)[0].startswith("greedy soup > best individual on test on average: yes (+1.50 points")
    assert quality.findings(s)[1].startswith("greedy soup > best individual on mean shift on average: NO (+0.00")


def test_space_variant_changes_only_the_seeds(quality):
    text = (ROOT / "search_spaces" / "tiny_digits.yaml").read_text()
    import yaml
    a, b = yaml.safe_load(text), yaml.safe_load(quality._space_for(text, 3, split_seed=True))
    assert b["sweep"]["seed"] == 3 and b["base"]["data"]["split_seed"] == 3
    b["sweep"]["seed"], b["base"]["data"]["split_seed"] = a["sweep"]["seed"], a["base"]["data"]["split_seed"]
    assert a == b


def test_a_greedy_soup_of_one_says_it_is_the_best_model():
    said = verdict(rows(best=(0.97, 0.545), greedy=(0.97, 0.545)))
    assert said[0].startswith("greedy soup vs best individual: +0.0 points on test (97.0% vs 97.0%)")
    assert said[1] == ("The greedy soup is the best individual model: adding any other ingredient lowered "
                       "held-out accuracy, so it kept that one alone; promoting either is the same.")
