"""The learned soup: mixing coefficients fitted by gradient descent on the held-out loss.

Coefficients are a softmax over per-ingredient logits (one set globally, or one per parameter
tensor), initialised uniform and optimised with Adam through ``torch.func.functional_call``.
The soup is built as a sum of scalar-times-ingredient terms, so autograd keeps references to the
ingredients rather than stacked copies: a step costs a few model sizes, not N.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .registry import SoupResult, register
from .weights import StateDict, check_compatible, weighted_average


def mixable(state: StateDict) -> list[str]:
    """The tensors the coefficients mix: floating ones (integer buffers are copied as-is)."""
    return [k for k, v in state.items() if v.is_floating_point()]


def weighted_sum_per_tensor(states: Sequence[StateDict], coefficients: dict[str, Sequence[float]]
                            ) -> dict[str, torch.Tensor]:
    """Per-tensor weighted sum in float32 (same arithmetic as `weighted_average`, which it
    equals when every tensor has the same coefficients)."""
    out = {}
    for k, ref in states[0].items():
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for c, sd in zip(coefficients[k], states):
            acc.add_(sd[k].float(), alpha=float(c))
        out[k] = acc.to(ref.dtype)
    return out


def _init_logits(keys: list[str], n: int, per_layer: bool, device) -> dict[str, torch.Tensor]:
    """Zero logits (uniform softmax); global mixing shares one vector under the key ``""``."""
    names = keys if per_layer else [""]
    return {k: torch.zeros(n, device=device, requires_grad=True) for k in names}


def _weights(logits: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Mixing weights of tensor `key`: its own softmax per layer, else the shared one."""
    return torch.softmax(logits[key] if key in logits else logits[""], dim=0)


def _mix(states: Sequence[StateDict], logits: dict[str, torch.Tensor], keys: list[str]
         ) -> dict[str, torch.Tensor]:
    """Differentiable mixed parameters: sum_i softmax(logits)_i * state_i, tensor by tensor."""
    out = {}
    for k in keys:
        w = _weights(logits, k)
        out[k] = sum(w[i] * sd[k] for i, sd in enumerate(states))
    return out


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """`steps` index batches drawn from seeded permutations of the held-out set."""
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n and pos > 0:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size


def _coefficients(logits: dict[str, torch.Tensor], keys: list[str], per_layer: bool):
    """Final coefficients as plain floats: a list (global) or tensor name -> list (per layer)."""
    with torch.no_grad():
        if not per_layer:
            return _weights(logits, "").cpu().tolist()
        return {k: _weights(logits, k).cpu().tolist() for k in keys}


@torch.no_grad()
def heldout_loss_and_acc(model: nn.Module, state: StateDict, images: torch.Tensor,
                         labels: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of `model` with weights `state` on a held-out set."""
    device = next(model.parameters()).device
    state = {k: v.to(device) for k, v in state.items()}
    loss, correct = 0.0, 0
    for i in range(0, len(labels), batch_size):
        x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        out = functional_call(model, state, (x,))
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    return loss / len(labels), correct / len(labels)


@register("learned")
def learned_soup(states: Sequence[StateDict], model: nn.Module, heldout_images: torch.Tensor,
                 heldout_labels: torch.Tensor, per_layer: bool = False, steps: int = 50,
                 lr: float = 0.05, batch_size: int = 256, seed: int = 0,
                 names: Sequence[str] | None = None, log: Callable[[str], None] = print) -> SoupResult:
    """Learn mixing coefficients on the held-out cross-entropy (Adam, seeded mini-batches).

    `model` supplies the architecture only; its own weights are neither used nor changed. The
    returned state dict is exactly the weighted sum given by the returned coefficients.
    """
    if not states:
        raise ValueError("no ingredients for a learned soup")
    check_compatible(states, names)
    device = next(model.parameters()).device
    dev_states = [{k: v.to(device) for k, v in sd.items()} for sd in states]
    keys = mixable(states[0])
    logits = _init_logits(keys, len(states), per_layer, device)
    opt = torch.optim.Adam(list(logits.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history, was_training = [], model.training
    model.eval()  # no dropout: the loss must be a deterministic function of the coefficients
    try:
        for step, idx in enumerate(_batches(len(heldout_labels), batch_size, steps, gen)):
            x, y = heldout_images[idx].to(device), heldout_labels[idx].to(device)
            loss = F.cross_entropy(functional_call(model, _mix(dev_states, logits, keys), (x,)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": loss.item()})
    finally:
        model.train(was_training)
    return _result(states, model, logits, keys, per_layer, history, heldout_images, heldout_labels, log)


def _result(states, model, logits, keys, per_layer, history, images, labels, log) -> SoupResult:
    """Rebuild the soup from the final coefficients and score it on the held-out set."""
    coefficients = _coefficients(logits, keys, per_layer)
    state = (weighted_sum_per_tensor(states, coefficients) if per_layer
             else weighted_average(states, coefficients))
    was_training = model.training
    model.eval()
    loss, acc = heldout_loss_and_acc(model, state, images, labels)
    model.train(was_training)
    log(f"learned soup ({'per layer' if per_layer else 'global'}): held-out loss {loss:.4f}, "
        f"accuracy {acc:.2%} after {len(history)} steps")
    return SoupResult("learned", state, coefficients, list(range(len(states))), history, acc)
