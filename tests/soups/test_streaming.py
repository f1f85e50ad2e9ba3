"""Streaming soups: same bits as the in-memory definitions, from files read chunk by chunk.

Speed and memory are measured by benchmarks/soup_scaling.py, not here. Tiny chunks (a few
dozen bytes) are forced where it matters, so that every tensor spans many chunks and threads.
"""

import hashlib
import re

import pytest
import torch
from blobs import blobs, finetune, make_model
from safetensors.torch import load_file

from orchestrator.soups.greedy import greedy_soup, hopeless
from orchestrator.soups.io import stream
from orchestrator.soups.io.stream import read_header, read_weights, scan_file
from orchestrator.soups.io.weights import (
    check_compatible,
    save_weights,
    stream_weighted_sum,
    weighted_average,
)
from orchestrator.soups.learned import (
    choose_mode,
    held_bytes,
    heldout_loss_and_acc,
    learned_soup,
)
from orchestrator.soups.uniform import uniform_soup
from orchestrator.train.evaluate import HeldoutCounter

QUIET = lambda s: None  # noqa: E731


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 40)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The blob MLPs of tests/blobs.py, also saved as safetensors files."""
    model = make_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    xtr, ytr = blobs(300, 1)
    xho, yho = blobs(150, 2)
    states = [finetune(init, xtr, ytr, lr, seed) for lr, seed in
              [(0.05, 0), (0.1, 1), (0.02, 2), (0.1, 3), (3.0, 4), (0.03, 5)]]
    tmp = tmp_path_factory.mktemp("ingredients")
    paths = [save_weights(s, tmp / f"ing{i}.safetensors") for i, s in enumerate(states)]
    scores = [heldout_loss_and_acc(model, s, xho, yho)[1] for s in states]
    return {"model": model, "states": states, "paths": paths, "x": xho, "y": yho, "scores": scores}


def odd_states(n=5):
    """Odd sizes (chunk tails), a half-precision tensor and an integer buffer."""
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(1000, 37, generator=g), "h": torch.randn(129, generator=g).half(),
             "steps": torch.tensor([7 + i])} for i in range(n)]


@pytest.mark.parametrize("as_files", [False, True])
def test_streamed_weighted_sum_equals_weighted_average_bit_for_bit(tmp_path, tiny_chunks, as_files):
    # Bit for bit, not approximately: both accumulate with the same elementwise operation in the
    # same ingredient order, and an elementwise result does not depend on the chunking.
    states = odd_states()
    ingredients = [save_weights(s, tmp_path / f"{i}.safetensors") for i, s in enumerate(states)] \
        if as_files else states
    coefficients = [0.1, 0.3, 0.2, 0.25, 0.15]
    expected = weighted_average(states, coefficients)
    got = stream_weighted_sum(ingredients, coefficients)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    assert torch.equal(got["steps"], states[0]["steps"])  # integer buffers: the first's


def test_uniform_soup_streams_to_memory_or_to_a_file(world, tmp_path, tiny_chunks):
    expected = weighted_average(world["states"])
    res = uniform_soup(world["paths"], names=[f"run-{i}" for i in range(6)])
    assert all(torch.equal(res.state_dict[k], expected[k]) for k in expected)
    out = uniform_soup(world["paths"], out=tmp_path / "soup.safetensors", metadata={"recipe": "uniform"})
    assert out.state_dict == {} and out.path == tmp_path / "soup.safetensors"
    written = load_file(str(out.path))  # a valid safetensors file, read by the reference reader
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert read_header(out.path)[1] == {"recipe": "uniform"}


def test_files_are_checked_from_their_headers(world, tmp_path):
    wide = dict(world["states"][0], **{"2.weight": torch.zeros(4, 16)})
    bad = save_weights(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"run-c: tensor '2\.weight' is \(4, 16\)"):
        check_compatible(world["paths"][:2] + [bad], ["run-a", "run-b", "run-c"])
    with pytest.raises(ValueError, match="run-c"):
        uniform_soup(world["paths"][:2] + [bad], names=["run-a", "run-b", "run-c"])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(tmp_path / "junk.safetensors")


def _with_header(path, header, out):
    """`path`'s tensor bytes behind another JSON `header` (valid JSON, any shape)."""
    import json
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    raw = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return out


