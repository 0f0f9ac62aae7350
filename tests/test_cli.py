"""The command line and the main job's smoke profile, end to end on real MNIST."""

import json
import subprocess
import sys
from pathlib import Path

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
