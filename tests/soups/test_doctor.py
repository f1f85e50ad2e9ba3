"""The doctor's measurements: barrier and angle against direct computations, and the basin test
on the blob world (tests/blobs.py): fine-tunes at low learning rates stay in the best model's
basin, one at a learning rate that leaves it does not."""

import dataclasses
import math

import pytest
import torch
from blobs import blobs, finetune, make_model

from orchestrator.soups.doctor import (
    barrier,
    diagnose,
    findings,
    interpolate,
    update_geometry,
)
from orchestrator.soups.learned import heldout_loss_and_acc


def test_barrier_is_the_largest_dip_below_the_line_between_the_ends():
    path = {0.0: 0.80, 0.25: 0.78, 0.5: 0.70, 0.75: 0.79, 1.0: 0.82}
    # the line: 0.805, 0.81, 0.815 at 1/4, 1/2, 3/4; dips 0.025, 0.11, 0.025
    assert barrier(path) == pytest.approx(11.0)
    assert barrier({0.0: 0.8, 0.5: 0.9, 1.0: 0.8}) == pytest.approx(-10.0)  # above the line: no dip


def test_angle_and_distances_against_a_direct_computation():
    """Updates split over two tensors and a non-zero base: 60 degrees, lengths 2 and 3."""
    base = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    u = torch.tensor([2.0, 0.0, 0.0])  # theta_i - base, flattened over a then b
    v = 3 * torch.tensor([math.cos(math.pi / 3), 0.0, math.sin(math.pi / 3)])
    theta_i = {"a": base["a"] + u[:2], "b": base["b"] + u[2:].view(1, 1)}
    theta_b = {"a": base["a"] + v[:2], "b": base["b"] + v[2:].view(1, 1)}
    angle, di, db = update_geometry(theta_i, theta_b, base, ["a", "b"])
    assert angle == pytest.approx(60.0, abs=1e-4) and di == pytest.approx(2.0) and db == pytest.approx(3.0)
    mid = interpolate(theta_b, theta_i, 0.5, ["a", "b"])
    assert torch.allclose(mid["a"], (theta_b["a"] + theta_i["a"]) / 2)


def test_diagnose_puts_each_ingredient_on_its_side_of_the_basin():
    model = make_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    xtr, ytr = blobs(300, 1)
    xho, yho = blobs(600, 2)
    specs = [(0.05, 0), (0.1, 1), (0.02, 2), (0.1, 3), (3.0, 4), (0.03, 5)]
    states = [finetune(init, xtr, ytr, lr, seed) for lr, seed in specs]
    names = [f"lr={lr} seed={seed}" for lr, seed in specs]

    def accuracy(state):
        return heldout_loss_and_acc(model, state, xho, yho)[1]

    scores = [accuracy(s) for s in states]
    best = max(range(len(states)), key=scores.__getitem__)
    assert specs[best][0] < 1.0
    rows = diagnose(states, names, best, init, accuracy, params=[{"train.lr": lr} for lr, _ in specs],
                    log=lambda s: None)
    by = {r.name: r for r in rows}
    far = by["lr=3.0 seed=4"]
    assert not far.in_basin and far.barrier >= 10, far
    assert all(r.in_basin and r.barrier < 2 for r in rows if r is not far)
    for r in rows:  # the path's ends are the two models' own accuracies
        assert r.accuracy[0.0] == scores[best] and r.accuracy[1.0] == scores[names.index(r.name)]
    said = findings(rows, heldout_images=600)
    assert said[0].startswith("1 of 5 ingredients lose >= 2 points on the path to the best model")
    assert "narrow `train.lr` below 3" in said[0]
    assert any("each is 0.17 points" in s for s in said)
    wide = [dataclasses.replace(r, angle=45.0) for r in rows if r.in_basin]  # 5 ingredients, all well apart
    assert findings(wide, heldout_images=5000) == []
