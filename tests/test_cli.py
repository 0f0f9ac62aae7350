"""The command line and the main job's smoke profile, end to end on real MNIST."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill_jax import cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).parent.parent


def test_train_teacher_distill_evaluate(tmp_path, capsys):
    common = ["--config.transfer.subset=1500", "--config.num_epochs=1", "--noprogress"]
    rc = cli.main(["distill-jax", "train-teacher", f"--config={REPO}/experiments/mnist_teacher.py",
                   f"--workdir={tmp_path}/teacher", "--config.model.hidden=(64,64)", *common])
    assert rc == 0
    rc = cli.main(["distill-jax", "distill", f"--config={REPO}/experiments/mnist_student.py:distill",
                   f"--workdir={tmp_path}/student", f"--config.teacher.checkpoint={tmp_path}/teacher",
                   "--config.objective.soft.temperature=4.0", *common])
    assert rc == 0
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert json.loads((tmp_path / "student" / "config.json").read_text())["objective"]["soft"]["temperature"] == 4.0
    capsys.readouterr()
    assert cli.main(["distill-jax", "evaluate", f"--checkpoint={tmp_path}/student"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["errors"] == results["test"]["errors"]


def test_commands_check_their_arguments(tmp_path, capsys):
    assert cli.main(["distill-jax"]) == 2
    assert cli.main(["distill-jax", "distill", f"--config={REPO}/experiments/mnist_student.py:distill",
                     f"--workdir={tmp_path}/x"]) == 2
    assert "teacher.checkpoint" in capsys.readouterr().err


def test_reproduce_smoke_profile_writes_the_table(tmp_path):
    cmd = [sys.executable, "-m", "distill_jax", "reproduce", "--config=experiments/hinton_mnist_quick.py:smoke",
           f"--runs={tmp_path}/runs", f"--results={tmp_path}/results", "--noprogress"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "hinton_mnist_smoke.json").read_text())
    assert set(summary["rows"]) == {"teacher", "hard", "distilled"}
    assert [row["paper_errors"] for row in summary["rows"].values()] == [67, 146, 74]
    assert all(0 <= row["test_errors"] <= 10000 for row in summary["rows"].values())
    table = (tmp_path / "results" / "hinton_mnist_smoke.md").read_text()
    assert "| student 2x800, soft targets T=20 (+0.1 x hard) |" in table and table in out.stdout

    # Every row is its run directory's result, and the table shows those numbers.
    study = tmp_path / "runs" / "hinton_mnist_smoke"
    for name, row in summary["rows"].items():
        workdir = study / name
        assert row["workdir"] == str(workdir)
        results = json.loads((workdir / "results.json").read_text())
        config = json.loads((workdir / "config.json").read_text())
        epochs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert results["finished"] and row["epochs"] == results["epochs"] == len(epochs) == config["num_epochs"]
        assert row["test_errors"] == results["test"]["errors"] == epochs[-1]["test"]["errors"]
        assert row["test_count"] == results["test"]["count"] == 10000 == sum(results["test"]["count_per_class"])
        assert sum(results["test"]["errors_per_class"]) == row["test_errors"]
        assert epochs[-1]["step"] == row["epochs"] * (results["num_train"] // config["batch_size"])
        assert results["num_train"] == 2000  # the smoke profile's transfer subset
        assert f"| {row['label']} | {row['test_errors']} | {row['paper_errors']} | {row['epochs']} |" in table
        # One epoch on 2,000 images is far from chance (about 9,000 errors of 10,000) for every stage.
        assert row["test_errors"] < 5000, name
    # The distilled stage distilled the teacher stage's checkpoint, at T=20 with 0.1 x the hard loss,
    # from the teacher's logits computed once (students have no jitter).
    distilled = json.loads((study / "distilled" / "config.json").read_text())
    assert distilled["teacher"]["checkpoint"] == str(study / "teacher")
    assert distilled["objective"]["soft"] == {"loss": "hinton_kd", "temperature": 20.0, "weight": 1.0}
    assert distilled["objective"]["hard"]["weight"] == 0.1
    assert json.loads((study / "distilled" / "results.json").read_text())["teacher_cached"]
    assert json.loads((study / "hard" / "config.json").read_text())["teacher"]["checkpoint"] == ""
    # The checkpoints hold the models the rows report: re-evaluated here, in this process.
    from distill_jax import data as data_lib
    from distill_jax.training import load_teacher, make_evaluate

    test = data_lib.load_split("mnist", "test")
    evaluate_student = None
    for name in ("teacher", "hard", "distilled"):
        apply_fn, params, model_config = load_teacher(study / name)
        if name == "teacher":
            evaluate = make_evaluate(apply_fn, num_classes=10)
        else:  # both students are 2x800: one compiled evaluation
            evaluate = evaluate_student = evaluate_student or make_evaluate(apply_fn, num_classes=10)
        assert int(evaluate(params, test.images, test.labels)["errors"]) == summary["rows"][name]["test_errors"], name


def test_reproduce_full_smoke_profile_runs_every_stage_and_refuses_a_changed_config(tmp_path):
    base = [sys.executable, "-m", "distill_jax", "reproduce-full", "--config=experiments/hinton_full.py:smoke",
            f"--runs={tmp_path}/runs", f"--results={tmp_path}/results", "--noprogress"]
    out = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = tmp_path / "results"
    summary = json.loads((results / "hinton_smoke.json").read_text())
    mnist = summary["datasets"]["mnist"]
    assert [t["seed"] for t in mnist["teacher"]["per_seed"]] == [0, 1]
    rows = mnist["students"]["30"]["rows"]
    assert set(rows) == {"hard", "T2", "T2.5", "T20"}  # the 2x30 grid of temperatures_by_width
    from distill_jax.training import checkpoint as ckpt

    population_meta = ckpt.read_meta(tmp_path / "runs" / "hinton_smoke" / "mnist" / "students_w30" / "checkpoints")
    assert population_meta["config"]["member_axis"] == "map"  # member_axis_by_width={"30": "map"}, recorded
    for row in rows.values():
        stat = row["test_errors"]
        assert len(stat["values"]) == 2 and stat["mean"] == pytest.approx(np.mean(stat["values"]), abs=0.01)
        assert all(0 <= v <= 10000 for v in stat["values"])
    grid = set(summary["config"]["bias_shift_grid"])
    for name, classes in (("omit_3", [3]), ("only_7_8", [7, 8])):
        transfer = mnist["transfer"][name]
        assert transfer["classes"] == classes and transfer["num_train"] > 0
        assert all(row["shift"] in grid for row in transfer["per_seed"])
    # The omitted-3 students never saw a 3 in training.
    assert mnist["transfer"]["omit_3"]["class_count"] == 1010
    # Patient and consistent teaching: the teacher of the same seed in the loop, on jittered images.
    patient = mnist["patient"]
    assert [p["seed"] for p in patient["per_seed"]] == [0, 1] and patient["test_errors"]["n"] == 2
    for p in patient["per_seed"]:
        run_config = json.loads((Path(p["workdir"]) / "config.json").read_text())
        run_config = run_config.get("config", run_config)
        assert run_config["jitter"] == 2 and run_config["cache_teacher"] == "false"
        assert run_config["teacher"]["checkpoint"].endswith(f"teacher_seed{p['seed']}")
        assert run_config["model"]["hidden"] == [30, 30]
    soft = mnist["dark_knowledge"]["soft_targets"]
    assert set(soft) == {"1", "4", "20"} and all(abs(sum(p) - 1) < 1e-4 for t in soft.values() for p in t)
    for png in ("hinton_smoke_temperature_mnist.png", "hinton_smoke_dark_knowledge_mnist.png"):
        assert (results / png).stat().st_size > 10_000
    table = (results / "hinton_smoke.md").read_text()
    assert "### Temperature vs capacity, MNIST" in table and table in out.stdout
    assert "### Every seed, MNIST" in table and "- patient − T=20:" in table

    # Re-running with another student budget must not silently mix checkpoints.
    changed = subprocess.run(base + ["--config.epochs.mnist=(1, 2)"], cwd=REPO, capture_output=True, text=True,
                             timeout=900)
    assert changed.returncode != 0
    assert "another config" in changed.stderr