@pytest.mark.parametrize("change, why", [
    (lambda h, k: {**h, k: {**h[k], "data_offsets": 0}}, "has a corrupt data_offsets 0"),
    (lambda h, k: {**h, k: {**h[k], "data_offsets": [0]}}, "has a corrupt data_offsets [0]"),
    (lambda h, k: {**h, k: {**h[k], "shape": None}}, "has a corrupt shape None"),
    (lambda h, k: {**h, k: {**h[k], "shape": [2.5]}}, "has a corrupt shape [2.5]"),
    (lambda h, k: {**h, k: {**h[k], "dtype": ["F32"]}}, "unsupported dtype ['F32']"),
    (lambda h, k: {**h, k: 7}, "corrupt header entry (not an object)"),
    (lambda h, k: {**h, "__metadata__": [1]}, "'__metadata__' is not an object"),
    (lambda h, k: list(h.items()), "a JSON list, not an object"),
], ids=["offsets-number", "offsets-short", "shape-null", "shape-float", "dtype-list", "entry-int",
        "metadata-list", "header-list"])
def test_a_header_that_is_json_but_no_safetensors_layout_is_a_value_error(world, tmp_path, change, why):
    # Every malformed header is a ValueError naming the file: the cook excludes such a run by
    # catching exactly that, where a TypeError used to end the whole cook.
    import json
    import struct

    path = world["paths"][0]
    data = path.read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    key = next(k for k in header if k != "__metadata__")
    bad = _with_header(path, change(header, key), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=re.escape(why)) as err:
        read_header(bad)
    assert str(bad) in str(err.value)


def test_scan_hashes_every_byte_and_finds_non_finite_values(world, tmp_path, tiny_chunks):
    path = world["paths"][1]
    scan = scan_file(path, chunk_bytes=48)
    assert scan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and scan.nonfinite is None
    nan = dict(world["states"][1])
    nan["0.bias"] = nan["0.bias"].clone()
    nan["0.bias"][3] = float("nan")
    assert "'0.bias'" in scan_file(save_weights(nan, tmp_path / "nan.safetensors")).nonfinite
    assert all(torch.equal(v, world["states"][1][k]) for k, v in read_weights(path).items())


def test_hopeless_is_the_exact_bound():
    # 10 examples, soup gets 7 right. After 5 seen with 2 right, at most 7 reachable.
    assert not hopeless(2, 5, 10, 7, strict=False)  # 7 >= 7 is still possible
    assert hopeless(2, 5, 10, 7, strict=True)  # but 7 > 7 is not
    assert hopeless(1, 5, 10, 7, strict=False)


def counter(model, x, y, chunk=16, tally=None):
    def correct(state):
        with torch.no_grad():
            for i in range(0, len(y), chunk):
                if tally is not None:
                    tally.append(len(y[i:i + chunk]))
                out = torch.func.functional_call(model, state, (x[i:i + chunk],))
                yield int((out.argmax(1) == y[i:i + chunk]).sum()), len(y[i:i + chunk])
    return HeldoutCounter(len(y), correct)


@pytest.mark.parametrize("strict", [False, True])
def test_early_rejection_gives_the_same_soup_with_fewer_examples(world, strict, tiny_chunks):
    model, x, y, scores = world["model"], world["x"], world["y"], world["scores"]
    early_tally, plain_tally, lines = [], [], []
    early = greedy_soup(world["paths"], counter(model, x, y, tally=early_tally), scores, strict=strict,
                        log=lines.append)
    plain = greedy_soup(world["paths"], counter(model, x, y, tally=plain_tally), scores, strict=strict,
                        log=QUIET, early_reject=False)
    assert early.kept == plain.kept and early.heldout_acc == plain.heldout_acc
    assert early.coefficients == plain.coefficients
    assert set(early.state_dict) == set(plain.state_dict)
    assert all(torch.equal(early.state_dict[k], plain.state_dict[k]) for k in plain.state_dict)
    assert [s["accepted"] for s in early.steps] == [s["accepted"] for s in plain.steps]
    assert [s["heldout_acc"] for s in early.steps] == [s["heldout_acc"] for s in plain.steps]
    # Fewer examples: recorded per candidate and in total, and really evaluated.
    assert any(s["rejected_early"] for s in early.steps) and 4 not in early.kept
    assert early.stats["heldout_evaluated"] == sum(s["evaluated"] for s in early.steps) == sum(early_tally)
    assert early.stats["heldout_evaluated"] < plain.stats["heldout_evaluated"] == sum(plain_tally)
    assert plain.stats["heldout_evaluated"] == plain.stats["heldout_evaluated_plain"] == 150 * 6
    assert all(s["evaluated"] == 150 for s in early.steps if not s["rejected_early"])
    assert len(lines) == 6 and all(line.startswith("greedy soup:") for line in lines)


