import pytest
import torch

from orchestrator.soups import read_weights, save_weights, weighted_average


def sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g)}


def test_uniform_average_is_the_mean():
    states = [sd(i) for i in range(3)]
    avg = weighted_average(states)
    for k in states[0]:
        assert torch.allclose(avg[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-6)


def test_weighted_average_uses_the_coefficients():
    a, b = sd(0), sd(1)
    out = weighted_average([a, b], [0.25, 0.75])
    assert torch.allclose(out["a.weight"], 0.25 * a["a.weight"] + 0.75 * b["a.weight"], atol=1e-6)


def test_incompatible_states_are_refused_by_name():
    a, b = sd(0), sd(1)
    b["a.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"run-b: tensor 'a.weight'"):
        weighted_average([a, b], names=["run-a", "run-b"])
    c = dict(sd(2))
    c["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra"):
        weighted_average([a, c])
    with pytest.raises(ValueError, match="coefficients"):
        weighted_average([a, sd(3)], [1.0])


def test_safetensors_roundtrip(tmp_path):
    a = sd(0)
    p = save_weights(a, tmp_path / "w.safetensors", {"recipe": "test"})
    b = read_weights(p)
    assert all(torch.equal(a[k], b[k]) for k in a)
