"""Where and in what precision tensors run: device choice, autocast and loader settings.

The tiny world runs on the CPU in float32; on a GPU the same code trains under autocast (bf16
where the device supports it, else fp16 with a gradient scaler), with pinned-memory loaders and
channels-last images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from orchestrator.config import TrainConfig
from orchestrator.data.splits import LoaderOptions, to_float_images

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Accel:
    """The resolved execution settings of one run."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    loader: LoaderOptions

    def autocast(self):
        """Autocast context for forward passes (a no-op in fp32)."""
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """Gradient scaler: enabled for fp16 only (bf16 has float32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move an image batch, non-blocking from pinned memory, as float in [0, 1], channels-last
        if chosen.

        A uint8 batch (folder splits) crosses as uint8 and is converted on the device: a quarter
        of the bytes over the bus; the conversion is one cheap kernel there.
        """
        x = images_on(x, self.device, non_blocking=self.loader.pin_memory)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put the model on the device (channels-last when chosen)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def images_on(x: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """An image batch on `device` as float in [0, 1]: moved first (uint8 is 4x smaller than
    float32), then converted there. For code that has a device but no `Accel`."""
    return to_float_images(x.to(device, non_blocking=non_blocking))


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; an absent CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but no CUDA device is visible")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def accel_for(cfg: TrainConfig, workers: int = 0) -> Accel:
    """Execution settings for a run: pinned memory and channels-last only on CUDA."""
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    return Accel(device, resolve_precision(cfg.precision, device), cfg.channels_last and cuda,
                 LoaderOptions(workers=workers, pin_memory=cuda))


CPU = Accel(torch.device("cpu"), "fp32", False, LoaderOptions())


def for_resources(gpus: float, loader_workers: int = 0) -> Accel:
    """Settings for a Ray task or actor given `gpus` (the cook's build, the online soup): CUDA
    when it holds any share of a GPU, else the CPU; automatic precision there, pinned memory on
    CUDA, `loader_workers` loader processes."""
    device = resolve_device("cuda" if gpus > 0 else "cpu")
    return Accel(device, resolve_precision("auto", device), False,
                 LoaderOptions(workers=loader_workers, pin_memory=device.type == "cuda"))


def for_device(device: torch.device) -> Accel:
    """Evaluation settings for a model already on `device`: the same automatic precision as
    fine-tuning there (bf16 autocast on a GPU that has it, fp32 on the CPU)."""
    cuda = device.type == "cuda"
    return Accel(device, resolve_precision("auto", device), False, LoaderOptions(pin_memory=cuda))
