"""The reasoning-distillation study's smoke profile, end to end through the CLI (every row's code path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill_jax.proj.reasoning import study as reasoning_study

pytestmark = pytest.mark.slow
REPO = Path(__file__).parent.parent
# The smoke study compiles ~15 small programs; XLA's cheaper CPU optimization
# levels cut its compile time about 4x (set in the child: XLA reads them at start).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _study(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "distill_jax", "reproduce-reasoning", "--config=experiments/reasoning_r1.py:smoke",
           f"--results={tmp_path / 'results'}", f"--runs={tmp_path / 'runs'}", "--noprogress", *overrides]
    env = os.environ | {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_smoke_reasoning_study_runs_every_row_and_writes_table_json_and_plot(tmp_path):
    # Two seeds in two worker processes: the path the full profile takes.
    two_seeds = ["--config.seeds=(0,1)", "--config.workers=2"]
    out = _study(tmp_path, *two_seeds)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "reasoning_r1_smoke.json").read_text())
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
    # seq-KD rows exist exactly when the smoke teacher got a verified sample.
    assert ("seqkd" in rows) == (rejection["kept_unique"]["mean"] > 0)
    table = (tmp_path / "results" / "reasoning_r1_smoke.md").read_text()
    assert "| student, GT answers only |" in table and table in out.stdout
    if any(r["curve"] for r in summary["per_seed"]):
        assert (tmp_path / "results" / "reasoning_r1_smoke_samples.png").stat().st_size > 0
    _check_consistency(summary, table, tmp_path / "runs" / "reasoning_r1_smoke")

    # Finished seeds are saved and reused: a re-run trains nothing and gives the same rows.
    seed_files = sorted((tmp_path / "runs" / "reasoning_r1_smoke").glob("seed*.json"))
    assert [f.name for f in seed_files] == ["seed0.json", "seed1.json"]
    stamps = [f.stat().st_mtime_ns for f in seed_files]
    again = _study(tmp_path, *two_seeds)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [f.stat().st_mtime_ns for f in seed_files] == stamps
    resumed = json.loads((tmp_path / "results" / "reasoning_r1_smoke.json").read_text())
    assert resumed["rows"] == rows and resumed["seed_wall_time_s"] == summary["seed_wall_time_s"]

    # The same study name with another config is refused before any training.
    changed = _study(tmp_path, *two_seeds, "--config.student.steps=4")
    assert changed.returncode != 0
    assert "CheckpointMismatchError" in changed.stderr and "run with another config" in changed.stderr


def _cell(values, scale, digits):
    """A table cell from the per-seed values, computed here with numpy: mean, or mean ± sample std."""
    values = [v for v in values if v is not None]
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}"
    return f"{np.mean(values) * scale:.{digits}f} ± {np.std(values, ddof=1) * scale:.{digits}f}"


def _check_consistency(summary, table, seed_dir):
    """What only a working pipeline gives: every number in the JSON and the table traces back to the runs."""
    per_seed, rows, k = summary["per_seed"], summary["rows"], summary["pass_k"]
    config = summary["config"]
    num_train, vocab = config["task"]["num_train"], 22
    # The seed files hold exactly the per-seed results the summary aggregates.
    for seed, result in zip(summary["seeds"], per_seed):
        assert json.loads((seed_dir / f"seed{seed}.json").read_text())["result"] == result
    # Aggregate = mean / sample std / count of the per-seed values.
    for name, stats in rows.items():
        for metric, stat in stats.items():
            values = [r["rows"][name][metric] for r in per_seed if name in r["rows"] and r["rows"][name][metric] is not None]
            assert stat["n"] == len(values), (name, metric)
            if values:
                assert stat["mean"] == pytest.approx(np.mean(values), abs=1e-9), (name, metric)
                assert stat["std"] == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0, abs=1e-9)
    # The markdown table's cells are those numbers, row by row in the summary's order.
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row |")]
    assert len(lines) == len(rows)
    for line, name in zip(lines, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        values = lambda m: [r["rows"][name].get(m) for r in per_seed if name in r["rows"]]
        metrics = ["test", "ood", f"test_pass@{k}", f"ood_pass@{k}"]
        assert cells[1:5] == [_cell(values(m), 100, 1) for m in metrics], (name, line)
        assert cells[-1] == f"{np.mean(values('train_examples')):.0f}"
    for seed_result in per_seed:
        r, extra = seed_result["rows"], seed_result["extra"]
        # Student / teacher ratio of each student row is its test accuracy over the teacher's.
        for name, row in r.items():
            if "ratio_to_teacher" in row:
                best = r["teacher"]["test"] if not name.startswith("multi_") else max(r["teacher"]["test"], r["teacher_b"]["test"])
                assert row["ratio_to_teacher"] == (pytest.approx(row["test"] / best) if best > 0 else None), name
        for name in ("teacher", "teacher_b", "answer_only", "traces", "tokenkd", "tokenkd_top2", "gkd_offpolicy",
                     "gkd_onpolicy", "multi_tokenkd"):
            assert r[name]["train_examples"] == num_train, name  # one row per training problem
        assert r["tokenkd_top2"]["full_logits_bytes_per_token"] == 4 * vocab
        # Rejection sampling: K samples per training problem; what is kept is what seq-KD trains on.
        kept = {}
        for t in "ab":
            stats = extra[f"rejection_sampling_teacher_{t}"]
            assert stats["sampled"] == num_train * config["seqkd"]["num_samples"]
            assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["sampled"])
            # Every covered problem keeps >= 1 unique text, and no more unique texts than accepted samples.
            assert round(stats["problems_covered"] * num_train) <= stats["kept_unique"] <= stats["accepted"]
            kept[t] = stats["kept_unique"]
        assert ("seqkd" in r) == (kept["a"] > 0)
        if kept["a"]:
            assert r["seqkd"]["train_examples"] == kept["a"]
            subset = round(0.5 * kept["a"])
            assert ("seqkd_50pct" in r) == (1 <= subset < kept["a"])
            if "seqkd_50pct" in r:
                assert r["seqkd_50pct"]["train_examples"] == subset
            curve = {p["samples"]: p for p in seed_result["curve"]}
            for name in ("seqkd", "seqkd_50pct"):
                if name in r:
                    point = curve[r[name]["train_examples"]]
                    assert (point["test"], point["ood"]) == (r[name]["test"], r[name]["ood"])
        if kept["a"] + kept["b"]:
            assert r["multi_seqkd"]["train_examples"] == kept["a"] + kept["b"]
        # Training did something: the 60-step teacher's loss is far below an untrained model's ln(vocab) and
        # the 3-step trace student's; the generalized JSD at beta = 1/2 never exceeds ln 2 (forward KL would).
        assert r["teacher"]["final_loss"] < 0.5 * np.log(vocab)
        assert r["teacher"]["final_loss"] < 0.5 * r["traces"]["final_loss"]
        for name in ("gkd_offpolicy", "gkd_onpolicy"):
            assert 0.0 <= r[name]["final_loss"] <= np.log(2.0), name
        for name in ("tokenkd", "tokenkd_top2", "multi_tokenkd"):
            assert r[name]["final_loss"] >= 0.0, name


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    per_seed = [{"rows": {"a": {"test": 0.5, "ood": 0.1}}}, {"rows": {"a": {"test": 0.7, "ood": 0.3}, "b": {"test": 1.0}}}]
    stats = reasoning_study.aggregate(per_seed)
    assert stats["a"]["test"]["mean"] == pytest.approx(0.6)
    assert stats["a"]["test"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert stats["b"]["test"] == {"mean": 1.0, "std": 0.0, "n": 1}
