"""Command line: ``python -m distill_jax <command> --config=experiments/x.py [--config.key=value ...]``.

Commands:
  train-teacher  train a model on hard labels (a config without a teacher)
  distill        distill a teacher checkpoint into a student
  evaluate       evaluate a checkpoint on a dataset split
  reproduce      run a multi-stage study (e.g. experiments/hinton_mnist_quick.py)
  reproduce-full Hinton et al. section 3 in full (experiments/hinton_full.py): seeds,
                 temperature x width populations, transfer sets, plots
  reproduce-reasoning  the reasoning-distillation study (experiments/reasoning_r1.py)
  reproduce-crosstok   cross-tokenizer distillation on the reasoning task (experiments/crosstok_reasoning.py)
  distill-lm     distil a Hugging Face teacher into a student on a JSONL file, written
                 back as a Hugging Face directory (--teacher --student --data --out; distill_jax.lm)
  generate       a model's completions of a JSONL file's prompts, as JSONL (--teacher --data
                 --out), for sequence-level distillation; or of one --prompt, printed
                 (--teacher=smollm2-135m-instruct --prompt "...")

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

COMMANDS = ("train-teacher", "distill", "evaluate", "reproduce", "reproduce-full", "reproduce-reasoning",
            "reproduce-crosstok", "distill-lm",
            "generate")
LM_CONFIG = Path(__file__).resolve().parent / "lm.py"  # distill-lm's default --config


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
    # distill-lm and generate (distill_jax.lm)
    flags.DEFINE_string("teacher", "", "distill-lm, generate: a Hugging Face model directory, a GGUF file, or a short "
                        "name (smollm2-135m-instruct).", flag_values=fv)
    flags.DEFINE_string("student", "", "distill-lm: a Hugging Face directory, a GGUF file or a config.json.",
                        flag_values=fv)
    flags.DEFINE_string("prompt", "", "generate: one prompt; its completion is printed (no --data/--out).",
                        flag_values=fv)
    flags.DEFINE_string("data", "", "distill-lm: training JSONL; generate: the prompts' JSONL.", flag_values=fv)
    flags.DEFINE_string("val_data", "", "distill-lm: validation JSONL.", flag_values=fv)
    flags.DEFINE_string("test_data", "", "distill-lm: test JSONL.", flag_values=fv)
    flags.DEFINE_string("out", "", "distill-lm: the student's Hugging Face directory, or a .gguf file; generate: the "
                        "JSONL written.",
                        flag_values=fv)
    flags.DEFINE_string("objective", "forward_kl", "distill-lm: forward_kl|hinton_kd|gkd|top_k|sft, or with a "
                        "student tokenizer other than the teacher's aligned_kd|uld|sft.", flag_values=fv)
    flags.DEFINE_string("student_tokenizer", "", "distill-lm: the student's tokenizer (a directory or tokenizer.json; "
                        "default: the student directory's, else the teacher's).", flag_values=fv)
    flags.DEFINE_integer("teacher_max_len", None, "distill-lm: the teacher's tokens per example when its tokenizer "
                         "differs (config.task.teacher_max_len; default max_len).", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "distill-lm: the KD temperature; generate: the sampling temperature.",
                       flag_values=fv)
    flags.DEFINE_float("beta", 0.5, "distill-lm: the generalized JSD's beta (gkd).", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "distill-lm: k of the teacher cache (top_k); generate: top-k sampling.",
                         flag_values=fv)
    flags.DEFINE_string("cache_dir", "", "distill-lm: the teacher cache folder (top_k; written if missing).",
                        flag_values=fv)
    flags.DEFINE_float("sft_weight", 0.0, "distill-lm: weight of the data's cross-entropy beside the KD term.",
                       flag_values=fv)
    flags.DEFINE_integer("max_len", None, "distill-lm: tokens per example (config.task.max_len).", flag_values=fv)
    flags.DEFINE_bool("chat", None, "distill-lm, generate: format prompts with the tokenizer's chat template.",
                      flag_values=fv)
    flags.DEFINE_string("out_dtype", "float32", "distill-lm: the dtype the student is written in.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 128, "generate: tokens per completion.", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling (1 = off).", flag_values=fv)
    flags.DEFINE_integer("samples", 1, "generate: completions per prompt.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "generate: the sampling seed.", flag_values=fv)
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
    if command == "distill-lm" and not any(a == "--config" or a.startswith("--config=") for a in argv[2:]):
        argv = argv[:2] + [f"--config={LM_CONFIG}"] + argv[2:]
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
    from distill_jax.models import gguf
    from distill_jax.training import checkpoint, rundir

    return (FileNotFoundError, FileExistsError, FloatingPointError, gguf.GGUFError, checkpoint.CheckpointMismatchError,
            checkpoint.CheckpointCorruptError, rundir.WorkdirError, rundir.WorkdirBusyError)


def _dispatch(command: str, fv: flags.FlagValues) -> int:
    from distill_jax import training

    if command == "evaluate":
        return _evaluate(fv)
    if command == "generate":
        return _generate(fv)
    if command == "distill-lm":
        return _distill_lm(fv)
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
    if command == "reproduce-crosstok":
        from distill_jax.proj.crosstok import study as crosstok_study

        crosstok_study.run_study(config, results_dir=Path(fv.results), runs_root=Path(fv.runs), progress=fv.progress)
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


def _distill_lm(fv) -> int:
    import jax

    from distill_jax import lm, training

    missing = [name for name in ("student", "data", "workdir", "out") if not getattr(fv, name)]
    if missing:
        print(f"distill-lm: --{', --'.join(missing)} required (see distill_jax/lm.py).", file=sys.stderr)
        return 2
    config, base = lm.configure(fv.config, teacher=fv.teacher, student=fv.student, data=fv.data, val_data=fv.val_data,
                                test_data=fv.test_data, objective=fv.objective, temperature=fv.temperature,
                                beta=fv.beta, top_k=fv.top_k, cache_dir=fv.cache_dir, sft_weight=fv.sft_weight,
                                max_len=fv.max_len, chat=fv.chat, student_tokenizer=fv.student_tokenizer,
                                teacher_max_len=fv.teacher_max_len)
    if fv.objective == "top_k":
        lm.ensure_cache(config, fv.teacher, progress=fv.progress)
    results = training.run(config, fv.workdir, resume=fv.resume, progress=fv.progress)
    if jax.process_index() == 0 and results["finished"]:
        lm.export(fv.out, config.model, results["params"], base=base, tokenizer_dir=config.task.tokenizer,
                  dtype=fv.out_dtype)
        line = {"epochs": results["epochs"], "num_train": results["num_train"], "out": fv.out} | {
            f"{split}_{k}": v for split in ("val", "test") for k, v in results.get(split, {}).items()}
        print(json.dumps(line))
    return 0


def _generate(fv) -> int:
    from distill_jax import lm

    if fv.prompt:  # one prompt: greedy unless --temperature is given, the chat template when the model has one
        if not fv.teacher:
            print("generate: --teacher required (a model directory, GGUF file or smollm2-135m-instruct).", file=sys.stderr)
            return 2
        temperature = fv.temperature if fv["temperature"].present else 0.0
        print(lm.generate_text(fv.teacher, fv.prompt, max_new_tokens=fv.max_new_tokens, temperature=temperature,
                               top_p=fv.top_p, top_k=fv.top_k, seed=fv.seed, chat=fv.chat))
        return 0
    missing = [name for name in ("teacher", "data", "out") if not getattr(fv, name)]
    if missing:
        print(f"generate: --{', --'.join(missing)} required (or --teacher and --prompt).", file=sys.stderr)
        return 2
    count = lm.generate_jsonl(fv.teacher, fv.data, fv.out, max_new_tokens=fv.max_new_tokens,
                              temperature=fv.temperature, top_p=fv.top_p, top_k=fv.top_k, seed=fv.seed,
                              chat=bool(fv.chat), samples=fv.samples)
    print(json.dumps({"written": count, "out": fv.out}))
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
