"""The run loop: config -> data -> (teacher, student) -> epochs -> metrics, checkpoints.

``run(config, workdir)`` trains a teacher (no ``config.teacher.checkpoint``)
or distills one into a student, image classifiers and language models alike
(``config.model.name = "transformer"``: token batches, losses on the
completion tokens, a top-k teacher cache), writing into ``workdir``:

  config.json      the full config of the run
  metrics.jsonl    one JSON line per epoch (train means, test/val evaluation),
                   and the same as TensorBoard events
  results.json     final evaluation and training time
  checkpoints/     orbax checkpoints (every ``checkpoint_every`` epochs and the last)

(:mod:`distill_jax.training.rundir` writes them and holds the reuse rules.)

``resume=True`` continues from the last checkpoint and ends with exactly the
parameters an uninterrupted run would have (same seed, same device count).

Everything is laid out on the device mesh ``config.mesh`` (default
``"data=-1"``: data parallel over all devices; one device is a 1-device
mesh) with the partition rules ``config.teacher_partition`` and
``config.student_partition``; see :mod:`distill_jax.sharding` and
docs/sharding.md. With several processes (``jax.distributed``), every process
runs this same function; each hands JAX only the training rows its devices
hold, and only process 0 writes the JSON files. A run may resume on another
mesh or device count: the checkpoint is restored into the new layout.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from distill_jax import data as data_lib
from distill_jax.data import alignment, teacher_cache
from distill_jax.cross_tokenizer import CROSS_TOKENIZER_LOSSES
from distill_jax import losses, models, objectives
from distill_jax import sharding as sharding_lib
from distill_jax.models import hf, pretrained, transformer
from distill_jax.training import checkpoint as ckpt
from distill_jax.training import rundir
from distill_jax.training.steps import (
    TrainState,
    create_train_state,
    make_evaluate,
    make_layout,
    make_predict,
    make_token_evaluate,
    make_train_epoch,
    make_train_step,
    to_host,
)

#: The batch keys each kind of model is called with.
IMAGE_INPUTS = ("image",)
TOKEN_INPUTS = ("inputs", "valid")
#: What a teacher of another tokenizer is called with (distill_jax.data.alignment).
CROSS_TEACHER_INPUTS = ("teacher_inputs", "teacher_valid")
_ALIGNED_ARRAYS = alignment.TEACHER_KEYS + alignment.ALIGNED_KEYS

# Keys that may differ between a checkpoint's config and the resuming run's.
_RESUME_MAY_CHANGE = ("checkpoint_every", "progress", "mesh", "teacher_partition", "student_partition")


# ------------------------------------------------------------------ pieces


def make_optimizer(config: Mapping[str, Any], steps_per_epoch: int, num_epochs: int) -> optax.GradientTransformation:
    """An optax optimizer with its learning-rate schedule, from ``config.optimizer``."""
    total = max(1, steps_per_epoch * num_epochs)
    lr = float(config["learning_rate"])
    schedule_name = config.get("schedule", "constant")
    warmup = int(round(config.get("warmup_epochs", 0) * steps_per_epoch))
    if schedule_name == "constant":
        schedule = optax.constant_schedule(lr)
    elif schedule_name == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else lr,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=lr * float(config.get("final_lr_fraction", 0.0)),
        )
    else:
        raise ValueError(f"unknown schedule {schedule_name!r}; choose 'constant' or 'cosine'.")
    name = config.get("name", "sgd")
    weight_decay = float(config.get("weight_decay", 0.0))
    if name == "sgd":
        tx = optax.sgd(schedule, momentum=config.get("momentum") or None, nesterov=bool(config.get("nesterov", False)))
        return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
    if name == "adam":
        return optax.adam(schedule)
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd', 'adam' or 'adamw'.")


def _check_finite(name: str, array) -> None:
    bad = sharding_lib.count_nonfinite(array)
    if bad:
        raise ValueError(
            f"{name} contains {bad} NaN/inf values; training on them would make every "
            "parameter NaN. Clean the data (or the teacher checkpoint) first."
        )


def load_datasets(config: Mapping[str, Any]) -> dict[str, data_lib.Dataset]:
    """Train (after the transfer-set filters), optional validation, and test splits.

    ``dataset="package.module:function"`` names a function
    ``function(split_seed, **config.task)`` that returns the splits itself, a
    dict of arrays each for a language model (e.g.
    ``distill_jax.proj.reasoning.task:token_splits``, the arithmetic task).
    """
    if ":" in str(config["dataset"]):
        module_name, _, function_name = str(config["dataset"]).partition(":")
        try:
            make_splits = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"dataset {config['dataset']!r}: cannot load {function_name!r} from module {module_name!r} ({error})."
            ) from None
        return make_splits(int(config.get("split_seed", 0)), **dict(config.get("task") or {}))
    kwargs = {"data_dir": config.get("data_dir") or None, "manual_dir": config.get("manual_dir") or None}
    train = data_lib.load_split(config["dataset"], "train", **kwargs)
    test = data_lib.load_split(config["dataset"], "test", **kwargs)
    out = {}
    if config.get("val_size", 0):
        # A fixed split seed: teacher and students of one study share it.
        train, out["val"] = data_lib.train_val_split(train, int(config["val_size"]), seed=int(config.get("split_seed", 0)))
    transfer = config.get("transfer", {}) or {}
    num_classes = int(config["model"].get("num_classes", 10))
    if transfer.get("drop_classes"):
        train = data_lib.drop_classes(train, list(transfer["drop_classes"]), num_classes=num_classes)
    if transfer.get("keep_classes"):
        train = data_lib.keep_classes(train, list(transfer["keep_classes"]), num_classes=num_classes)
    if transfer.get("subset"):
        train = data_lib.take_subset(train, int(transfer["subset"]), seed=int(config.get("split_seed", 0)))
    out["train"] = train
    out["test"] = test
    return out


def teacher_checkpoint_dir(path: str | Path) -> Path:
    """Accepts a teacher run's workdir or its ``checkpoints/`` folder."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_teacher(path: str | Path, student_num_classes: int | None = None, *, mesh=None, partition="replicated"):
    """Restores a model from a checkpoint: ``(apply_fn, params, model_config)``.

    With ``student_num_classes``, a teacher predicting another number of
    classes is an error raised before anything is trained. With ``mesh``, the
    parameters are restored straight into the layout of the partition rules
    ``partition`` on it (whatever layout they were saved from); without, onto
    this process's first device.
    """
    if pretrained.is_pretrained(path):  # a Hugging Face directory, a GGUF file, or a short name of one
        return _load_pretrained(pretrained.resolve(path), student_num_classes, mesh=mesh, partition=partition)
    directory = teacher_checkpoint_dir(path)
    meta = ckpt.read_meta(directory)
    model_config = dict(meta["config"]["model"])
    teacher_classes = models.num_outputs(model_config)
    if student_num_classes is not None and teacher_classes != student_num_classes:
        what, key = ("tokens", "vocab_size") if models.is_token_model(model_config) else ("classes", "num_classes")
        raise ValueError(
            f"teacher at {directory} predicts {teacher_classes} {what} but the student has "
            f"{student_num_classes}; set config.model.{key}={teacher_classes} or use a matching teacher."
        )
    model = models.create(model_config)
    input_shape = tuple(meta["config"].get("input_shape", (1, 28, 28, 1)))
    params_like = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0), input_shape))
    shardings = None if mesh is None else sharding_lib.param_shardings(params_like, partition_rules(model, partition), mesh)
    params = ckpt.restore_params(directory, params_like, shardings=shardings)
    return model.apply, params, model_config


