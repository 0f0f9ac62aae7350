"""The reasoning-distillation study: its parts (strength picks, verifiers, splits, intervals) and the smoke profile end to end."""

import json

import numpy as np
import pytest

from distill_jax.proj import stats
from distill_jax.proj.reasoning import study
from distill_jax.proj.reasoning import task as R
from study_cli import run_study


# ------------------------------------------------------------------ parts


def test_strengths_are_picked_on_the_validation_curve():
    curve = [(100, 0.1), (200, 0.55), (300, 0.68), (400, 0.97), (500, 0.97), (600, 0.95)]
    assert study._pick_strengths(curve, (0.5, 0.7)) == {"weak": 1, "strong": 3}  # first in range; earliest best
    # Nothing in range: the checkpoint closest to its middle.
    assert study._pick_strengths([(1, 0.2), (2, 0.45), (3, 1.0)], (0.5, 0.7)) == {"weak": 1, "strong": 2}


def test_the_trace_verifier_checks_every_step_the_answer_verifier_only_the_answer():
    p = R.Problem(347, 598)
    good = R.completion(p)  # <think>7+8+0=15;4+9+1=14;3+5+1=09;</think>A:945<eos>
    wrong_step = good.replace("4+9+1=14", "4+9+1=13")
    wrong_carry = good.replace("4+9+1=14", "4+9+0=14")
    no_trace = R.completion(p, "answer")
    assert R.verify(p, good) and R.verify_trace(p, good)
    for text in (wrong_step, wrong_carry, no_trace):
        assert R.verify(p, text) and not R.verify_trace(p, text), text
    assert not R.verify_trace(p, good.replace("A:945", "A:946"))
    assert R.verify_trace(p, R.TOKENIZER.encode(good) + [R.PAD, R.PAD])  # after <eos>: ignored
    assert not R.verify_trace(p, R.TOKENIZER.encode(good)[:-1])  # no <eos>


def test_study_splits_are_disjoint_and_ood_holds_only_the_held_out_length_pairs():
    s = R.make_study_splits(5, num_train=600, num_val=100, num_test=200, num_ood=80, max_digits=3, held_out=((1, 3), (3, 1)),
                            held_out_units=())
    assert [len(s[k]) for k in ("train", "val", "test", "ood")] == [600, 100, 200, 80]
    sets = {k: set(v) for k, v in s.items()}
    for a in sets:
        for b in sets:
            if a < b:
                assert not sets[a] & sets[b], (a, b)
    assert {R.operand_lengths(p) for p in s["ood"]} == {(1, 3), (3, 1)}
    seen = {R.operand_lengths(p) for k in ("train", "val", "test") for p in s[k]}
    assert not seen & {(1, 3), (3, 1)} and (3, 3) in seen and (2, 1) in seen
    assert R.make_study_splits(5, num_train=600, num_val=100, num_test=200, num_ood=80, held_out=((1, 3), (3, 1)),
                               held_out_units=()) == s  # deterministic
    # Held-out units digits: the OOD split has exactly those, no other split has any.
    units = {(3, 8), (8, 3), (6, 6)}
    s = R.make_study_splits(6, num_train=600, num_val=100, num_test=200, num_ood=90, held_out_units=sorted(units))
    assert {(p.a % 10, p.b % 10) for p in s["ood"]} == units
    assert not any((p.a % 10, p.b % 10) in units for k in ("train", "val", "test") for p in s[k])
    assert len({R.operand_lengths(p) for p in s["ood"]}) > 3  # every length pair takes part
    with pytest.raises(ValueError, match="not operand lengths"):
        R.make_study_splits(0, num_train=1, num_val=1, num_test=1, num_ood=1, max_digits=2, held_out=((1, 3),))


def test_bootstrap_interval_matches_the_binomial_width_and_pairs_differences():
    rng = np.random.default_rng(0)
    p, n = 0.7, 2000
    scores = (rng.random((1, n)) < p).astype(float)
    ci = stats.bootstrap_ci(scores, num_resamples=4000)
    half = 1.96 * np.sqrt(scores.mean() * (1 - scores.mean()) / n)  # normal approximation, independent formula
    assert ci["low"] < scores.mean() < ci["high"]
    assert (ci["high"] - ci["low"]) / 2 == pytest.approx(half, rel=0.1)
    # Paired: two rows that differ on 30 of 2000 problems have a tight interval around +1.5 points,
    # much tighter than either row's own interval.
    other = scores.copy()
    flips = np.flatnonzero(other[0] == 1)[:30]
    other[0, flips] = 0
    d = stats.bootstrap_ci(scores - other)
    assert d["mean"] == pytest.approx(30 / n) and 0 < d["low"] < d["high"] < 0.025
    # Seeds add their spread: 5 seeds with different means give a wider interval than one.
    seeds = np.stack([(rng.random(n) < q).astype(float) for q in (0.5, 0.6, 0.7, 0.8, 0.9)])
    wide = stats.bootstrap_ci(seeds)
    assert wide["high"] - wide["low"] > 3 * (ci["high"] - ci["low"])
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci(np.array([[1.0, np.nan]]))


# ------------------------------------------------------------------ the smoke profile, end to end


def _study(tmp_path, *overrides):
    return run_study("reproduce-reasoning", "experiments/reasoning_r1.py:smoke", tmp_path, *overrides)