def test_streamed_greedy_matches_the_in_memory_algorithm(world):
    """Files and state dicts, counts and a plain accuracy function: one soup."""
    model, x, y, scores = world["model"], world["x"], world["y"], world["scores"]
    by_counts = greedy_soup(world["paths"], counter(model, x, y), scores, log=QUIET)
    acc = lambda state: heldout_loss_and_acc(model, state, x, y)[1]  # noqa: E731
    by_acc = greedy_soup(world["states"], acc, scores, log=QUIET)
    assert by_counts.kept == by_acc.kept and by_counts.heldout_acc == by_acc.heldout_acc
    assert all(torch.equal(by_counts.state_dict[k], by_acc.state_dict[k]) for k in by_acc.state_dict)
    assert by_acc.steps[1]["evaluated"] is None and by_acc.stats == {}
    expected = weighted_average(world["states"], by_counts.coefficients)
    assert all(torch.allclose(by_counts.state_dict[k], expected[k], atol=1e-6) for k in expected)


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_streaming_matches_the_in_memory_gradients(world, per_layer, tiny_chunks):
    model, x, y = world["model"], world["x"], world["y"]
    kw = dict(per_layer=per_layer, steps=25, lr=0.1, batch_size=64, seed=3, log=QUIET)
    ref = learned_soup(world["states"], model, x, y, mode="memory", **kw)
    got = learned_soup(world["paths"], model, x, y, mode="streaming", **kw)
    flat = lambda c: torch.tensor([c[k] for k in sorted(c)] if per_layer else c)  # noqa: E731
    assert torch.allclose(flat(got.coefficients), flat(ref.coefficients), atol=1e-5, rtol=0)
    assert [h["loss"] for h in got.steps] == pytest.approx([h["loss"] for h in ref.steps], abs=1e-5)
    expected = weighted_average(world["states"], got.coefficients) if not per_layer else None
    if expected is not None:  # the soup is exactly the sum its coefficients stand for
        assert all(torch.equal(got.state_dict[k], expected[k]) for k in expected)


def test_learned_stacked_bf16_is_close_to_float32(world):
    model, x, y = world["model"], world["x"], world["y"]
    kw = dict(steps=25, lr=0.1, batch_size=64, seed=3, log=QUIET, mode="stacked")
    ref = learned_soup(world["states"], model, x, y, mode="memory",
                       **{k: v for k, v in kw.items() if k != "mode"})
    fp32 = learned_soup(world["paths"], model, x, y, stack_dtype=torch.float32, **kw)
    bf16 = learned_soup(world["paths"], model, x, y, stack_dtype=torch.bfloat16, **kw)
    assert torch.allclose(torch.tensor(fp32.coefficients), torch.tensor(ref.coefficients), atol=1e-5)
    assert torch.allclose(torch.tensor(bf16.coefficients), torch.tensor(fp32.coefficients), atol=0.01)
    per_layer = learned_soup(world["paths"], model, x, y, per_layer=True, stack_dtype=torch.bfloat16, **kw)
    uniform_loss = heldout_loss_and_acc(model, weighted_average(world["states"]), x, y)[0]
    assert heldout_loss_and_acc(model, per_layer.state_dict, x, y)[0] <= uniform_loss
    with pytest.raises(ValueError, match="known: auto, stacked, sampled, streaming, memory"):
        learned_soup(world["paths"], model, x, y, mode="telepathy")


