"""The learned soup: mixing coefficients fitted by gradient descent on the held-out loss.

Coefficients are a softmax over per-ingredient *mixing parameters* (unnormalised scores: one
vector globally, or one per parameter tensor), initialised uniform and optimised with Adam
through ``torch.func.functional_call``.
Four ways to get the gradient, and ``auto`` to choose between the first two:

- ``auto`` (the cook's default): ``stacked`` when the N ingredients fit the memory budget
  (`choose_mode`), else ``sampled``; ``streaming`` only when even a sample of one does not fit.
- ``sampled``: MEHL-Soup's mini-batch ingredient sampling (Li, Jiang, Liu, Huang, Kwok,
  "Learning Scalable Model Soup on a Single GPU: An Efficient Subspace Training Strategy",
  ECCV 2024, arXiv:2407.03641; github.com/nblt/MEHL-Soup), on this module's softmax
  coefficients: each step mixes and differentiates a seeded random subset of k ingredients, held
  on the device, against the current soup of the rest; the other N - k mixing parameters do not
  move in that step (block coordinate descent). Every ingredient's coefficient comes out. With
  k = N it is the ``memory`` formulation exactly (up to rounding).
- ``streaming``: memory does not grow with N. Each step builds the mixed weights
  theta = sum_i alpha_i theta_i as a running sum, reading the ingredients chunk by chunk; a
  forward/backward with theta as the leaves gives g = dL/dtheta; then dL/dalpha_i = <g, theta_i>
  is accumulated ingredient by ingredient (tensor by tensor for per-layer coefficients) and
  chained through the softmax to the mixing parameters by autograd. Two model sizes plus activations.
- ``stacked``: every ingredient stacked on the model's device in `stack_dtype` (bfloat16 halves
  the memory), and autograd does the rest; fastest when N models fit.
- ``memory``: the original in-memory formulation (ingredients held as state dicts, autograd
  through a sum of scalar-times-ingredient terms); the reference the others are tested against.

Bytes read per learned soup (N ingredients of size S, 50 steps): ``stacked`` 2·N·S (the stack, then
the final soup), ``sampled`` 2·N·S when the ingredients fit in host memory beside a GPU, else
N·S + 50·k·S + N·S; ``streaming`` 101·N·S.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from orchestrator.soups.io.stream import (
    Ingredient,
    is_file,
    layout,
    map_chunks,
    plan,
    read_weights,
)
from orchestrator.soups.io.weights import (
    StateDict,
    check_compatible,
    float_keys,
    stream_dots,
    stream_weighted_sum,
)
from orchestrator.soups.recipe import LEARNED_STEPS, RecipeInputs, RecipeOptions, SoupResult, register
from orchestrator.train.evaluate import eval_mode

MODES = ("auto", "stacked", "sampled", "streaming", "memory")
GIB = 2**30
# The memory budget when none is given (`cook.memory_budget`): this share of the free memory of
# the device the soup is built on (the GPU's, or the host's for a CPU cook).
DEFAULT_BUDGET_SHARE = 0.5


def _size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"
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
    """What makes a learned soup what it is: the mode, the sample size where it is used, and the
    steps where they are not the default (so that the soups cooked before the setting existed keep
    their keys)."""
    out = {"learned_mode": options.learned_mode}
    if options.learned_mode in ("auto", "sampled"):
        out["learned_sample"] = options.learned_sample
    if options.learned_steps != LEARNED_STEPS:
        out["learned_steps"] = options.learned_steps
    return out


# --- how much a mode holds, and the choice between them ----------------------------------------

def free_memory(device: torch.device) -> int:
    """Free bytes on `device`: the GPU's, or the host's available memory for a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def held_in_host(nbytes: int, host_free: int | None = None) -> bool:
    """Whether a sampled soup beside a GPU holds its ingredients (`nbytes` of float32 in all) in
    host memory, read once: when they fit half of the host's free memory (`host_free`, default
    this machine's)."""
    return nbytes <= 0.5 * (free_memory(torch.device("cpu")) if host_free is None else host_free)


def budget_bytes(device: torch.device, budget: tuple[str, float] | None) -> tuple[int, str]:
    """What the learned soup may hold on `device` (bytes), and how that figure was reached.
    `budget`: ``("bytes", n)`` or ``("share", f)`` of the device's free memory (the cook's
    ``cook.memory_budget``, parsed); None: `DEFAULT_BUDGET_SHARE`."""
    kind, value = budget or ("share", DEFAULT_BUDGET_SHARE)
    if kind == "bytes":
        return int(value), "cook.memory_budget"
    free = free_memory(device)
    return int(value * free), f"{value:.0%} of the {_size(free)} free on {device.type}"