@pytest.mark.slow
def test_smoke_study_runs_every_row_and_every_number_traces_back_to_the_runs(tmp_path):
    two_seeds = ["--config.seeds=(0,1)", "--config.workers=2"]  # two worker processes: the path of the full profile
    out = _study(tmp_path, *two_seeds)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "reasoning_r1_smoke.json").read_text())
    summary, config = record["summary"], record["config"]
    run_dir = tmp_path / "runs" / "reasoning_r1_smoke"
    shared = json.loads((run_dir / "teachers.json").read_text())
    per_seed = [json.loads((run_dir / f"seed{s}.json").read_text())["result"] for s in (0, 1)]
    task = study._Task(study.ml_collections.ConfigDict(config))
    test, train = task.splits["test"], task.splits["train"]

    # Teacher strengths: the picks the validation curve gives; their scores are what the summary reports.
    curve = [tuple(p) for p in shared["val_curve"]]
    picks = study._pick_strengths(curve, config["teacher"]["weak_range"])
    for strength, index in picks.items():
        t = shared["teachers"][strength]
        assert (t["step"], t["val"]) == curve[index]
        assert summary["teachers"][strength]["test"]["mean"] == pytest.approx(np.mean([c == "1" for c in t["test_correct"]]))
        assert len(t["test_correct"]) == len(test) and len(t["ood_correct"]) == config["task"]["num_ood"]
    # Pools: what each verifier accepts of the teacher's outputs, distinct per problem.
    for strength, pool in shared["pools"].items():
        pairs, st = pool["pairs"], pool["stats"]
        assert all(R.verify(train[i], text) for i, text in pairs["answer"])
        assert all(R.verify_trace(train[i], text) for i, text in pairs["trace"])
        assert {tuple(p) for p in pairs["trace"]} <= {tuple(p) for p in pairs["answer"]}
        assert len({tuple(p) for p in pairs["answer"]}) == len(pairs["answer"]) == st["answer_pool"]
        assert st["sampled"] == len(train) * config["samples"]["num_samples"]
        assert st["trace_acceptance"] <= st["answer_acceptance"]
    assert shared["pools"]["strong"]["stats"]["answer_pool"] > 0  # else the KD rows below did not run

    rows = summary["rows"]
    expected = {"gt_answers", "gt_traces"} | {f"strong_{r}" for r in ("greedy", "answer", "trace", "tokenkd", "gkd", "sft_more")}
    assert expected <= set(rows), sorted(rows)
    k = summary["pass_k"]
    for name, row in rows.items():
        bits = np.stack([[c == "1" for c in r["rows"][name]["test_correct"]] for r in per_seed]).astype(float)
        assert row["test"]["mean"] == pytest.approx(bits.mean()) and row["test"]["low"] <= bits.mean() <= row["test"]["high"]
        assert row["train_examples"] == per_seed[0]["rows"][name]["train_examples"]
        for r in per_seed:  # the checkpoint is the best on validation (the earliest of equals)
            seed_row = r["rows"][name]
            best = max(a for _, a in seed_row["val_curve"])
            assert seed_row["val"] == best and seed_row["step"] == next(s for s, a in seed_row["val_curve"] if a == best)
        strength = name.split("_")[0]
        if strength in study.STRENGTHS:
            teacher = np.array([c == "1" for c in shared["teachers"][strength]["test_correct"]], float)
            assert row["minus_teacher"]["mean"] == pytest.approx(bits.mean() - teacher.mean())
            assert f"minus_teacher_pass@{k}" in row
    # Each row trains on its pool: KD, GKD and its control on the answer-verified one.
    for strength in study.STRENGTHS:
        st = shared["pools"][strength]["stats"]
        for name, pool in (("greedy", "greedy"), ("answer", "answer"), ("trace", "trace"), ("tokenkd", "answer"),
                           ("gkd", "answer"), ("sft_more", "answer")):
            if f"{strength}_{name}" in rows:
                assert rows[f"{strength}_{name}"]["train_examples"] == st[f"{pool}_pool"], (strength, name)
    assert rows["gt_traces"]["train_examples"] == len(train)
    gkd = summary["comparisons"]["strong: on-policy GKD minus compute-matched SFT"]
    assert gkd["rows"] == ["strong_gkd", "strong_sft_more"]
    best = summary["best_student"]["strong"]
    assert rows[best]["val"] == max(r["val"] for n, r in rows.items() if n.startswith("strong_") and not n.endswith("pct"))
    report = (tmp_path / "results" / "reasoning_r1_smoke.md").read_text()
    assert report in out.stdout and "| strong_gkd |" in report and "on-policy GKD minus compute-matched SFT" in report
    for plot in ("samples", "student_minus_teacher"):
        assert (tmp_path / "results" / f"reasoning_r1_smoke_{plot}.png").stat().st_size > 0

    # Every stage is saved and reused: a re-run trains nothing and reports the same rows.
    files = sorted(run_dir.glob("*.json")) + [run_dir / "teachers.msgpack"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _study(tmp_path, *two_seeds)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert json.loads((tmp_path / "results" / "reasoning_r1_smoke.json").read_text())["summary"]["rows"] == rows
    # The same study name with another config is refused before any training.
    changed = _study(tmp_path, *two_seeds, "--config.student.steps=6")
    assert changed.returncode != 0 and "another config" in changed.stderr
    changed = _study(tmp_path, *two_seeds, "--config.teacher.steps=10")
    assert changed.returncode != 0 and "another config" in changed.stderr
