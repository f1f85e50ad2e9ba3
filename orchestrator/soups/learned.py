"""The learned soup: mixing coefficients fitted by gradient descent on the held-out loss.

Coefficients are a softmax over per-ingredient *mixing parameters* (unnormalised scores: one
vector globally, or one per parameter tensor), initialised uniform and optimised with Adam
through ``torch.func.functional_call``.
Three ways to get the gradient, one result (up to rounding):

- ``streaming`` (default): memory does not grow with N. Each step builds the mixed weights
  theta = sum_i alpha_i theta_i as a running sum, reading the ingredients chunk by chunk; a
  forward/backward with theta as the leaves gives g = dL/dtheta; then dL/dalpha_i = <g, theta_i>
  is accumulated ingredient by ingredient (tensor by tensor for per-layer coefficients) and
  chained through the softmax to the mixing parameters by autograd. Two model sizes plus activations.
- ``stacked``: every ingredient stacked on the model's device in `stack_dtype` (bfloat16 halves
  the memory), and autograd does the rest; fastest when N models fit.
- ``memory``: the original in-memory formulation (ingredients held as state dicts, autograd
  through a sum of scalar-times-ingredient terms); the reference the others are tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from orchestrator.soups.io.stream import Ingredient, is_file, layout, map_chunks, plan, read_weights
from orchestrator.soups.io.weights import (
    StateDict,
    check_compatible,
    float_keys,
    stream_dots,
    stream_weighted_sum,
)
from orchestrator.soups.recipe import RecipeInputs, RecipeOptions, SoupResult, register
from orchestrator.train.evaluate import eval_mode

MODES = ("streaming", "stacked", "memory")
# Held-out images the cooked learned soup fits its coefficients on, read into memory (ImageNet's
# 2% slice is 25k images; the first 4096 of its seeded permutation are plenty for N coefficients).
HELDOUT_LIMIT = 4096


def _init_mixing(keys: list[str], n: int, per_layer: bool, device) -> dict[str, torch.Tensor]:
    """Zero mixing parameters (a uniform softmax); global mixing shares one vector under ``""``."""
    names = keys if per_layer else [""]
    return {k: torch.zeros(n, device=device, requires_grad=True) for k in names}


def _weights(mixing: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Mixing weights of tensor `key`: its own softmax per layer, else the shared one."""
    return torch.softmax(mixing[key] if key in mixing else mixing[""], dim=0)


def _mixing_weights(mixing: dict[str, torch.Tensor], key: str, trainable: frozenset[str] | None
                    ) -> torch.Tensor:
    """`_weights` for tensor `key`, detached when `key` is not in `trainable`: float buffers (such
    as batch-norm statistics) are mixed with the same coefficients but carry no gradient, the
    model cannot differentiate through them."""
    w = _weights(mixing, key)
    return w if trainable is None or key in trainable else w.detach()


