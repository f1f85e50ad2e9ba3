"""Benchmark: orchestration overhead of the tiny sweep.

Runs search_spaces/tiny_digits.yaml on a local Ray into a temporary MLflow store and prints the
sweep's wall time against the ideal: the sum of the trials' own training time divided by the
concurrency. The ratio is what Ray, MLflow logging, process start-up and evaluation cost on top.

    .venv/bin/python benchmarks/sweep_overhead.py [SPACE.yaml]
"""

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    space = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "search_spaces" / "tiny_digits.yaml"
    with tempfile.TemporaryDirectory(prefix="soup-bench-") as tmp:
        home = Path(tmp) / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
        os.environ.update({"HOME": str(home), "RAY_AUTH_MODE": "token",
                           "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token"),
                           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
                           "RAY_USAGE_STATS_ENABLED": "0"})
        os.environ.pop("RAY_ADDRESS", None)
        import ray

        from orchestrator.config import SearchSpace, load_yaml
        from orchestrator.sweep import run_sweep
        from orchestrator.tracking import Tracker

        t0 = time.perf_counter()
        out = run_sweep(space, name="bench", storage_path=f"{tmp}/ray_results")
        wall = time.perf_counter() - t0
        ray.shutdown()
        runs = Tracker().trial_runs(out.experiment_id, out.sweep_id, "FINISHED")
        train = sum(r.data.metrics["train_seconds"] for r in runs)
        conc = load_yaml(SearchSpace, space).sweep.max_concurrent_trials
        ideal = train / conc
        print(f"trials finished: {len(runs)}  concurrency: {conc}")
        print(f"sum of trial training time: {train:.1f}s  ideal wall (sum / concurrency): {ideal:.1f}s")
        print(f"sweep wall time: {wall:.1f}s  overhead ratio (wall / ideal): {wall / ideal:.2f}")


if __name__ == "__main__":
    main()
