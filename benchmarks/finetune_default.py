"""Benchmark: one fine-tune with the default hyperparameters; prints test accuracy and wall time.

    .venv/bin/python benchmarks/finetune_default.py
"""

import os
import time

import torch

from orchestrator.config import FinetuneConfig
from orchestrator.train.finetune import finetune


def main() -> None:
    cfg = FinetuneConfig()
    t0 = time.perf_counter()
    res = finetune(cfg)
    wall = time.perf_counter() - t0
    print(f"cores={os.cpu_count()} torch_threads={torch.get_num_threads()} "
          f"epochs={cfg.train.epochs} batch={cfg.train.batch_size} lr={cfg.train.lr}")
    print(f"test accuracy {res.test_acc:.1%}  held-out {res.heldout_acc:.1%}  "
          f"shift mean {res.shift_mean:.1%}")
    print(f"wall time {wall:.1f}s (training {res.train_seconds:.1f}s, budget 120s)")


if __name__ == "__main__":
    main()