def _load_pretrained(path, student_num_classes: int | None, *, mesh=None, partition="replicated"):
    """A Hugging Face directory or GGUF file as a teacher: ``(apply_fn, variables, model_config)`` like a checkpoint's."""
    config = pretrained.read_config(path)
    if student_num_classes is not None and config.vocab_size != student_num_classes:
        raise ValueError(
            f"the pretrained model at {path} predicts {config.vocab_size} tokens but the student has "
            f"{student_num_classes}; set config.model.vocab_size={config.vocab_size} or use a matching teacher."
        )
    rules = None
    if mesh is not None:
        setting = partition or "replicated"
        rules = transformer.partition_rules(config, setting.strip()) if isinstance(setting, str) and \
            setting.strip() in transformer.LOGICAL_AXIS_RULES else sharding_lib.parse_rules(setting)
    config, params = pretrained.load(path, mesh=mesh, rules=rules)
    return models.Transformer(config).apply, {"params": params}, hf.model_config(config)


def partition_rules(model, setting):
    """The partition rules of ``setting`` for ``model``.

    A transformer with a preset name (``replicated``, ``fsdp``, ``tensor``)
    gets the rules of its logical axis names
    (:func:`distill_jax.models.transformer.partition_rules`); anything else
    goes to :func:`distill_jax.sharding.parse_rules`.
    """
    setting = setting or "replicated"
    if isinstance(model, models.Transformer) and isinstance(setting, str) and setting.strip() in transformer.LOGICAL_AXIS_RULES:
        return transformer.partition_rules(model.config, setting.strip(), prefix="['params']")
    return sharding_lib.parse_rules(setting)