def held_bytes(mode: str, params: int, n: int, k: int = 1, stack_itemsize: int = 2) -> int:
    """Bytes a learned soup of `n` ingredients of `params` float values holds on its device in
    `mode`, activations aside: the mixed weights and their gradient in float32 (two model
    sizes), plus ``stacked``: a float32 base and n in the stack's dtype; ``sampled``: the k
    sampled in float32 (its mixed weights are the current soup itself)."""
    if mode == "stacked":
        return params * (n * stack_itemsize + 12)
    if mode == "sampled":
        return params * (4 * min(k, n) + 8)
    return params * 8 * (n + 1) if mode == "memory" else params * 8


def choose_mode(params: int, n: int, budget: int, sample: int, stack_itemsize: int = 2
                ) -> tuple[str, int, str]:
    """``auto``'s choice for `n` ingredients of `params` float values under `budget` bytes:
    (mode, sample size, why). Stacked when all fit; else sampled with the largest sample up to
    `sample` that fits; else streaming (two model sizes, every ingredient read at every step)."""
    stacked = held_bytes("stacked", params, n, stack_itemsize=stack_itemsize)
    if stacked <= budget:
        return "stacked", n, f"{n} ingredients stacked hold {_size(stacked)}, within the budget"
    k = min(sample, n)
    while k > 1 and held_bytes("sampled", params, n, k) > budget:
        k -= 1
    sampled = held_bytes("sampled", params, n, k)
    if sampled <= budget:
        return "sampled", k, (f"{n} ingredients stacked would hold {_size(stacked)}, over the "
                              f"budget; {k} sampled per step hold {_size(sampled)}")
    return "streaming", 0, (f"even one sampled ingredient would hold {_size(sampled)}, over the "
                            "budget; streaming holds two model sizes")


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
    o = inputs.options
    return learned_soup(inputs.ingredients, inputs.model, images, labels, per_layer=per_layer,
                        names=inputs.names, log=inputs.log, mode=o.learned_mode,
                        memory_budget=o.memory_budget, sample=o.learned_sample, steps=o.learned_steps)


