"""The reasoning-distillation study's tiny profile, end to end through the CLI (every row's code path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill_jax import reasoning_study

pytestmark = pytest.mark.slow
REPO = Path(__file__).parent.parent
# The tiny study compiles ~15 small programs; XLA's cheaper CPU optimization
# levels cut its compile time about 4x (set in the child: XLA reads them at start).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _study(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "distill_jax", "reproduce-reasoning", "--config=experiments/reasoning_r1.py:tiny",
           f"--results={tmp_path / 'results'}", f"--runs={tmp_path / 'runs'}", "--noprogress", *overrides]
    env = os.environ | {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_tiny_reasoning_study_runs_every_row_and_writes_table_json_and_plot(tmp_path):
    # Two seeds in two worker processes: the path the full profile takes.
    two_seeds = ["--config.seeds=(0,1)", "--config.workers=2"]
    out = _study(tmp_path, *two_seeds)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "reasoning_r1_tiny.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["workers"] == 2
    assert all(t > 0 for t in summary["seed_wall_time_s"])
    rows = summary["rows"]
    always = {"teacher", "teacher_b", "answer_only", "traces", "tokenkd", "tokenkd_top2", "gkd_offpolicy",
              "gkd_onpolicy", "multi_tokenkd"}
    assert always <= set(rows), sorted(rows)
    for name, stats in rows.items():
        for metric in ("test", "ood", "test_pass@2", "ood_pass@2"):
            assert 0.0 <= stats[metric]["mean"] <= 1.0, (name, metric)
    assert rows["teacher"]["test"]["n"] == 2  # both seeds aggregated
    assert rows["tokenkd_top2"]["cache_bytes_per_token"]["mean"] == 16
    rejection = summary["rejection_sampling"]["a"]
    assert 0.0 <= rejection["acceptance_rate"]["mean"] <= 1.0
    # seq-KD rows exist exactly when the tiny teacher got a verified sample.
    assert ("seqkd" in rows) == (rejection["kept_unique"]["mean"] > 0)
    table = (tmp_path / "results" / "reasoning_r1_tiny.md").read_text()
    assert "| student, GT answers only |" in table and table in out.stdout
    if any(r["curve"] for r in summary["per_seed"]):
        assert (tmp_path / "results" / "reasoning_r1_tiny_samples.png").stat().st_size > 0

    # Finished seeds are saved and reused: a re-run trains nothing and gives the same rows.
    seed_files = sorted((tmp_path / "runs" / "reasoning_r1_tiny").glob("seed*.json"))
    assert [f.name for f in seed_files] == ["seed0.json", "seed1.json"]
    stamps = [f.stat().st_mtime_ns for f in seed_files]
    again = _study(tmp_path, *two_seeds)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [f.stat().st_mtime_ns for f in seed_files] == stamps
    resumed = json.loads((tmp_path / "results" / "reasoning_r1_tiny.json").read_text())
    assert resumed["rows"] == rows and resumed["seed_wall_time_s"] == summary["seed_wall_time_s"]

    # The same study name with another config is refused before any training.
    changed = _study(tmp_path, *two_seeds, "--config.student.steps=4")
    assert changed.returncode != 0
    assert "CheckpointMismatchError" in changed.stderr and "run with another config" in changed.stderr


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    per_seed = [{"rows": {"a": {"test": 0.5, "ood": 0.1}}}, {"rows": {"a": {"test": 0.7, "ood": 0.3}, "b": {"test": 1.0}}}]
    stats = reasoning_study.aggregate(per_seed)
    assert stats["a"]["test"]["mean"] == pytest.approx(0.6)
    assert stats["a"]["test"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert stats["b"]["test"] == {"mean": 1.0, "std": 0.0, "n": 1}
