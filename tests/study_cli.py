"""Runs a study's smoke profile through the CLI in a child process, as the study tests do."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
# A smoke study compiles ~15 small programs; XLA's cheaper CPU optimization
# levels cut its compile time about 4x (set in the child: XLA reads them at start).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_study(command: str, config: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m distill_jax <command> --config=<config>`` with runs and results under ``tmp_path``."""
    cmd = [sys.executable, "-m", "distill_jax", command, f"--config={config}", f"--results={tmp_path / 'results'}",
           f"--runs={tmp_path / 'runs'}", "--noprogress", *overrides]
    env = os.environ | {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