def learned_soup(ingredients: Sequence[Ingredient], model: nn.Module, heldout_images: torch.Tensor,
                 heldout_labels: torch.Tensor, per_layer: bool = False, steps: int = LEARNED_STEPS,
                 lr: float = 0.05, batch_size: int = 256, seed: int = 0,
                 names: Sequence[str] | None = None, log: Callable[[str], None] = print,
                 mode: str = "streaming", stack_dtype: torch.dtype = torch.bfloat16,
                 memory_budget: tuple[str, float] | None = None, sample: int = 8) -> SoupResult:
    """Learn mixing coefficients on the held-out cross-entropy (Adam, seeded mini-batches).

    `ingredients` are safetensors paths or state dicts. `mode` picks how gradients are computed
    (see the module docstring): ``streaming`` holds two model sizes whatever N, ``stacked``
    holds N ingredients in `stack_dtype` on the model's device, ``sampled`` mixes `sample` of
    them per step, ``auto`` chooses under `memory_budget` (`choose_mode`; ``("bytes", n)`` or
    ``("share", f)`` of the device's free memory), ``memory`` is the in-memory reference. `model` supplies the architecture only; its own weights are neither used nor
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
    n = len(ingredients)
    if mode == "auto":
        budget, how = budget_bytes(device, memory_budget)
        params = sum(infos[k].numel for k in keys)
        mode, sample, why = choose_mode(params, n, budget, sample, stack_dtype.itemsize)
        log(f"{'learned-layerwise' if per_layer else 'learned'} soup: {mode} ({why}: "
            f"{_size(budget)}, {how})")
    if mode == "sampled":
        step_fn = _SampledStep(ingredients, infos, keys, device, trainable, min(sample, n), seed)
    else:
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
            if isinstance(step_fn, _SampledStep):
                step_fn.after_step(mixing)
            history.append({"step": step, "loss": loss})
    source = step_fn.source() if isinstance(step_fn, _SampledStep) else ingredients
    del step_fn  # the stacked copies, before the final soup is built
    return _result(source, model, mixing, keys, per_layer, history, heldout_images,
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


class _SampledStep:
    """MEHL-Soup's mini-batch ingredient sampling (see the module docstring), on softmax
    coefficients. A step draws a subset S of k ingredients (seeded) and differentiates

        theta = sum_{i in S} w_i theta_i + (r / r.detach()) * D,   r = sum_{j not in S} w_j,

    where D = sum_{j not in S} w_j theta_j is the others' share of the current soup. Its value is
    the current soup; its gradient is the true one with respect to the sampled ingredients' mixing
    parameters (the others' are held: their weights only rescale with the softmax's normaliser,
    which r / r.detach() carries). As in the streaming mode, the model is differentiated once at
    the current soup, g = dL/dtheta, and the chain rule needs only dot products:
    dL/dw_i = <g, theta_i> for i in S and dL/dr = <g, D> / r, with <g, D> = <g, soup> -
    sum_{i in S} w_i <g, theta_i>: no ingredient outside S is read. After the optimizer's step the
    others' mixing parameters are put back and the soup is updated in place from the sampled ones:
    soup' = (r' / r) * (soup - sum_{i in S} w_i theta_i) + sum_{i in S} w'_i theta_i.

    Held on the device: the k sampled ingredients, the soup and its gradient, in float32. The
    ingredients are held in host memory when they are files and the device is a GPU with room
    beside it (read once); otherwise the k of each step are read from their files (on a CPU the
    device's budget is the host's memory: what does not fit one does not fit the other).
    """

    def __init__(self, ingredients, infos, keys, device, trainable, k: int, seed: int):
        self.keys, self.device, self.trainable = keys, device, trainable
        self.ingredients, self.n, self.k = ingredients, len(ingredients), k
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.fixed = _fixed(ingredients[0], infos, keys, device)
        self.host = None
        if not any(is_file(i) for i in ingredients):
            self.host = list(ingredients)
        elif device.type == "cuda" and held_in_host(self.n * sum(infos[k].numel * 4 for k in keys)):
            self.host = [read_weights(i) for i in ingredients]
        self.soup: dict[str, torch.Tensor] | None = None

    def source(self):
        """What the final soup is built from: the host copies when they were read."""
        return self.host if self.host is not None else self.ingredients

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        sd = self.host[i] if self.host is not None else read_weights(self.ingredients[i], self.keys)
        return {k: sd[k].to(self.device, torch.float32) for k in self.keys}

    def __call__(self, model, mixing, x, y) -> float:
        if self.soup is None:  # the current soup: one pass over every ingredient
            with torch.no_grad():
                weights = {k: _weights(mixing, k).tolist() for k in self.keys}
            self.soup = stream_weighted_sum(self.source(), weights, dtype=torch.float32, device=self.device)
        self.chosen = torch.randperm(self.n, generator=self.gen)[:self.k].sort().values.tolist()
        self.mask = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.mask[self.chosen] = True
        self.states = [self._load(i) for i in self.chosen]
        self.before = {name: m.detach().clone() for name, m in mixing.items()}
        grad_keys = [k for k in self.keys if k in self.trainable]  # float buffers get no gradient
        for k in grad_keys:
            self.soup[k].requires_grad_(True)
        loss = _loss(model, {**self.fixed, **self.soup}, x, y)
        loss.backward()
        with torch.no_grad():  # <g, theta_i> for the sampled, <g, soup>, per tensor, in float64
            dots, at_soup = [], []
            for k in grad_keys:
                g = self.soup[k].grad.view(-1).double()
                dots.append(torch.stack([torch.dot(g, st[k].view(-1).double()) for st in self.states]))
                at_soup.append(torch.dot(g, self.soup[k].detach().view(-1).double()))
        for k in grad_keys:
            self.soup[k].grad = None
            self.soup[k].requires_grad_(False)
        surrogate = 0.0  # its gradient with respect to the mixing parameters is dL/dmixing
        for r, k in enumerate(grad_keys):
            m = mixing[k] if k in mixing else mixing[""]
            w = torch.softmax(torch.where(self.mask, m, m.detach()), dim=0)
            d = dots[r].to(w.dtype)
            surrogate = surrogate + (w[self.chosen] * d).sum()
            if self.k < self.n:
                rest = w[~self.mask].sum()
                d_rest = at_soup[r].to(w.dtype) - (w.detach()[self.chosen] * d).sum()
                surrogate = surrogate + rest / rest.detach() * d_rest
        surrogate.backward()
        return loss.item()

    @torch.no_grad()
    def after_step(self, mixing) -> None:
        """Put back the mixing parameters of the ingredients not sampled; update the soup in place."""
        for name, m in mixing.items():
            m[~self.mask] = self.before[name][~self.mask]
        for key in self.keys:
            new, old = _weights(mixing, key), _weights(self.before, key)
            s = self.soup[key]
            if self.k < self.n:
                for i, st in zip(self.chosen, self.states):
                    s.add_(st[key], alpha=-old[i].item())
                s.mul_((new[~self.mask].sum() / old[~self.mask].sum()).item())
            else:
                s.zero_()
            for i, st in zip(self.chosen, self.states):
                s.add_(st[key], alpha=new[i].item())
        self.states = []


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