def _top_k_temperature(spec: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The temperature of the objective's ``top_k_kd`` terms (None without one); they must agree."""
    temps = {float(t.get("temperature", 1.0)) for t in spec.values() if t.get("loss") == "top_k_kd"}
    if len(temps) > 1:
        raise ValueError(f"the top_k_kd terms use temperatures {sorted(temps)}; one teacher cache needs one.")
    if temps and any(t.get("loss") not in ("top_k_kd", "cross_entropy") for t in spec.values()):
        raise ValueError(
            "an objective with a top_k_kd term gets the teacher as a cached top-k only; its other terms "
            "can only be cross_entropy."
        )
    return next(iter(temps)) if temps else None


def _config_dict(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=list))


def _check_epoch_finite(epoch: int, train_metrics: Mapping, evaluation: Mapping, mngr) -> None:
    """Stops the run (before this epoch is logged or saved) when a loss, gradient norm or evaluation loss is not finite."""
    problems = []
    if train_metrics.get("nonfinite_step"):
        problems.append(f"the training loss or gradient norm is not finite from step {train_metrics['nonfinite_step']} on")
    else:
        bad = sorted(k for k, v in train_metrics.items() if not math.isfinite(v))
        if bad:
            problems.append(f"the training metrics {bad} are not finite")
    for split, metrics in evaluation.items():
        if not math.isfinite(metrics.get("loss", 0.0)):
            problems.append(f"the {split} loss is {metrics['loss']}")
    if problems:
        kept_epoch = mngr.latest_step()
        kept = "no checkpoint has been written yet" if kept_epoch is None else f"the last good checkpoint (epoch {kept_epoch}) is kept"
        raise FloatingPointError(
            f"epoch {epoch + 1}: " + "; ".join(problems) + f". Training stopped and {kept}. "
            "Lower the learning rate (or check the data and the teacher), then resume with --resume or start anew. "
            "To find an invalid traced value (a temperature <= 0, an id out of range) at its source, "
            "rerun with DISTILL_JAX_CHECKS=1."
        )


def _should_cache(config: Mapping[str, Any], has_teacher: bool, tokens: bool = False) -> bool:
    """Whether to compute the teacher's logits once: ``cache_teacher`` is auto/true/false.

    A language model's full logits (rows x length x vocabulary) are cached
    only on request (``true``); ``auto`` runs its teacher in the loop (a
    ``top_k_kd`` objective caches the top-k instead, see ``run``).
    """
    setting = str(config.get("cache_teacher", "auto")).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"cache_teacher must be 'auto', 'true' or 'false', got {setting!r}.")
    augmented = int(config.get("jitter", 0)) > 0
    if not has_teacher or setting == "false" or (tokens and setting == "auto"):
        return False
    if setting == "true" and augmented:
        raise ValueError(
            "cache_teacher=true with jitter > 0: the teacher would have to see the jittered "
            "inputs, which a cache computed once cannot give. Set jitter=0 or cache_teacher='auto'."
        )
    # "auto": valid whenever the teacher's input is fixed.
    return not augmented


def _validate(config: Mapping[str, Any]) -> None:
    for key in ("dataset", "model", "optimizer", "batch_size", "num_epochs", "objective"):
        if key not in config:
            raise ValueError(f"config has no {key!r}; see experiments/ for complete examples.")
    if int(config["num_epochs"]) < 1 or int(config["batch_size"]) < 1:
        raise ValueError("num_epochs and batch_size must be >= 1.")


# ------------------------------------------------------------------ the loop


