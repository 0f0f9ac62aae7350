"""The cross-tokenizer study (distill_jax/proj/crosstok): its tokenizers, and the smoke profile end to end."""

import json

import numpy as np
import pytest

from distill_jax.data import alignment, text
from distill_jax.proj.crosstok import study
from distill_jax.proj.reasoning import task as R
from study_cli import run_study

def test_the_two_tokenizers_cut_the_task_differently_and_share_its_characters():
    problems = R.make_problems(np.random.default_rng(0), 200)
    a, b = study.char_tokenizer(), study.bpe_tokenizer(study._corpus(problems), 64)
    done = R.completion(R.Problem(347, 598)).removesuffix("<eos>")
    ids_a, ids_b = a.encode(done), b.encode(done)
    assert a.decode(ids_a) == b.decode(ids_b) == done  # both spell the text back, special tokens included
    assert len(ids_a) == len(done) - len("<think></think>") + 2 and len(ids_b) < len(ids_a)
    vocab = alignment.shared_vocabulary(b, a)
    shared = {b.backend.id_to_token(int(i)) for i in vocab.student_ids}
    assert set(R.CHARACTERS) | set(study.SPECIALS) <= shared  # every teacher token has its twin in B
    assert len(vocab) == a.vocab_size < b.vocab_size


def _study(tmp_path, *overrides):
    return run_study("reproduce-crosstok", "experiments/crosstok_reasoning.py:smoke", tmp_path, *overrides)


@pytest.mark.slow
def test_smoke_study_runs_every_row_and_every_number_traces_back_to_the_runs(tmp_path):
    one_seed = ["--config.seeds=(0,)"]
    out = _study(tmp_path, *one_seed)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "crosstok_reasoning_smoke.json").read_text())
    run_dir = tmp_path / "runs" / "crosstok_reasoning_smoke"
    assert set(summary["rows"]) == set(study.ROWS)

    # The teachers: T_A reads tokenizer A, T_B tokenizer B; the students all read B.
    for which in ("A", "B"):
        config = json.loads((run_dir / f"teacher_{which}" / "config.json").read_text())
        assert config["task"]["tokenizer"] == str(run_dir / f"tokenizer_{which}")
        assert summary["teachers"][which]["vocab_size"] == text.load_tokenizer(run_dir / f"tokenizer_{which}").vocab_size
    for row, teacher, teacher_tokenizer in (("uld", "A", "A"), ("aligned", "A", "A"), ("aligned_bucket", "A", "A"),
                                             ("same_tok", "B", ""), ("data", "", ""), ("seqkd", "", "")):
        config = json.loads((run_dir / f"{row}_s0" / "config.json").read_text())
        assert config["task"]["tokenizer"] == str(run_dir / "tokenizer_B"), row
        assert config["teacher"]["checkpoint"] == (str(run_dir / f"teacher_{teacher}") if teacher else ""), row
        assert config["task"]["teacher_tokenizer"] == (str(run_dir / "tokenizer_A") if teacher_tokenizer else ""), row
        kd = config["objective"].get("kd", {})
        assert kd.get("loss") == {"uld": "aligned_uld", "aligned": "aligned_kd", "aligned_bucket": "aligned_kd",
                                  "same_tok": "forward_kl"}.get(row), row
    # The sequence-level pool: distinct completions of T_A that the verifier accepts, for transfer prompts.
    pool = text.read_jsonl(run_dir / "data" / "seqkd.jsonl")
    transfer = {r["prompt"] for r in text.read_jsonl(run_dir / "data" / "transfer.jsonl")}
    assert len(pool) == summary["pool"]["rows"] > 0 and len({(r["prompt"], r["completion"]) for r in pool}) == len(pool)
    for r in pool:
        a, b = map(int, r["prompt"][2:-1].split("+"))
        assert r["prompt"] in transfer and R.verify(R.Problem(a, b), r["completion"] + "<eos>")
    # Every row: the summary's numbers are the students' eval files, and every row had the same steps.
    steps = set()
    for row, entry in summary["rows"].items():
        result = json.loads((run_dir / f"{row}_s0" / "study_eval.json").read_text())
        bits = np.array([c == "1" for c in result["test_correct"]], float)
        assert len(bits) == summary["num_test"] and entry["per_seed"] == [bits.mean()] == [result["test_accuracy"]]
        assert entry["test"]["low"] <= bits.mean() <= entry["test"]["high"]
        metrics = (run_dir / f"{row}_s0" / "metrics.jsonl").read_text().splitlines()
        steps.add(json.loads(metrics[-1])["step"])
        assert entry["steps"] == json.loads(metrics[-1])["step"]
    assert max(steps) - min(steps) <= max(steps) // 4, steps  # the same budget up to rounding to whole epochs
    report = (tmp_path / "results" / "crosstok_reasoning_smoke.md").read_text()
    assert all(study.ROW_TITLES[row] in report for row in study.ROWS) and "aligned - data" in report
    assert (tmp_path / "results" / "crosstok_reasoning_smoke.png").stat().st_size > 0

    # Every stage is saved and reused: a re-run trains nothing and reports the same rows.
    files = sorted(run_dir.glob("*/study_eval.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _study(tmp_path, *one_seed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert json.loads((tmp_path / "results" / "crosstok_reasoning_smoke.json").read_text())["rows"] == summary["rows"]
    # The same study name with another config is refused before any training.
    changed = _study(tmp_path, *one_seed, "--config.student.steps=40")
    assert changed.returncode != 0 and "another config" in changed.stderr