def test_learned_modes_agree_with_buffers_that_take_no_gradient(tmp_path):
    """Batch-norm statistics (float buffers) are mixed but not differentiated; its counter
    (an integer buffer) is copied from the first ingredient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    states = [{k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v + i
               for k, v in model.state_dict().items()} for i in range(3)]
    paths = [save_weights(s, tmp_path / f"bn{i}.safetensors") for i, s in enumerate(states)]
    x, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    kw = dict(steps=5, batch_size=16, log=QUIET, stack_dtype=torch.float32)
    ref = learned_soup(states, model, x, y, mode="memory", **kw)
    for mode in ("streaming", "stacked", "sampled"):
        got = learned_soup(paths, model, x, y, mode=mode, **kw)
        assert got.coefficients == pytest.approx(ref.coefficients, abs=1e-5)
        assert torch.equal(got.state_dict["1.num_batches_tracked"], states[0]["1.num_batches_tracked"])
    assert read_weights(paths[0], []) == {}


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_sampled_with_every_ingredient_is_the_in_memory_soup(world, per_layer):
    """k = N: every step samples every ingredient, and sampling is the memory formulation."""
    model, x, y = world["model"], world["x"], world["y"]
    kw = {"per_layer": per_layer, "steps": 25, "lr": 0.1, "batch_size": 64, "seed": 3, "log": QUIET}
    ref = learned_soup(world["states"], model, x, y, mode="memory", **kw)
    got = learned_soup(world["paths"], model, x, y, mode="sampled", sample=len(world["paths"]), **kw)

    def flat(c):
        return torch.tensor([c[k] for k in sorted(c)] if per_layer else c)
    assert torch.allclose(flat(got.coefficients), flat(ref.coefficients), atol=1e-5, rtol=0)
    assert [h["loss"] for h in got.steps] == pytest.approx([h["loss"] for h in ref.steps], abs=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_sampled_fits_every_coefficient_from_a_few_ingredients_a_step(world, per_layer, monkeypatch):
    """k = 2 of 6: each step reads its two sampled ingredients only (counted), the held-out loss
    falls below the uniform soup's, every ingredient gets a coefficient, and the soup is exactly
    the weighted sum they stand for."""
    model, x, y, paths = world["model"], world["x"], world["y"], world["paths"]
    size = sum(i.nbytes for i in read_header(paths[0])[0].values())  # an ingredient's tensors
    read0 = stream.bytes_read()
    got = learned_soup(paths, model, x, y, mode="sampled", sample=2, per_layer=per_layer, steps=60,
                       lr=0.1, batch_size=64, seed=3, log=QUIET)
    reads = (stream.bytes_read() - read0) / size  # in ingredients
    assert reads == pytest.approx(6 + 2 * 60 + 6)  # the start's soup, two a step, the final soup
    coefficients = [got.coefficients] if not per_layer else list(got.coefficients.values())
    assert all(len(c) == 6 and sum(c) == pytest.approx(1.0, abs=1e-5) for c in coefficients)
    assert any(max(c) - min(c) > 0.05 for c in coefficients)  # they moved away from uniform
    uniform_loss = heldout_loss_and_acc(model, weighted_average(world["states"]), x, y)[0]
    assert heldout_loss_and_acc(model, got.state_dict, x, y)[0] < uniform_loss
    if not per_layer:
        expected = weighted_average(world["states"], got.coefficients)
        assert all(torch.allclose(got.state_dict[k], expected[k], atol=1e-6) for k in expected)
    losses = [h["loss"] for h in got.steps]
    assert sum(losses[-10:]) < sum(losses[:10])


def test_auto_stacks_what_fits_samples_what_does_not():
    """`choose_mode` against held bytes: all N stacked within the budget; else the largest sample
    that fits, up to the one asked for; else streaming."""
    p, n = 1000, 64
    stacked = held_bytes("stacked", p, n)
    assert stacked == p * (64 * 2 + 12) and held_bytes("sampled", p, n, 8) == p * (8 * 4 + 8)
    assert choose_mode(p, n, stacked, 8)[:2] == ("stacked", 64)
    assert choose_mode(p, n, stacked - 1, 8)[:2] == ("sampled", 8)
    assert choose_mode(p, n, held_bytes("sampled", p, n, 3), 8)[:2] == ("sampled", 3)
    mode, _, why = choose_mode(p, n, held_bytes("sampled", p, n, 1) - 1, 8)
    assert mode == "streaming" and "over the budget" in why


def test_auto_says_what_it_chose_and_why(world):
    model, x, y, lines = world["model"], world["x"], world["y"], []
    kw = {"steps": 3, "batch_size": 64, "log": lines.append, "mode": "auto"}
    learned_soup(world["paths"], model, x, y, memory_budget=("bytes", 2**30), **kw)
    assert lines[0].startswith("learned soup: stacked (6 ingredients stacked hold")
    assert lines[0].endswith("within the budget: 1.00 GiB, cook.memory_budget)")
    params = sum(v.numel() for v in world["states"][0].values() if v.is_floating_point())
    tight = held_bytes("sampled", params, 6, 1)  # 1 sampled in float32 holds less than 6 stacked in bf16
    learned_soup(world["paths"], model, x, y, memory_budget=("bytes", tight), sample=5, per_layer=True, **kw)
    assert lines[-2].startswith("learned-layerwise soup: sampled (6 ingredients stacked would hold")
    assert "1 sampled per step" in lines[-2]
    learned_soup(world["paths"], model, x, y, **kw)  # the default: half the host's free memory
    assert re.search(r"50% of the [0-9.]+ GiB free on cpu", lines[-2])
