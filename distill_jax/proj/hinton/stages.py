"""Multi-stage studies: teacher, then students, then one table.

A study config (see experiments/hinton_mnist_quick.py) holds ``stages``: run
configs trained in the order ``stage_order`` gives, each in ``<runs_root>/<study name>/<stage>``. A
stage whose ``teacher.checkpoint`` is ``"@<stage>"`` distills the model of
that earlier stage. Finished stages are reused and interrupted ones resume,
so re-running a study after a crash only redoes what is missing; a reused
stage reports the training time of the run that trained it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import ml_collections

from distill_jax import training


def _resolve_teacher(stage: ml_collections.ConfigDict, study_dir: Path) -> ml_collections.ConfigDict:
    ref = stage.get("teacher", {}).get("checkpoint", "")
    if isinstance(ref, str) and ref.startswith("@"):
        stage = ml_collections.ConfigDict(stage.to_dict())
        stage.teacher.checkpoint = str(study_dir / ref[1:])
    return stage


def run_stages(config, *, runs_root: Path, results_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Trains every stage, prints the table, writes ``results/<name>.{md,json}``."""
    study_dir = Path(runs_root) / config.name
    rows = {}
    started = time.perf_counter()
    # ConfigDict sorts its keys, so the order is explicit.
    for stage_name in config.stage_order:
        stage = _resolve_teacher(config.stages[stage_name], study_dir)
        workdir = study_dir / stage_name
        results = training.run(stage, workdir, resume=True, progress=progress)
        rows[stage_name] = {
            "label": config.labels.get(stage_name, stage_name),
            "test_errors": int(results["test"]["errors"]),
            "test_count": int(results["test"]["count"]),
            "paper_errors": config.paper.get(stage_name),
            "epochs": int(results["epochs"]),
            "wall_time_s": round(results["wall_time_s"], 1),  # training time; a reused stage keeps its own
            "workdir": str(workdir),
        }
        print(f"[{config.name}] {stage_name}: {rows[stage_name]['test_errors']} test errors "
              f"({rows[stage_name]['wall_time_s']} s)", flush=True)
    summary = {
        "study": config.name,
        "title": config.get("title", config.name),
        "rows": rows,
        "total_wall_time_s": round(time.perf_counter() - started, 1),
        "config": json.loads(config.to_json_best_effort()),
    }
    table = markdown_table(summary)
    print(table)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{config.name}.md").write_text(table)
    (results_dir / f"{config.name}.json").write_text(json.dumps(summary, indent=2))
    return summary


def markdown_table(summary: Mapping[str, Any]) -> str:
    lines = [
        f"## {summary['title']}",
        "",
        "| model | test errors (ours, of 10,000) | Hinton et al. 2015 | epochs | wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary["rows"].values():
        paper = "" if row["paper_errors"] is None else str(row["paper_errors"])
        lines.append(
            f"| {row['label']} | {row['test_errors']} | {paper} | {row['epochs']} | {row['wall_time_s']} |"
        )
    lines += ["", f"Total wall time: {summary['total_wall_time_s']} s.", ""]
    return "\n".join(lines)