def _mix(states: Sequence[StateDict], mixing: dict[str, torch.Tensor], keys: list[str],
         trainable: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """Differentiable mixed parameters: sum_i softmax(mixing)_i * state_i, tensor by tensor."""
    out = {}
    for k in keys:
        w = _mixing_weights(mixing, k, trainable)
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


def _coefficients(mixing: dict[str, torch.Tensor], keys: list[str], per_layer: bool):
    """Final coefficients as plain floats: a list (global) or tensor name -> list (per layer)."""
    with torch.no_grad():
        if not per_layer:
            return _weights(mixing, "").cpu().tolist()
        return {k: _weights(mixing, k).cpu().tolist() for k in keys}


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


def _settings(options: RecipeOptions) -> dict:
    return {"learned_mode": options.learned_mode}


@register("learned", _settings)
def cook_learned(inputs: RecipeInputs) -> SoupResult:
    """Learned soup: one mixing coefficient per ingredient, fitted on the held-out loss."""
    return _cook(inputs, per_layer=False)


@register("learned-layerwise", _settings)
def cook_learned_layerwise(inputs: RecipeInputs) -> SoupResult:
    """Learned soup by layer: one coefficient per ingredient per parameter tensor, fitted on the held-out loss."""
    return _cook(inputs, per_layer=True)


def _cook(inputs: RecipeInputs, per_layer: bool) -> SoupResult:
    images, labels = inputs.heldout.tensors(limit=HELDOUT_LIMIT)
    return learned_soup(inputs.ingredients, inputs.model, images, labels, per_layer=per_layer,
                        names=inputs.names, log=inputs.log, mode=inputs.options.learned_mode)


def learned_soup(ingredients: Sequence[Ingredient], model: nn.Module, heldout_images: torch.Tensor,
                 heldout_labels: torch.Tensor, per_layer: bool = False, steps: int = 50,
                 lr: float = 0.05, batch_size: int = 256, seed: int = 0,
                 names: Sequence[str] | None = None, log: Callable[[str], None] = print,
                 mode: str = "streaming", stack_dtype: torch.dtype = torch.bfloat16) -> SoupResult:
    """Learn mixing coefficients on the held-out cross-entropy (Adam, seeded mini-batches).

    `ingredients` are safetensors paths or state dicts. `mode` picks how gradients are computed
    (see the module docstring): ``streaming`` holds two model sizes whatever N, ``stacked``
    holds N ingredients in `stack_dtype` on the model's device, ``memory`` is the in-memory
    reference. `model` supplies the architecture only; its own weights are neither used nor
    changed. The returned state dict is exactly the weighted sum given by the returned
    coefficients (built by streaming, in float32). The result's recipe is ``learned``, or
    ``learned-layerwise`` with `per_layer` (then coefficients map each float tensor to its own).
    """
    if mode not in MODES:
        raise ValueError(f"unknown learned-soup mode {mode!r}; known: {', '.join(MODES)}")
    infos = check_compatible(ingredients, names)
    device = next(model.parameters()).device
    keys = float_keys(infos)
    mixing = _init_mixing(keys, len(ingredients), per_layer, device)
    trainable = frozenset(name for name, _ in model.named_parameters())
    step_fn = {"streaming": _StreamingStep, "stacked": _StackedStep, "memory": _MemoryStep}[mode](
        ingredients, infos, keys, device, stack_dtype, trainable)
    opt = torch.optim.Adam(list(mixing.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    with eval_mode(model):  # no dropout: the loss must be a deterministic function of the coefficients
        for step, idx in enumerate(_batches(len(heldout_labels), batch_size, steps, gen)):
            x, y = heldout_images[idx].to(device), heldout_labels[idx].to(device)
            opt.zero_grad()
            loss = step_fn(model, mixing, x, y)  # leaves dL/dmixing in each parameter's .grad
            opt.step()
            history.append({"step": step, "loss": loss})
    del step_fn  # the stacked copies, before the final soup is built
    return _result(ingredients, model, mixing, keys, per_layer, history, heldout_images,
                   heldout_labels, log, mode)


def _fixed(ingredient: Ingredient, infos, keys: list[str], device) -> dict[str, torch.Tensor]:
    """The non-float tensors (integer buffers), copied as they are from `ingredient`."""
    fixed = [k for k in infos if k not in set(keys)]
    state = read_weights(ingredient, fixed) if is_file(ingredient) else ingredient
    return {k: state[k].to(device) for k in fixed}


def _loss(model: nn.Module, params: dict[str, torch.Tensor], x, y) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, params, (x,)), y)


class _MemoryStep:
    """The reference: every ingredient in memory, autograd through the scalar-times-state sum."""

    def __init__(self, ingredients, infos, keys, device, stack_dtype, trainable):
        self.trainable = trainable
        self.keys = keys
        self.states = [{k: v.to(device) for k, v in (read_weights(s) if is_file(s) else s).items()}
                       for s in ingredients]
        self.fixed = {k: v for k, v in self.states[0].items() if k not in set(keys)}

    def __call__(self, model, mixing, x, y) -> float:
        loss = _loss(model, {**self.fixed, **_mix(self.states, mixing, self.keys, self.trainable)}, x, y)
        loss.backward()
        return loss.item()


class _StreamingStep:
    """Two model sizes whatever N: theta streamed in, <g, theta_i> streamed out."""

    def __init__(self, ingredients, infos, keys, device, stack_dtype, trainable):
        self.trainable = trainable
        self.ingredients, self.keys, self.device = ingredients, keys, device
        self.fixed = _fixed(ingredients[0], infos, keys, device)
        self.theta = {k: torch.empty(infos[k].shape, dtype=torch.float32, device=device) for k in keys}

    def __call__(self, model, mixing, x, y) -> float:
        shared = _weights(mixing, "") if "" in mixing else None
        weights = {k: shared if shared is not None else _weights(mixing, k) for k in self.keys}
        with torch.no_grad():
            coefficients = {k: w.tolist() for k, w in weights.items()}
        for t in self.theta.values():  # reused across steps: no new model-sized allocations
            t.grad = None
            t.requires_grad_(False)
        stream_weighted_sum(self.ingredients, coefficients, dtype=torch.float32, device=self.device,
                            into=self.theta)
        grad_keys = [k for k in self.keys if k in self.trainable]  # float buffers get no gradient
        for k in grad_keys:
            self.theta[k].requires_grad_(True)
        loss = _loss(model, {**self.fixed, **self.theta}, x, y)
        loss.backward()
        grads = {k: self.theta[k].grad for k in grad_keys}
        dots = stream_dots(self.ingredients, grads)  # (tensors, ingredients), float64
        _chain(mixing, weights, grad_keys, dots)
        return loss.item()


def _chain(mixing, weights: dict[str, torch.Tensor], keys: list[str], dots: torch.Tensor) -> None:
    """Backpropagate dL/dalpha (per tensor, or summed over tensors for global mixing) through the
    softmax to the mixing parameters' .grad."""
    if "" in mixing:
        w = weights[keys[0]]  # one shared softmax: every key holds the same tensor
        w.backward(dots.sum(0).to(w.dtype))
        return
    torch.autograd.backward([weights[k] for k in keys],
                            [dots[r].to(weights[k].dtype) for r, k in enumerate(keys)])


class _StackedStep:
    """All ingredients stacked on the device and autograd does the rest.

    The stack holds each ingredient's difference from the first one, in `stack_dtype`, beside
    the first in float32: theta = theta_0 + sum_i alpha_i (theta_i - theta_0), as the alphas sum
    to one. Fine-tuned ingredients differ by little, so bfloat16 rounding of the differences
    costs far less than rounding the weights themselves; memory is one float32 model plus N
    in `stack_dtype`.
    """

    def __init__(self, ingredients, infos, keys, device, stack_dtype, trainable):
        self.trainable = trainable
        n, self.keys = len(ingredients), keys
        _check_fits(sum(infos[k].numel for k in keys) * (n * stack_dtype.itemsize + 4), device)
        first = read_weights(ingredients[0]) if is_file(ingredients[0]) else ingredients[0]
        self.fixed = _fixed(first, infos, keys, device)
        self.base = {k: first[k].to(device, torch.float32) for k in keys}
        self.stack = {k: torch.zeros((n, *infos[k].shape), dtype=stack_dtype, device=device) for k in keys}
        del first
        for i, ing in enumerate(ingredients[1:], start=1):  # one ingredient at a time into its slot
            _fill_delta({k: self.stack[k][i] for k in keys}, self.base, ing, keys)

    def __call__(self, model, mixing, x, y) -> float:
        theta = {}
        for k in self.keys:
            s = self.stack[k]
            # (N) x (N, P) contraction in the stack's dtype, added to the float32 base
            w = _mixing_weights(mixing, k, self.trainable)
            theta[k] = self.base[k] + torch.tensordot(w.to(s.dtype), s, dims=1).float()
        loss = _loss(model, {**self.fixed, **theta}, x, y)
        loss.backward()
        return loss.item()


def _fill_delta(into: dict[str, torch.Tensor], base: dict[str, torch.Tensor], ingredient: Ingredient,
                keys: list[str]) -> None:
    """``into[k] = ingredient[k] - base[k]`` (in `into`'s dtype), read chunk by chunk."""
    infos = layout(ingredient)

    def delta(c, w) -> None:
        b = base[c.key].view(-1)[c.start:c.start + c.count]
        x = w.as_float(w.read(0, c), b.device)
        into[c.key].view(-1)[c.start:c.start + c.count].copy_(x - b)

    map_chunks([ingredient], plan(infos, keys), delta)


def _check_fits(nbytes: int, device: torch.device) -> None:
    """Refuse a stack that cannot fit on the accelerator, pointing to the streaming mode."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > 0.9 * free:
        raise ValueError(f"stacked learned soup needs {nbytes / 2**30:.1f} GiB on {device}, "
                         f"{free / 2**30:.1f} GiB free: use mode='streaming'")


def _result(ingredients, model, mixing, keys, per_layer, history, images, labels, log, mode) -> SoupResult:
    """Rebuild the soup from the final coefficients (streamed) and score it on the held-out set."""
    coefficients = _coefficients(mixing, keys, per_layer)
    state = stream_weighted_sum(ingredients, coefficients)
    with eval_mode(model):
        loss, acc = heldout_loss_and_acc(model, state, images, labels)
    # The recipe's name leads the line: the cook's progress lines are told apart by it.
    name = "learned-layerwise" if per_layer else "learned"
    log(f"{name} soup ({mode}): held-out loss {loss:.4f}, accuracy {acc:.2%} after {len(history)} steps")
    return SoupResult(name, state, coefficients, list(range(len(ingredients))), history, acc)
