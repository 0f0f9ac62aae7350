"""Command line: ``python -m distill_jax <command> --config=experiments/x.py [--config.key=value ...]``.

Commands:
  train-teacher  train a model on hard labels (a config without a teacher)
  distill        distill a teacher checkpoint into a student
  evaluate       evaluate a checkpoint on a dataset split
  reproduce      run a multi-stage study (e.g. experiments/hinton_mnist_quick.py)
  reproduce-full Hinton et al. section 3 in full (experiments/hinton_full.py): seeds,
                 temperature x width populations, transfer sets, plots
  reproduce-reasoning  the reasoning-distillation study (experiments/reasoning_r1.py)

Every config value can be overridden, e.g.
``--config.num_epochs=3 --config.model.hidden='(300,300)'``.
Multi-host: ``--coordinator_address=host:port --num_processes=N --process_id=i``
initialize jax.distributed; with no flags, ``DISTILL_JAX_DISTRIBUTED=1`` calls
``jax.distributed.initialize()`` without arguments, so JAX detects the cluster
itself (Cloud TPU pod slices, SLURM, Open MPI, ...). Sharding: ``--config.mesh``,
``--config.teacher_partition``, ``--config.student_partition`` (docs/sharding.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

COMMANDS = ("train-teacher", "distill", "evaluate", "reproduce", "reproduce-full", "reproduce-reasoning")


def _flags(argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    # sys_argv: config_flags reads --config.* overrides from it (default: sys.argv).
    config_flags.DEFINE_config_file(
        "config", None, "experiment config file (get_config()).", flag_values=fv, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "run directory (config, metrics, checkpoints).", flag_values=fv)
    flags.DEFINE_bool("resume", False, "continue from the last checkpoint in --workdir.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show tqdm progress bars.", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "evaluate: a run directory or checkpoints folder.", flag_values=fv)
    flags.DEFINE_string("dataset", "mnist", "evaluate: dataset name.", flag_values=fv)
    flags.DEFINE_string("split", "test", "evaluate: TFDS split.", flag_values=fv)
    flags.DEFINE_string("runs", "runs", "reproduce: root folder for the stages' run directories.", flag_values=fv)
    flags.DEFINE_string("results", "results", "reproduce: folder for the tables.", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "multi-host: coordinator host:port.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-host: this process's id.", flag_values=fv)
    fv(argv)
    return fv


def _usage() -> str:
    return __doc__


DISTRIBUTED_ENV = "DISTILL_JAX_DISTRIBUTED"


def _distributed_is_initialized() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except (ImportError, AttributeError):  # private API moved: assume not
        return False


def _init_distributed(fv: flags.FlagValues) -> bool:
    """Starts jax.distributed from the flags, or (``DISTILL_JAX_DISTRIBUTED=1``) from the environment.

    Must run before anything touches a device. Returns whether it started.
    """
    from_env = os.environ.get(DISTRIBUTED_ENV, "").strip().lower() in ("1", "true", "yes")
    if not (fv.coordinator_address or fv.num_processes or fv.process_id is not None or from_env):
        return False
    import jax

    if _distributed_is_initialized():
        return True
    if fv.coordinator_address or fv.num_processes or fv.process_id is not None:
        jax.distributed.initialize(
            coordinator_address=fv.coordinator_address, num_processes=fv.num_processes, process_id=fv.process_id
        )
    else:  # JAX's own cluster detection (TPU pod slices, SLURM, Open MPI, ...)
        jax.distributed.initialize()
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(_usage(), file=sys.stderr)
        return 2
    command = argv[1]
    try:
        fv = _flags([argv[0]] + argv[2:])
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a key the config lacks
        overrides = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("--config.")]
        print(f"{command}: a --config override names a key the config does not have ({error}); overrides given: "
              f"{', '.join(overrides)}. The keys are those that get_config() in the config file sets.", file=sys.stderr)
        return 2

    _init_distributed(fv)
    try:
        return _dispatch(command, fv)
    except _user_errors() as error:  # what the user can fix: the message says how; no traceback
        print(f"{command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    from distill_jax.training import checkpoint, rundir

    return (FileNotFoundError, FileExistsError, FloatingPointError, checkpoint.CheckpointMismatchError,
            checkpoint.CheckpointCorruptError, rundir.WorkdirError, rundir.WorkdirBusyError)


def _dispatch(command: str, fv: flags.FlagValues) -> int:
    from distill_jax import training

    if command == "evaluate":
        return _evaluate(fv)
    if fv.config is None:
        print(f"{command}: --config=experiments/<file>.py is required.", file=sys.stderr)
        return 2
    config = fv.config
    if command == "reproduce-full":
        from distill_jax.proj.hinton import full

        full.run_study(config, runs_root=Path(fv.runs), results_dir=Path(fv.results), progress=fv.progress)
        return 0
    if command == "reproduce-reasoning":
        from distill_jax.proj.reasoning import study as reasoning_study

        reasoning_study.run_reasoning_study(
            config, results_dir=Path(fv.results), runs_root=Path(fv.runs), progress=fv.progress
        )
        return 0
    if command == "reproduce":
        from distill_jax.proj.hinton import stages

        stages.run_stages(config, runs_root=Path(fv.runs), results_dir=Path(fv.results), progress=fv.progress)
        return 0
    if fv.workdir is None:
        print(f"{command}: --workdir is required.", file=sys.stderr)
        return 2
    has_teacher = bool(config.get("teacher", {}).get("checkpoint", ""))
    if command == "train-teacher" and has_teacher:
        print("train-teacher: the config names a teacher checkpoint; use `distill`.", file=sys.stderr)
        return 2
    if command == "distill" and not has_teacher:
        print("distill: set --config.teacher.checkpoint=<teacher run dir>.", file=sys.stderr)
        return 2
    results = training.run(config, fv.workdir, resume=fv.resume, progress=fv.progress)
    results.pop("params", None)
    import jax

    if jax.process_index() == 0:  # one line per run, not one per process
        line = {k: results[k] for k in ("epochs", "wall_time_s")}
        test = results.get("test", {})
        line |= {"test_errors": test["errors"]} if "errors" in test else {f"test_{k}": v for k, v in test.items()}
        print(json.dumps(line))
    return 0


def _evaluate(fv) -> int:
    from distill_jax import data as data_lib
    from distill_jax.training import load_teacher, make_evaluate, to_host

    if not fv.checkpoint:
        print("evaluate: --checkpoint=<run dir> is required.", file=sys.stderr)
        return 2
    apply_fn, params, model_config = load_teacher(fv.checkpoint)
    ds = data_lib.load_split(fv.dataset, fv.split)
    evaluate = make_evaluate(apply_fn, num_classes=int(model_config.get("num_classes", 10)))
    print(json.dumps(to_host(evaluate(params, ds.images, ds.labels))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
