"""The tiny world's data: rendered glyphs, the UCI handwritten digits and their distribution shifts.

Glyphs (digits and letters in Pillow's bundled font, degraded) are what the tiny base model is
pretrained on; the digits, upsampled to 32 px and split into train / held-out / test, are the
target task; the shifts are the test digits rotated, noised, blurred, inverted, and digits
rendered in the pretraining style. Every split is held in memory and is a pure function of its
seed.
"""

from __future__ import annotations

import os
import string
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

from orchestrator.config import DataConfig
from orchestrator.data.splits import TaskData, TensorSplit
from orchestrator.hashing import text_sha256

IMAGE_SIZE = 32
DIGITS = tuple(str(d) for d in range(10))
LETTERS = tuple(string.ascii_uppercase) + tuple(string.ascii_lowercase)
SHIFT_SEED_OFFSET = 1000  # shifts use their own random stream, independent of the split seed

NAME = "tiny_digits"  # ``data.dataset`` of this world
RENDERED = "rendered"  # digits rendered in the pretraining style (the base's own check)
SHIFTS = ("rotate", "noise", "blur", "invert", RENDERED)  # its own shifts (and its default)


# --- rendered glyphs (pretraining style) -------------------------------------------------------

@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw(ch: str, rng: np.random.Generator) -> Image.Image:
    canvas = Image.new("L", (96, 96), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(rng.integers(0, 5))
    draw.text((48, 48), ch, fill=255, font=_font(int(rng.integers(28, 48))), anchor="mm",
              stroke_width=stroke, stroke_fill=255)
    shear = float(rng.uniform(-0.3, 0.3))
    canvas = canvas.transform(canvas.size, Image.AFFINE, (1, shear, -shear * 48, 0, 1, 0),
                              resample=Image.BILINEAR)
    return canvas.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)


