"""open_clip construction, the tiny architecture, and the image classifier with a zero-shot head.

The classifier is CLIP's image tower plus a linear head over L2-normalised features. Its state
dict holds only ``visual.*`` and ``head.*`` tensors: that is what gets fine-tuned and mixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import ASSETS, TINY_ARCH, TINY_PRETRAINED, ModelConfig
from orchestrator.hashing import file_sha256, text_sha256

TINY_ARCH_JSON = ASSETS / f"{TINY_ARCH}.json"
TINY_CHECKPOINT = ASSETS / f"{TINY_ARCH}.safetensors"
FASHION_PRETRAINED = "tiny-fashion"  # the glyph base pretrained further on Fashion-MNIST's web slice
FASHION_CHECKPOINT = ASSETS / "tiny-clip-fashion.safetensors"  # (its architecture: TINY_ARCH_JSON)
COMMITTED = {TINY_PRETRAINED: TINY_CHECKPOINT, FASHION_PRETRAINED: FASHION_CHECKPOINT}
# The tiny CLIP is pretrained on raw [0, 1] pixels: its normalisation is the identity.
TINY_PREPROCESS = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def register_tiny_arch() -> None:
    """Make the tiny architecture known to open_clip under its file stem (idempotent)."""
    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(TINY_ARCH_JSON)


def arch_config(arch: str) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of a named architecture."""
    register_tiny_arch()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(open_clip.list_models())}")
    return cfg


def resolve_pretrained(pretrained: str | None) -> str | None:
    """Map our tags for the committed base checkpoints to their files; pass other tags and paths on."""
    if pretrained in COMMITTED:
        return str(COMMITTED[pretrained])
    if pretrained and pretrained.endswith((".pt", ".pth", ".bin")):
        raise ValueError(f"pretrained {pretrained!r}: only safetensors files are accepted (no pickles)")
    return pretrained


def pretrained_ref(cfg: ModelConfig) -> tuple[str, str]:
    """A (reference, hash) pair identifying the base weights: a file's sha256, or the tag itself."""
    path = resolve_pretrained(cfg.pretrained)
    if path and Path(path).is_file():
        return cfg.pretrained or "", file_sha256(path)
    return cfg.pretrained or "", text_sha256(f"{cfg.arch}:{cfg.pretrained}")


def build_clip(cfg: ModelConfig, pretrained_weights: bool = True) -> tuple[nn.Module, object]:
    """Build the open_clip CLIP model and its tokenizer from a model config; without
    `pretrained_weights` the weights stay at their random initialisation (to be overwritten)."""
    model = _create_clip(cfg, pretrained_weights, "cpu")
    model.eval()
    return model, open_clip.get_tokenizer(cfg.arch)


def _create_clip(cfg: ModelConfig, pretrained_weights: bool, device: str) -> nn.Module:
    register_tiny_arch()
    pretrained = resolve_pretrained(cfg.pretrained) if pretrained_weights else None
    force_pp = TINY_PREPROCESS if cfg.arch == TINY_ARCH else None
    unwanted = _no_weights_wanted(cfg.arch) if not pretrained_weights else contextlib.nullcontext()
    with unwanted:
        return open_clip.create_model(cfg.arch, pretrained=pretrained, load_weights=pretrained_weights,
                                      force_preprocess_cfg=force_pp, device=device)


def classifier_layout(cfg: ModelConfig, n_classes: int) -> dict[str, torch.Tensor]:
    """The classifier's tensors for `n_classes` classes as meta tensors: names, shapes and dtypes
    with no storage, built with nothing read or computed (no weights loaded, no text tower run
    for a zero-shot head). What ingredients are checked against."""
    with torch.device("meta"):
        clip = _create_clip(cfg, False, "meta")
        head = nn.Linear(clip.visual.output_dim, n_classes)
    pp = clip.visual.preprocess_cfg
    return ImageClassifier(clip.visual, head, pp["mean"], pp["std"]).state_dict()


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's warning that `arch` was "initialized randomly", logged by this thread."""

    def __init__(self, arch: str):
        super().__init__()
        self.message = f"No pretrained weights loaded for model '{arch}'. Model initialized randomly."
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread and record.levelno == logging.WARNING
                    and record.getMessage() == self.message)


@contextlib.contextmanager
def _no_weights_wanted(arch: str):
    """Around ``open_clip.create_model(..., load_weights=False)``: open_clip (3.x) offers no way to
    say that no weights are wanted and warns that none were loaded; here that is the request
    (the caller loads its own weights next, or trains from scratch), so that one warning, for
    this architecture and from this thread, is dropped while the call runs. open_clip logs it
    with ``logging.warning``: on the root logger, where the filter sits, and from nowhere else."""
    root = logging.getLogger()
    notice = _RandomInitNotice(arch)
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


@torch.no_grad()
def zeroshot_head(clip: nn.Module, tokenizer, classnames, templates) -> torch.Tensor:
    """Class embeddings from prompts through the text tower: mean of normalised templates."""
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates])
        emb = F.normalize(clip.encode_text(tokens), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows) * clip.logit_scale.exp()


class ImageClassifier(nn.Module):
    """CLIP image tower + linear head on normalised features; takes [0, 1] pixels."""

    def __init__(self, visual: nn.Module, head: nn.Linear, mean, std):
        super().__init__()
        self.visual = visual
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of [0, 1] pixels."""
        return F.normalize(self.visual((x - self.mean) / self.std), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(cfg: ModelConfig, classnames, pretrained_weights: bool = True) -> ImageClassifier:
    """The classifier for `classnames`, with its head initialised zero-shot from the text tower."""
    clip, tokenizer = build_clip(cfg, pretrained_weights)
    return classifier_from_clip(clip, tokenizer, classnames, cfg.templates)


def classifier_from_clip(clip: nn.Module, tokenizer, classnames, templates) -> ImageClassifier:
    """Wrap a CLIP's image tower with a zero-shot head (the classifier shares the tower)."""
    weights = zeroshot_head(clip, tokenizer, classnames, templates)
    head = nn.Linear(weights.shape[1], weights.shape[0])
    with torch.no_grad():
        head.weight.copy_(weights)
        head.bias.zero_()
    pp = clip.visual.preprocess_cfg
    return ImageClassifier(clip.visual, head, pp["mean"], pp["std"])


def describe_arch(arch: str) -> str:
    """A compact, stable JSON string of an architecture, for tags and compatibility checks."""
    return json.dumps(arch_config(arch), sort_keys=True, separators=(",", ":"))