def run(
    config,
    workdir: str | Path,
    *,
    resume: bool = False,
    datasets: Mapping[str, data_lib.Dataset] | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> dict:
    """Trains (or distills) per ``config`` in ``workdir``; returns the final results.

    Args:
      config: an ml_collections ConfigDict (or plain dict) as in experiments/.
      workdir: the run directory (created).
      resume: continue from the last checkpoint in ``workdir/checkpoints``.
        Without it, a workdir that already holds a checkpoint is an error,
        so no finished run is overwritten by accident.
      datasets: optional ``{"train", "test"[, "val"]}`` to use instead of TFDS.
      progress: show a tqdm bar per run.
      stop_after_epochs: stop (with a checkpoint) after this many epochs of
        this call, as if interrupted; for tests and for budgeted sessions.
    """
    _validate(config)
    config_dict = _config_dict(config)
    workdir = Path(workdir)
    lead = jax.process_index() == 0  # the one process that writes the files and holds the lock
    checkpoint_dir = workdir / "checkpoints"
    existing = ckpt.latest_epoch(checkpoint_dir)
    if existing is not None and not resume:
        raise FileExistsError(
            f"{workdir} already holds a checkpoint (epoch {existing}). Pass --resume to continue "
            "it, or choose another --workdir."
        )
    if lead:
        rundir.check_workdir(workdir, resume=resume, has_checkpoint=existing is not None)
    # Resuming a finished run only re-evaluates it: it writes nothing, so a read-only run can be re-evaluated.
    reevaluate = existing is not None and existing >= int(config_dict["num_epochs"]) and (workdir / rundir.RESULTS).exists()
    with rundir.owned(workdir, enabled=lead, read_only=reevaluate):
        return _run(config_dict, workdir, existing=existing, lead=lead, datasets=datasets, progress=progress,
                    stop_after_epochs=stop_after_epochs, reevaluate=reevaluate)


def _run(config_dict: dict, workdir: Path, *, existing: int | None, lead: bool, datasets, progress: bool,
         stop_after_epochs: int | None, reevaluate: bool = False) -> dict:
    """The body of :func:`run`, in a workdir this process owns (or, ``reevaluate``, only reads)."""
    checkpoint_dir = workdir / "checkpoints"
    # Devices.
    mesh = sharding_lib.make_mesh(config_dict.get("mesh") or sharding_lib.DEFAULT_MESH)

    # Data. Every process loads the split; each hands JAX only its own rows
    # (see distill_jax.sharding: "Data across processes").
    splits = dict(datasets) if datasets is not None else load_datasets(config_dict)
    model_config = dict(config_dict["model"])
    tokens = models.is_token_model(model_config)
    inputs = TOKEN_INPUTS if tokens else IMAGE_INPUTS
    split_arrays = {name: _arrays(splits[name], tokens) for name in ("train", "val", "test") if name in splits}
    train_arrays = split_arrays["train"]
    # A teacher with another tokenizer reads its own tokens of the same text (distill_jax.data.alignment).
    cross_tokenizer = tokens and "teacher_inputs" in train_arrays
    teacher_inputs = CROSS_TEACHER_INPUTS if cross_tokenizer else None
    for name in ("val", "test"):  # evaluation reads the student's tokens only
        if name in split_arrays:
            split_arrays[name] = {k: v for k, v in split_arrays[name].items() if k not in _ALIGNED_ARRAYS}
    if tokens and "segments" in train_arrays:  # packed rows (distill_jax.data.text.pack_examples)
        inputs = TOKEN_INPUTS + ("segments",)
        for arrays in split_arrays.values():  # an unpacked split: one segment per row
            arrays.setdefault("segments", arrays["valid"].astype(np.int32))
    for name, array in train_arrays.items():
        if np.issubdtype(array.dtype, np.floating):
            _check_finite(f"the training {name}s", array)
    num_train = int(train_arrays["label"].shape[0])
    batch_size = int(config_dict["batch_size"])
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {num_train} examples, fewer than batch_size={batch_size}.")
    num_epochs = int(config_dict["num_epochs"])
    num_rows = sharding_lib.padded_num_rows(num_train, mesh)
    train_data = {name: sharding_lib.shard_rows(array, mesh, num_rows) for name, array in train_arrays.items()}

    # Student.
    num_classes = models.num_outputs(model_config)
    student = models.create(model_config)
    student_rules = partition_rules(student, config_dict.get("student_partition"))
    input_shape = (1,) + tuple(train_arrays[inputs[0]].shape[1:])
    config_dict["input_shape"] = list(input_shape)
    seed = int(config_dict.get("seed", 0))
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    tx = make_optimizer(config_dict["optimizer"], steps_per_epoch, num_epochs)

    init_from = str(config_dict.get("init_from") or "")

    def init_state(params=None):
        params = models.init_params(student, init_key, input_shape) if params is None else params
        return create_train_state(params, tx, state_key)

    # chunk_size > 0 (language models): the objective runs on hidden states and output heads in sequence
    # chunks, so no [batch, length, vocabulary] array of either model is made (distill_jax.chunked).
    chunk_size = int(config_dict.get("chunk_size", 0) or 0)
    if chunk_size and not tokens:
        raise ValueError("config.chunk_size is for language models (config.model.name='transformer').")
    if chunk_size:
        objective = objectives.chunked_from_spec(config_dict["objective"], chunk_size=chunk_size)
    else:
        objective = objectives.from_spec(config_dict["objective"])

    # Teacher.
    teacher_path = (config_dict.get("teacher") or {}).get("checkpoint") or ""
    teacher_apply, teacher_params, teacher_rules = None, None, None
    if teacher_path:
        teacher_apply, teacher_params, teacher_model = load_teacher(
            teacher_path, None if cross_tokenizer else num_classes, mesh=mesh,
            partition=config_dict.get("teacher_partition")
        )
        teacher_rules = partition_rules(models.create(teacher_model), config_dict.get("teacher_partition"))
    _check_ids(split_arrays, num_classes, tokens)  # after the teacher: its class-count error names the cause better
    teacher_classes = num_classes
    if cross_tokenizer:
        teacher_classes = _check_cross_tokenizer(config_dict, train_arrays, teacher_model if teacher_path else None)
    elif any(spec.get("loss") in CROSS_TOKENIZER_LOSSES for spec in config_dict["objective"].values()):
        raise ValueError(
            "the objective has a cross-tokenizer term (aligned_kd / aligned_uld) but the data is not aligned: give "
            "the task a teacher_tokenizer (distill_jax.data.alignment.encode_aligned_examples makes the arrays)."
        )
    needs_teacher = any(
        spec.get("loss", "cross_entropy") != "cross_entropy" for spec in config_dict["objective"].values()
    )
    cache_dir = (config_dict.get("teacher") or {}).get("cache_dir") or ""
    if needs_teacher and teacher_apply is None and not cache_dir:
        raise ValueError(
            "the objective has a distillation term but config.teacher.checkpoint is empty; "
            "point it at a teacher run (e.g. --config.teacher.checkpoint=runs/teacher)."
        )
    top_k_temperature = _top_k_temperature(config_dict["objective"])
    top_k = int((config_dict.get("teacher") or {}).get("top_k", 0) or 0)
    if top_k_temperature is not None and top_k < 1:
        raise ValueError("the objective has a top_k_kd term: set config.teacher.top_k to the k of the teacher cache (>= 1).")
    # Evaluate the objective once on tiny concrete arrays: a bad temperature or
    # beta fails here, before any training.
    rows = (2, 3) if tokens else (2,)
    probe = jnp.zeros(rows + (num_classes,))
    if chunk_size:  # hidden states and an output head instead of logits
        probe = (jnp.zeros(rows + (4,)), jnp.zeros((4, num_classes)))
    probe_batch = {"label": jnp.zeros(rows, jnp.int32)} | ({"mask": jnp.ones(rows)} if tokens else {})
    probe_teacher = probe if needs_teacher else None
    if cross_tokenizer:
        probe_batch |= {k: jnp.zeros(rows, train_arrays[k].dtype) for k in _ALIGNED_ARRAYS}
        probe_teacher = jnp.zeros(rows + (teacher_classes,)) if needs_teacher else None
    if top_k_temperature is not None:
        probe_teacher = (jnp.full(rows + (top_k,), -math.log(num_classes)), jnp.zeros(rows + (top_k,), jnp.int32))
    objective(probe, probe_teacher, probe_batch, step=0)

    # Layout: student state per student_rules (optimizer state mirrors the
    # params), teacher per teacher_rules, data and batches over the data axes.
    layout = make_layout(mesh, jax.eval_shape(init_state), student_rules, teacher_params, teacher_rules)

    if cache_dir:
        # A teacher cache on disk (distill_jax.data.teacher_cache): made once, by this teacher, of these rows.
        if top_k_temperature is None:
            raise ValueError("config.teacher.cache_dir is set but the objective has no top_k_kd term to use it.")
        if not tokens:
            raise ValueError("config.teacher.cache_dir holds per-token caches; this model is not a language model.")
        cache = teacher_cache.open_cache(cache_dir)
        cache.check(vocab_size=num_classes, k=top_k, temperature=top_k_temperature,
                    inputs=train_arrays["inputs"], valid=train_arrays["valid"])
        values, indices, _ = cache.all_rows()
        train_data["teacher_top_values"] = sharding_lib.shard_rows(values, mesh, num_rows)
        train_data["teacher_top_indices"] = sharding_lib.shard_rows(indices, mesh, num_rows)
    elif top_k_temperature is not None:
        if teacher_apply is None:
            raise ValueError("the objective has a top_k_kd term but config.teacher.checkpoint is empty.")
        transform = functools.partial(losses.top_k_log_probs, k=top_k, temperature=top_k_temperature)
        predict = jax.jit(make_predict(teacher_apply, batch_size=int(config_dict.get("eval_batch_size", 1000)),
                                       transform=transform), out_shardings=layout.data)
        values, indices = predict(teacher_params, *(train_data[k] for k in inputs))
        train_data["teacher_top_values"], train_data["teacher_top_indices"] = values, indices
    elif _should_cache(config_dict, teacher_apply is not None, tokens) and chunk_size:
        raise ValueError("cache_teacher=true caches the teacher's full logits, which chunk_size > 0 exists to avoid; "
                         "use cache_teacher='auto' (the teacher in the loop) or a top_k_kd objective.")
    elif _should_cache(config_dict, teacher_apply is not None, tokens):
        predict = jax.jit(make_predict(teacher_apply, batch_size=1000), out_shardings=layout.data)
        teacher_logits = predict(teacher_params, *(train_data[k] for k in inputs))
        _check_finite("the teacher's logits on the transfer set", teacher_logits)
        train_data["teacher_logits"] = teacher_logits
    jitter = int(config_dict.get("jitter", 0))
    max_norm = model_config.get("max_norm")
    step = make_train_step(
        student.apply,
        tx,
        objective,
        teacher_apply=teacher_apply,
        inputs=inputs,
        batch_transform=functools.partial(_jitter_images, max_shift=jitter) if jitter else None,
        projection=functools.partial(models.max_norm_project, max_norm=max_norm) if max_norm else None,
        chunk_size=chunk_size,
        teacher_inputs=teacher_inputs,
    )
    train_epoch = make_train_epoch(step, batch_size=batch_size, layout=layout, num_examples=num_train)
    eval_batch_size = int(config_dict.get("eval_batch_size", 1000))
    if tokens:
        evaluate = jax.jit(make_token_evaluate(student.apply, inputs=inputs, batch_size=eval_batch_size,
                                               chunk_size=chunk_size),
                           out_shardings=layout.replicated)
    else:
        evaluate_images = jax.jit(
            make_evaluate(student.apply, num_classes=num_classes, batch_size=eval_batch_size),
            out_shardings=layout.replicated,
        )

        def evaluate(params, split):
            return evaluate_images(params, split["image"], split["label"])

    # The state is created under jit straight into its layout.
    if init_from and existing is None:  # start from pretrained weights (a Hugging Face directory or a run)
        _, start_params, start_model = load_teacher(init_from, num_classes)
        same = models.create(start_model).config == student.config if tokens else start_model == model_config
        if not same:
            raise ValueError(f"config.init_from={init_from} holds another model than config.model: "
                             f"{start_model} vs {model_config}.")
        state = jax.jit(init_state, out_shardings=layout.state)(start_params)
    else:
        state = jax.jit(init_state, out_shardings=layout.state)()
    start_epoch = 0
    if existing is not None:
        meta, params, opt_state, train_state = ckpt.restore_all(
            checkpoint_dir, params_like=state.params, opt_state_like=state.opt_state,
            train_like={"step": state.step, "rng": state.rng},
            shardings={"params": layout.state.params, "opt_state": layout.state.opt_state,
                       "train": {"step": layout.state.step, "rng": layout.state.rng}},
        )
        rundir.check_same_config(
            meta.get("config", {}), config_dict, what=f"cannot resume {workdir}: its checkpoint",
            may_change=_RESUME_MAY_CHANGE, fix="Resume with the original config, or start a new --workdir.",
        )
        state = TrainState(train_state["step"], params, opt_state, train_state["rng"])
        start_epoch = int(meta["epoch"])
    writes = lead and not reevaluate
    if writes:
        rundir.write_json(workdir / rundir.CONFIG, config_dict, sort_keys=True)

    # Evaluation splits: replicated on the mesh (global arrays, multi-process safe).
    eval_splits = {
        name: {key: sharding_lib.replicate(array, mesh) for key, array in split_arrays[name].items()}
        for name in ("val", "test") if name in split_arrays
    }
    end_epoch = num_epochs if stop_after_epochs is None else min(num_epochs, start_epoch + stop_after_epochs)
    last_eval: dict = {}
    with rundir.MetricsLog(workdir, resume_from=start_epoch, purge_step=int(state.step), enabled=writes) as log, \
            ckpt.manager(checkpoint_dir, read_only=reevaluate) as mngr, tqdm(
        total=num_epochs, initial=start_epoch, desc=workdir.name, unit="epoch",
        disable=not (progress and config_dict.get("progress", True) and lead), leave=False,
    ) as bar:
        for epoch in range(start_epoch, end_epoch):
            t0 = time.perf_counter()
            state, train_metrics = train_epoch(state, teacher_params, train_data, np.asarray(epoch, np.int32))
            train_metrics = to_host(train_metrics)
            epoch_time = time.perf_counter() - t0
            last_eval = {name: to_host(evaluate(state.params, split)) for name, split in eval_splits.items()}
            _check_epoch_finite(epoch, train_metrics, last_eval, mngr)
            record = {"epoch": epoch + 1, "step": int(state.step), "epoch_time_s": round(epoch_time, 3),
                      "train": train_metrics, **last_eval}
            log.append(record)
            postfix = {"loss": f"{train_metrics['loss']:.4f}", "acc": f"{train_metrics['accuracy']:.4f}"}
            if "errors" in last_eval.get("test", {}):
                postfix["test_err"] = last_eval["test"]["errors"]
            bar.set_postfix(postfix)
            bar.update(1)
            if (epoch + 1) % int(config_dict.get("checkpoint_every", 1)) == 0 or epoch + 1 in (num_epochs, end_epoch):
                ckpt.save(mngr, epoch + 1, params=state.params, opt_state=state.opt_state,
                          step=state.step, rng=state.rng, meta={"config": config_dict})
    finished = end_epoch == num_epochs
    trained_now = bool(last_eval)
    if not trained_now:  # resumed a finished run: evaluate again
        last_eval = {name: to_host(evaluate(state.params, split)) for name, split in eval_splits.items()}
    results = {
        "finished": finished,
        "epochs": end_epoch,
        "num_train": num_train,
        "wall_time_s": rundir.training_time_s(workdir) if lead else None,
        "teacher_cached": "teacher_logits" in train_data,
        **last_eval,
    }
    results["mesh"] = {name: int(size) for name, size in mesh.shape.items()}
    # A finished run that is only reused keeps the results.json of the
    # invocation that trained it.
    if finished and lead and (trained_now or not (workdir / rundir.RESULTS).exists()):
        rundir.write_json(workdir / rundir.RESULTS, results)
    results["params"] = state.params
    return results


def _arrays(split, tokens: bool) -> dict[str, np.ndarray]:
    """A split as the dict of arrays the core trains on: ``image``/``label``, or a token split's arrays."""
    if tokens:
        if not isinstance(split, Mapping) or not {"inputs", "valid", "label", "mask"} <= set(split):
            raise ValueError(
                "a language-model split must be a dict with 'inputs', 'valid', 'label' and 'mask' arrays "
                f"(see distill_jax.proj.reasoning.task.token_splits), got {type(split).__name__}"
                + (f" with keys {sorted(split)}" if isinstance(split, Mapping) else "") + "."
            )
        arrays = {"inputs": np.asarray(split["inputs"], np.int32), "valid": np.asarray(split["valid"], bool),
                  "label": np.asarray(split["label"], np.int32), "mask": np.asarray(split["mask"], np.float32)}
        if "segments" in split:  # packed: several examples per row
            arrays["segments"] = np.asarray(split["segments"], np.int32)
        for key in _ALIGNED_ARRAYS:  # a teacher of another tokenizer: its tokens and the alignment
            if key in split:
                arrays[key] = np.asarray(split[key], bool if key == "teacher_valid" else
                                         np.float32 if key == "align_start" else np.int32)
        return arrays
    return {"image": np.asarray(split.images), "label": np.asarray(split.labels, np.int32)}


def _check_ids(split_arrays: Mapping[str, Mapping[str, np.ndarray]], num_classes: int, tokens: bool) -> None:
    """Labels (and token ids) outside the model's outputs are refused before training: under jit they would index wrongly."""
    what = "vocabulary" if tokens else "classes"
    for name, arrays in split_arrays.items():
        for key in ("label", "inputs") if tokens else ("label",):
            ids = arrays[key] if key == "label" else np.where(arrays["valid"], arrays[key], 0)
            if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
                raise ValueError(
                    f"the {name} split's {key!r} ids lie in [{ids.min()}, {ids.max()}], outside the model's "
                    f"{num_classes} {what} [0, {num_classes}). Set config.model to the data's "
                    f"{'vocabulary size' if tokens else 'number of classes'}, or fix the data."
                )


def _check_cross_tokenizer(config: Mapping[str, Any], train: Mapping[str, np.ndarray], teacher_model) -> int:
    """Checks a run whose teacher has another tokenizer; returns the teacher's vocabulary size.

    Losses that compare the two models' distributions token by token need
    one vocabulary and are refused; so are the paths that feed the teacher
    the student's tokens (a cached teacher, chunks, packing).
    """
    missing = [k for k in _ALIGNED_ARRAYS if k not in train]
    if missing:
        raise ValueError(f"cross-tokenizer training data lacks {missing}; make it with "
                         "distill_jax.data.alignment.encode_aligned_examples.")
    one_vocabulary = sorted({spec.get("loss") for spec in config["objective"].values()}
                            - {"cross_entropy", *CROSS_TOKENIZER_LOSSES})
    if one_vocabulary:
        raise ValueError(
            f"the teacher and the student have different tokenizers, but the objective's {one_vocabulary} compare "
            "their distributions token by token, which needs one vocabulary. Use aligned_kd or aligned_uld "
            "(cross-tokenizer KD), or cross_entropy on the teacher's samples (sequence-level KD)."
        )
    if int(config.get("chunk_size", 0) or 0):
        raise ValueError("config.chunk_size > 0 is not supported with a teacher of another tokenizer; set it to 0.")
    if "segments" in train:
        raise ValueError("packed rows are not supported with a teacher of another tokenizer; set config.task.pack=0.")
    if str(config.get("cache_teacher", "auto")).lower() == "true":
        raise ValueError("cache_teacher=true is not supported with a teacher of another tokenizer; use 'auto'.")
    if teacher_model is None:
        return int(np.max(train["teacher_inputs"])) + 1
    teacher_classes = models.num_outputs(teacher_model)
    ids = np.where(train["teacher_valid"], train["teacher_inputs"], 0)
    if ids.size and (ids.min() < 0 or ids.max() >= teacher_classes):
        raise ValueError(f"the teacher's token ids lie in [{ids.min()}, {ids.max()}], outside its {teacher_classes} "
                         "tokens: the data was tokenized with another teacher tokenizer.")
    return teacher_classes


def _jitter_images(key, batch: dict, *, max_shift: int) -> dict:
    return {**batch, "image": data_lib.jitter(key, batch["image"], max_shift)}


def default_config() -> ml_collections.ConfigDict:
    """Every key ``run`` reads, with defaults; experiments override a few."""
    c = ml_collections.ConfigDict()
    c.dataset = "mnist"
    c.data_dir = ""
    c.manual_dir = ""
    c.seed = 0
    c.split_seed = 0
    c.val_size = 0
    c.transfer = ml_collections.ConfigDict({"drop_classes": (), "keep_classes": (), "subset": 0})
    c.model = ml_collections.ConfigDict(
        {"name": "mlp", "hidden": (800, 800), "num_classes": 10, "input_dropout": 0.0, "hidden_dropout": 0.0, "max_norm": 0.0}
    )
    c.jitter = 0
    c.optimizer = ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True, "schedule": "cosine",
         "warmup_epochs": 0.0, "final_lr_fraction": 0.0, "weight_decay": 0.0}
    )
    c.batch_size = 128
    c.num_epochs = 10
    c.eval_batch_size = 1000
    c.objective = ml_collections.ConfigDict({"hard": {"loss": "cross_entropy", "weight": 1.0}})
    c.teacher = ml_collections.ConfigDict({"checkpoint": "", "top_k": 0})
    c.cache_teacher = "auto"
    c.checkpoint_every = 1
    # Sharding (distill_jax.sharding, docs/sharding.md): the device mesh and
    # the partition rules of teacher and student (a preset: replicated, fsdp,
    # tensor; or ';'-separated 'regex=spec' rules before one).
    c.mesh = "data=-1"
    c.teacher_partition = "replicated"
    c.student_partition = "replicated"
    return c
