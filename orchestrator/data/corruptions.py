"""Synthetic distribution shifts for any task: its test images rotated, noised, blurred or
inverted, at a severity from 1 (mild) to 5 (strong), in the spirit of ImageNet-C's levels.

A corruption is a pure function of the image, its index in the split and a seed, so a shift split
is the same in every process and every run, whichever worker or batch an image lands in. It
works on one (C, H, W) image, uint8 (as read from files) or float in [0, 1] (held in memory), and
returns the same dtype. Scales are relative to the image size, so a severity means the same on a
28-pixel and on a 224-pixel image.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF

# severity 1..5 -> parameter
ROTATE_DEGREES = (10, 20, 30, 45, 60)  # rotated by +-U(d/2, d) degrees
NOISE_STD = (0.04, 0.08, 0.15, 0.25, 0.35)  # Gaussian noise on [0, 1] pixels, one draw for all channels
BLUR_SIGMA = (0.01, 0.02, 0.035, 0.05, 0.08)  # Gaussian blur, sigma as a fraction of the image side
INVERT_MIX = (0.2, 0.4, 0.6, 0.8, 1.0)  # blend toward the negative (1.0: fully inverted)

CORRUPTIONS = ("rotate", "noise", "blur", "invert")


def corrupt(name: str, image: torch.Tensor, severity: int, seed: int, index: int) -> torch.Tensor:
    """Image `index` of a split under corruption `name` at `severity` (1..5), seeded."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    s = severity - 1
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    uint8 = image.dtype == torch.uint8
    x = image.to(torch.float32) / 255 if uint8 else image.to(torch.float32)
    if name == "rotate":
        d = ROTATE_DEGREES[s]
        angle = (d / 2 + d / 2 * float(torch.rand(1, generator=g))) * (1 if float(torch.rand(1, generator=g)) < 0.5 else -1)
        x = TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR)
    elif name == "noise":
        x = (x + NOISE_STD[s] * torch.randn((1, *x.shape[1:]), generator=g)).clamp(0, 1)
    elif name == "blur":
        sigma = max(0.3, BLUR_SIGMA[s] * max(x.shape[1:]))
        kernel = 2 * round(3 * sigma) + 1
        x = TF.gaussian_blur(x[None], [kernel, kernel], [sigma])[0]
    else:
        x = (1 - INVERT_MIX[s]) * x + INVERT_MIX[s] * (1 - x)
    return (x * 255).round().clamp(0, 255).to(torch.uint8) if uint8 else x


class Corrupted(torch.utils.data.Dataset):
    """A split's data set with every image corrupted (`corrupt`), labels unchanged; picklable."""

    def __init__(self, dataset, name: str, severity: int, seed: int):
        self.dataset, self.name, self.severity, self.seed = dataset, name, severity, seed
        # what `splits.fingerprint` digests: the images' names, and how they were corrupted
        self.paths = tuple(f"{p} {name}@{severity} seed {seed}" for p in getattr(dataset, "paths", ()))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return corrupt(self.name, x, self.severity, self.seed, i), y
