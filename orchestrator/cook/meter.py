"""What the cook did, phase by phase: forward passes, bytes read, time, and the devices the
model's inputs were on. The same phases are what `soup cook --plan` estimates beforehand.

Forward passes are counted where they happen, by a forward pre-hook on the classifier (one per
image, whether for scoring or for a learned soup's step); bytes are those read from weight files
(`soups.stream.bytes_read`) plus the logit files and downloads the cook adds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from torch import nn

from orchestrator.soups.io.stream import bytes_read

MIB = 1 << 20


@dataclass
class Phase:
    """One phase's totals."""

    name: str
    passes: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.name}: {self.passes:,} forward passes, {self.bytes / MIB:,.1f} MiB read, "
                f"{self.seconds:.1f} s")


class Meter:
    """Totals per phase, and a progress line at the end of each (to `log`)."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.phases: dict[str, Phase] = {}
        self.devices: set[str] = set()
        self.log = log
        self._current: Phase | None = None

    def watch(self, model: nn.Module):
        """Count every image `model` is run on (a hook; returns its handle)."""
        return model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args) -> None:
        x = args[0]
        self.devices.add(str(x.device))
        if self._current is not None:
            self._current.passes += int(x.shape[0])

    def add_bytes(self, n: int) -> None:
        """Bytes read outside `soups.stream` (logit files, downloads) in the current phase."""
        if self._current is not None:
            self._current.bytes += n

    @contextlib.contextmanager
    def phase(self, name: str, quiet: bool = False) -> Iterator[Phase]:
        """Account what runs in the block to phase `name` (totals add up over several blocks)."""
        phase = self.phases.setdefault(name, Phase(name))
        outer, self._current = self._current, phase
        start, read0 = time.perf_counter(), bytes_read()
        try:
            yield phase
        finally:
            phase.seconds += time.perf_counter() - start
            phase.bytes += bytes_read() - read0
            self._current = outer
        if not quiet:
            self.log(phase.line())

    def totals(self) -> list[dict]:
        return [asdict(p) for p in self.phases.values()]


def phase_table(phases: list[dict], planned: dict[str, dict] | None = None) -> list[str]:
    """Lines of a table of phases (with the plan's figures beside them when given)."""
    head = f"{'phase':<22}{'forward passes':>16}{'MiB read':>12}{'seconds':>10}"
    lines = [head + (f"{'planned passes':>16}" if planned else "")]
    for p in phases:
        line = f"{p['name']:<22}{p['passes']:>16,}{p['bytes'] / MIB:>12,.1f}{p['seconds']:>10.1f}"
        if planned:
            line += f"{_planned(planned.get(p['name'])):>16}"
        lines.append(line)
    return lines


def _planned(p: dict | None) -> str:
    if not p or p.get("passes") is None:
        return "?"
    return ("≤ " if p.get("bound") else "") + f"{p['passes']:,}"