def _fit(glyph: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Crop the glyph to its ink and place it in a `size` box at a random scale and offset."""
    box = glyph.getbbox() or (0, 0, glyph.width, glyph.height)
    glyph = glyph.crop(box)
    scale = rng.uniform(0.55, 1.0) * size / max(glyph.size)
    w, h = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
    glyph = glyph.resize((w, h), Image.BILINEAR)
    out = Image.new("L", (size, size), 0)
    x = int(rng.integers(0, size - w + 1))
    y = int(rng.integers(0, size - h + 1))
    out.paste(glyph, (x, y))
    return out


def _fit_centered(glyph: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Size-normalise and centre the glyph, as NIST-style preprocessing does to handwriting."""
    glyph = glyph.crop(glyph.getbbox() or (0, 0, glyph.width, glyph.height))
    h = round(size * rng.uniform(0.85, 1.0))
    w = min(size, max(2, round(glyph.width * h / glyph.height * rng.uniform(0.8, 1.2))))
    glyph = glyph.resize((w, h), Image.BILINEAR)
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, ((size - w) // 2 + int(rng.integers(-1, 2)), (size - h) // 2))
    return out


def _degrade(img: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    """Low resolution (as coarse as the 8x8 digits), blur and noise: the pretraining corruptions."""
    if rng.random() < 0.7:
        res = int(rng.choice([8, 8, 8, 10, 12, 16]))
        small = np.asarray(img.resize((res, res), Image.BOX), dtype=np.float32)
        if rng.random() < 0.5:
            small = np.round(small / 255 * 16) / 16 * 255  # the digits' 17 grey levels
        img = Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if rng.random() < 0.3:
        t = torch.from_numpy(arr)[None]
        arr = TF.gaussian_blur(t, [5, 5], [float(rng.uniform(0.3, 1.5))])[0].numpy()
    arr = arr + rng.normal(0, rng.uniform(0, 0.08), arr.shape).astype(np.float32)
    return np.clip(arr, 0.0, 1.0)


def render_glyph(ch: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render one glyph in the pretraining style as an (H, W) float array in [0, 1]."""
    fit = _fit_centered if rng.random() < 0.5 else _fit
    return _degrade(fit(_draw(ch, rng), rng, size), rng, size)


def render_batch(chars: list[str], rng: np.random.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render several glyphs into an (N, 3, H, W) tensor."""
    arr = np.stack([render_glyph(c, rng, size) for c in chars])
    return torch.from_numpy(arr)[:, None].expand(-1, 3, -1, -1).contiguous()


# --- the digits target task ----------------------------------------------------------------------

# The 1,797 8x8 digits of the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin
# and C. Kaynak, 1998; CC BY 4.0), exactly as scikit-learn's `load_digits` returns them (pixels
# 0-16; tests/data/test_data.py compares them). Shipped so that building the world does
# not import scikit-learn for them: 0.8 s of every fresh store's first sweep, which waits for it.
DIGITS_FILE = Path(__file__).resolve().parents[1] / "assets" / "digits.npz"


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(DIGITS_FILE, allow_pickle=False) as d:
        images, target = d["images"], d["target"]
    x = torch.tensor(images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous().clamp(0, 1), torch.tensor(target, dtype=torch.int64)


def _stratified_split(labels: torch.Tensor, cfg: DataConfig) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(cfg.split_seed)
    train, held, test = [], [], []
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
        n_test = round(len(idx) * cfg.test_fraction)
        n_held = round(len(idx) * cfg.heldout_fraction)
        test.append(idx[:n_test])
        held.append(idx[n_test:n_test + n_held])
        train.append(idx[n_test + n_held:])
    return tuple(np.sort(np.concatenate(p)) for p in (train, held, test))


def _rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    angles = (torch.rand(len(x), generator=g) * 30 + 25) * torch.where(
        torch.rand(len(x), generator=g) < 0.5, -1.0, 1.0)
    return torch.stack([TF.rotate(img, float(a), interpolation=TF.InterpolationMode.BILINEAR)
                        for img, a in zip(x, angles)])


def make_shift(name: str, test: TensorSplit, seed: int) -> TensorSplit:
    """Derive the distribution-shift split `name` from the test split (or render it afresh)."""
    g = torch.Generator().manual_seed(seed)
    if name == "rotate":
        x = _rotate(test.images, g)
    elif name == "noise":
        noise = torch.randn((len(test), 1, *test.images.shape[2:]), generator=g)  # grey, like the digits
        x = (test.images + 0.35 * noise).clamp(0, 1)
    elif name == "blur":
        x = TF.gaussian_blur(test.images, [9, 9], [2.5])
    elif name == "invert":
        x = 1.0 - test.images
    elif name == "rendered":
        rng = np.random.default_rng(seed)
        labels = torch.arange(500) % 10
        return TensorSplit(name, render_batch([DIGITS[i] for i in labels], rng), labels)
    else:
        raise ValueError(f"unknown shift {name!r}")
    return TensorSplit(name, x.contiguous(), test.labels)


def load_digits_task(cfg: DataConfig) -> TaskData:
    """The digits task: fixed train / held-out / test splits and the configured shifts.

    Building it takes seconds (upsampling the digits, rendering the glyph shift), which every
    sweep trial would pay again in its fresh worker process; so the built tensors are kept in a
    safetensors file in the user's cache folder, named by the digest of this module's source and
    of the data config (a changed recipe or config is a different file). A file that cannot be
    read is rebuilt."""
    path = _cache_path(cfg)
    try:
        return _task_from(load_file(str(path)), cfg)
    except Exception:  # noqa: BLE001 - absent, partial or stale: build it
        pass
    task = _build_digits_task(cfg)
    tensors = {f"{n}.{k}": v.clone() for n, sp in {"train": task.train, "heldout": task.heldout,
                                                         "test": task.test, **task.shifts}.items()
               for k, v in (("images", sp.images), ("labels", sp.labels))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)  # atomic: a concurrent trial reads the old file or the new one
    except OSError:
        pass  # a read-only cache folder only costs the rebuild
    return task


def _cache_path(cfg: DataConfig) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-soup"
    key = text_sha256(Path(__file__).read_text() + cfg.model_dump_json())[:24]
    return root / f"tinyworld-{key}.safetensors"


def _source(cfg: DataConfig) -> str:
    return f"sklearn.datasets.load_digits (orchestrator/data/digits.py, split seed {cfg.split_seed})"


def _shifts(cfg: DataConfig) -> tuple[str, ...]:
    return SHIFTS if cfg.shifts is None else cfg.shifts


def _task_from(t: dict[str, torch.Tensor], cfg: DataConfig) -> TaskData:
    def split(name: str) -> TensorSplit:
        return TensorSplit(name, t[f"{name}.images"], t[f"{name}.labels"])
    return TaskData(DIGITS, split("train"), split("heldout"), split("test"),
                    {s: split(s) for s in _shifts(cfg)}, source=_source(cfg))


def _build_digits_task(cfg: DataConfig) -> TaskData:
    x, y = _digits()
    tr, he, te = _stratified_split(y, cfg)
    test = TensorSplit("test", x[te], y[te])
    shifts = {s: make_shift(s, test, cfg.split_seed + SHIFT_SEED_OFFSET + i)
              for i, s in enumerate(_shifts(cfg))}
    return TaskData(DIGITS, TensorSplit("train", x[tr], y[tr]), TensorSplit("heldout", x[he], y[he]),
                    test, shifts, source=_source(cfg))
