"""Contrastive pretraining of the tiny CLIP on rendered glyph image-caption pairs.

This produces the committed base checkpoints: the glyph base (`pretrain`, from scratch) and the
Fashion-MNIST world's (`pretrain_fashion`, the glyph base trained further with glyphs beside the
world's captioned "web" slice). Captions that name the same glyph
are all positives for an image (several templates describe one glyph), so the loss is CLIP's
symmetric cross-entropy with multi-positive targets.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from orchestrator import data
from orchestrator.config import DataConfig, ModelConfig
from orchestrator.data import digits, fashion
from orchestrator.train import models
from orchestrator.train.finetune import warmup_cosine

CAPTION_TEMPLATES = {
    "digit": ("a photo of the digit {}.", "the number {}.", "a picture of a {}.",
              "a low resolution photo of the digit {}.", "a blurry digit {}.", "the digit {}"),
    "letter": ("a photo of the letter {}.", "the letter {}.", "a picture of a {}.",
               "a low resolution photo of the letter {}.", "a blurry letter {}.", "the character {}"),
}


def glyph_vocabulary() -> list[tuple[str, str]]:
    """Every (glyph, kind) pair the base model is pretrained on."""
    return [(d, "digit") for d in digits.DIGITS] + [(c, "letter") for c in digits.LETTERS]


def render_pool(n: int, seed: int, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """Render `n` glyph images, 70% digits and 30% letters, with their glyph indices."""
    rng = np.random.default_rng(seed)
    vocab = glyph_vocabulary()
    n_digits = int(n * 0.7)  # the target is digits; letters keep the text tower honest
    digit_ids = rng.integers(0, 10, n_digits)
    letter_ids = rng.integers(10, len(vocab), n - n_digits)
    idx = rng.permutation(np.concatenate([digit_ids, letter_ids]))
    chunks = []
    for start in range(0, n, 2000):
        chunks.append(digits.render_batch([vocab[i][0] for i in idx[start:start + 2000]], rng))
        log(f"rendered {min(start + 2000, n)}/{n} glyphs")
    return torch.cat(chunks), torch.from_numpy(idx)


def _caption_tokens(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    caps, owner = [], []
    for g, (ch, kind) in enumerate(glyph_vocabulary()):
        for t in CAPTION_TEMPLATES[kind]:
            caps.append(t.format(ch))
            owner.append(g)
    return tokenizer(caps), torch.tensor(owner)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, img_glyph: torch.Tensor,
                     txt_glyph: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every caption naming an image's glyph is a positive."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    pos = (img_glyph[:, None] == txt_glyph[None, :]).float()
    i2t = -(pos / pos.sum(1, keepdim=True).clamp(min=1) * logits.log_softmax(1)).sum(1)
    t2i = -(pos.T / pos.T.sum(1, keepdim=True).clamp(min=1) * logits.T.log_softmax(1)).sum(1)
    has_pos = pos.sum(0) > 0
    return i2t.mean() / 2 + t2i[has_pos].mean() / 2


def pretrain(out_dir: str | Path, steps: int = 3000, batch_size: int = 256, pool: int = 40000,
             lr: float = 1e-3, seed: int = 0, log=print) -> Path:
    """Pretrain the tiny CLIP from scratch and write ``<arch>.safetensors`` + ``<arch>.json``."""
    torch.manual_seed(seed)
    cfg = ModelConfig(pretrained=None)
    clip, tokenizer = models.build_clip(cfg, pretrained_weights=False)
    images, glyphs = render_pool(pool, seed, log)
    pp = clip.visual.preprocess_cfg  # normalise exactly as the classifier will
    images = (images - torch.tensor(pp["mean"]).view(1, -1, 1, 1)) / torch.tensor(pp["std"]).view(1, -1, 1, 1)
    tokens, owner = _caption_tokens(tokenizer)
    monitor = lambda: "zero-shot digits: held-out {:.1%}, rendered {:.1%}".format(*_zeroshot_monitor(clip, tokenizer))
    _contrastive(clip, images, glyphs, tokens, owner, steps, batch_size, lr, 200, seed, monitor, log)
    return save_base(clip, out_dir)


def _contrastive(clip, images: torch.Tensor, owners: torch.Tensor, tokens: torch.Tensor,
                 token_owner: torch.Tensor, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
                 monitor, log) -> None:
    """CLIP's contrastive training: random batches of `images` against every caption in `tokens`
    (a caption is a positive of the images whose owner is its owner); `monitor()` every 500 steps."""
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    clip.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, warmup, steps)
        bi = torch.randint(0, len(images), (batch_size,), generator=g)
        loss = contrastive_loss(clip.encode_image(images[bi]), clip.encode_text(tokens),
                                owners[bi], token_owner, clip.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 500 == 0 or step == steps - 1:
            clip.eval()
            log(f"  {monitor()}")
            clip.train()
    clip.eval()


def pretrain_fashion(out_dir: str | Path, steps: int = 1000, batch_size: int = 256, glyph_pool: int = 20000,
                     lr: float = 5e-4, named: float = 0.1, seed: int = 0, log=print) -> Path:
    """The Fashion-MNIST world's base: the glyph base (in `out_dir`, else the committed one)
    trained on, contrastively, with glyphs beside the world's "web" slice of Fashion-MNIST
    (`fashion.WEB`, never the task's images) under captions that name the garment (a share
    `named` of them) or only its kind (the others: "a photo of a shoe", `fashion.KINDS`).
    Writes ``<out_dir>/tiny-clip-fashion.safetensors`` (`models.FASHION_CHECKPOINT`'s name)."""
    torch.manual_seed(seed)
    glyph_base = Path(out_dir) / models.TINY_CHECKPOINT.name  # the glyph base `make base` just wrote
    clip, tokenizer = models.build_clip(ModelConfig(pretrained=str(glyph_base)) if glyph_base.is_file()
                                        else ModelConfig())
    glyph_images, glyphs = render_pool(glyph_pool, seed, log)
    web = data.load_task(fashion.web_config())
    web_images = torch.cat([web.train.tensors()[0], web.heldout.tensors()[0]])  # float in [0, 1]
    web_labels = torch.cat([web.train.labels, web.heldout.labels])
    log(f"web slice: {len(web_images)} Fashion-MNIST train images {fashion.WEB[0]}..{fashion.WEB[1] - 1}")
    g_tokens, g_owner = _caption_tokens(tokenizer)
    # caption owners: the glyphs, then the garments by name, then the kinds
    n_g, n_c = len(glyph_vocabulary()), len(fashion.CLASSNAMES)
    f_caps = [t.format(c) for c in fashion.CLASSNAMES for t in fashion.TEMPLATES]
    f_caps += [t.format(k) for k in fashion.KINDS for t in fashion.KIND_TEMPLATES]
    f_owner = torch.cat([torch.arange(n_c).repeat_interleave(len(fashion.TEMPLATES)),
                         torch.arange(len(fashion.KINDS)).repeat_interleave(len(fashion.KIND_TEMPLATES)) + n_c]) + n_g
    kind_of = torch.tensor([next(k for k, members in enumerate(fashion.KINDS.values()) if c in members)
                            for c in fashion.CLASSNAMES])
    by_name = torch.rand(len(web_labels), generator=torch.Generator().manual_seed(seed)) < named
    web_owner = torch.where(by_name, web_labels, kind_of[web_labels] + n_c)
    log(f"captions: {int(by_name.sum())} by name, {int((~by_name).sum())} by kind only")
    images = torch.cat([glyph_images, web_images])
    owners = torch.cat([glyphs, web_owner + n_g])
    tokens, token_owner = torch.cat([g_tokens, tokenizer(f_caps)]), torch.cat([g_owner, f_owner])
    monitor = lambda: f"zero-shot Fashion-MNIST held-out: {_fashion_monitor(clip, tokenizer):.1%}"
    log(monitor())
    _contrastive(clip, images, owners, tokens, token_owner, steps, batch_size, lr, 50, seed, monitor, log)
    return save_base(clip, out_dir, models.FASHION_CHECKPOINT.stem)


def _fashion_monitor(clip, tokenizer) -> float:
    """Monitor only: zero-shot on the fashion task's held-out split, never test or a shift."""
    from orchestrator.config import SearchSpace, load_yaml
    from orchestrator.train.evaluate import accuracy

    space = load_yaml(SearchSpace, fashion.SPACE).base  # the task's own prompts and class names
    task = data.load_task(space.data)
    model = models.classifier_from_clip(clip, tokenizer, space.data.classnames, space.model.templates)
    return accuracy(model, task.heldout)


def _zeroshot_monitor(clip, tokenizer) -> tuple[float, float]:
    """Monitor only: the held-out digits and rendered digits, never the test split."""
    from orchestrator.train.evaluate import accuracy

    clip.eval()
    model = models.classifier_from_clip(clip, tokenizer, digits.DIGITS, ModelConfig().templates)
    task = data.load_task(DataConfig())
    return accuracy(model, task.heldout), accuracy(model, task.shifts[digits.RENDERED])


def save_base(clip: torch.nn.Module, out_dir: str | Path, stem: str = models.TINY_ARCH_JSON.stem) -> Path:
    """Write the checkpoint as safetensors beside its architecture JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.safetensors"
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(path), metadata={"arch": models.TINY_ARCH_JSON.stem})
    arch_out = out_dir / models.TINY_ARCH_JSON.name
    if arch_out.resolve() != models.TINY_ARCH_JSON.resolve():
        arch_out.write_text(json.dumps(models.arch_config(models.TINY_ARCH_JSON.stem), indent=4))
    return path
