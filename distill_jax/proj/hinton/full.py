"""Hinton, Vinyals & Dean (2015) section 3, the whole study (experiments/hinton_full.py).

For each dataset, in order (every stage checkpointed and reused on re-runs):

1. ``teacher_seed<s>``: one teacher per seed, by the ordinary run loop.
2. ``students_w<width>``: for each hidden width, one population of students
   (hard labels, and soft targets at every temperature of the grid, for every
   seed) trained as one vmapped program on the teachers' cached logits. The
   student with seed ``s`` distills teacher ``s``, so the spread over seeds
   includes the teachers' spread.
3. ``transfer_<name>``: 2x800 students distilled on a transfer set that lacks
   some classes (no 3s; only 7s and 8s), trained on the training set minus a
   validation split. The output-bias shift of the missing classes is chosen on
   that validation split, then applied to the test set.

Then one JSON with every number (mean and std over seeds, and each seed's),
a markdown table beside the paper's numbers, and the plots.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from distill_jax import data as data_lib
from distill_jax import models, objectives, training
from distill_jax.proj.hinton import recipes
from distill_jax.proj.hinton import report as hinton_report
from distill_jax.proj import stats
from distill_jax.training import checkpoint as ckpt
from distill_jax.training import population, rundir

# Hinton et al. 2015, section 3 (MNIST; test errors of 10,000 unless noted).
PAPER = {
    "teacher": 67,
    "hard_800": 146,
    "distilled_800_T20": 74,
    "omit_3": {"errors_before": 206, "errors_on_class_before": 133, "errors_after": 109,
               "errors_on_class_after": 14, "shift": 3.5, "class_count": 1010},
    "only_7_8": {"error_rate_before": 47.3, "error_rate_after": 13.2, "shift": 7.6},
}


# Test errors over seeds: mean and std to 2 decimals, and each seed's.
_mean_std = functools.partial(stats.mean_std, digits=2, with_values=True)


# ------------------------------------------------------------------ configs


def teacher_config(config, dataset: str, seed: int) -> ml_collections.ConfigDict:
    """The run config of one teacher: the recipe with this dataset, seed and epoch budget."""
    c = ml_collections.ConfigDict(config.teacher.to_dict())
    c.dataset = dataset
    c.seed = int(seed)
    c.num_epochs = int(config.epochs[dataset][0])
    if config.get("subset"):
        c.transfer.subset = int(config.subset)
    return c


def temperatures_for(config, width: int | None = None) -> tuple[float, ...]:
    """The temperature grid of one width: ``config.temperatures_by_width[str(width)]`` or ``config.temperatures``."""
    by_width = config.get("temperatures_by_width") or {}
    grid = by_width.get(str(width), config.temperatures) if width is not None else config.temperatures
    return tuple(float(t) for t in grid)


def student_members(config, width: int | None = None) -> list[dict[str, Any]]:
    """The members of one width's population: per seed, a hard-label student and one per T of its grid."""
    members = []
    for seed_index, seed in enumerate(config.seeds):
        members.append({"kind": "hard", "seed": int(seed), "teacher_index": seed_index,
                        "temperature": 1.0, "soft_weight": 0.0, "hard_weight": 1.0})
        for temperature in temperatures_for(config, width):
            members.append({"kind": "distilled", "seed": int(seed), "teacher_index": seed_index,
                            "temperature": float(temperature), "soft_weight": 1.0,
                            "hard_weight": float(config.hard_weight)})
    return members


def member_axis_for(config, width: int) -> str:
    """How one width's population shares its program (population.make_population_epoch): ``"vmap"`` or ``"map"``.

    ``config.member_axis_by_width[str(width)]``, else ``"vmap"``.
    """
    axis = str((config.get("member_axis_by_width") or {}).get(str(width), "vmap"))
    if axis not in population.MEMBER_AXES:
        raise ValueError(f"config.member_axis_by_width[{str(width)!r}]={axis!r}; choose one of {population.MEMBER_AXES}.")
    return axis


def patient_config(config, dataset: str, seed: int, teacher_dir: str) -> ml_collections.ConfigDict:
    """The run config of one patient-and-consistent student (Beyer et al. 2022).

    The T=20 row's student and objective, but every batch is jittered and the
    teacher runs in the loop on those very images (no cache), for
    ``config.patient.epochs`` epochs.
    """
    p = config.patient
    c = recipes.hinton_student(int(p.epochs), temperature=float(p.temperature),
                               hidden=(int(p.width), int(p.width)), dataset=dataset,
                               hard_weight=float(config.hard_weight), teacher_checkpoint=str(teacher_dir))
    c.seed = int(seed)
    c.jitter = int(p.jitter)
    c.cache_teacher = "false"
    if config.get("subset"):
        c.transfer.subset = int(config.subset)
    return c


def train_patient(config, study_dir: Path, dataset: str, teacher_dirs: Sequence[str], *,
                  progress: bool = True) -> list[dict]:
    """Trains (or reuses, or resumes) one patient-and-consistent student per seed; returns their results."""
    if len(teacher_dirs) != len(config.seeds):
        raise ValueError(f"{len(teacher_dirs)} teachers for {len(config.seeds)} seeds; one teacher per seed is needed.")
    out = []
    for seed, teacher_dir in zip(config.seeds, teacher_dirs):
        workdir = Path(study_dir) / dataset / f"patient_seed{seed}"
        results = training.run(patient_config(config, dataset, seed, teacher_dir), workdir, resume=True,
                               progress=progress)
        results.pop("params", None)
        out.append({"seed": int(seed), "workdir": str(workdir), "test_errors": int(results["test"]["errors"]),
                    "epochs": int(results["epochs"]), "wall_time_s": round(rundir.training_time_s(workdir), 1)})
    return out


def transfer_members(config) -> list[dict[str, Any]]:
    return [{"kind": "distilled", "seed": int(seed), "teacher_index": i,
             "temperature": float(config.transfer_temperature), "soft_weight": 1.0,
             "hard_weight": float(config.hard_weight)} for i, seed in enumerate(config.seeds)]


# ------------------------------------------------------------------ data and teachers


def load_data(config, dataset: str) -> dict[str, data_lib.Dataset]:
    """``train`` (all of it, for teachers and the main students), ``transfer_train``/``val`` and ``test``."""
    train, test = (_host(data_lib.load_split(dataset, split)) for split in ("train", "test"))
    if config.get("subset"):
        train = data_lib.take_subset(train, int(config.subset), seed=0)
    transfer_train, val = data_lib.train_val_split(train, int(config.val_size), seed=0)
    return {"train": train, "transfer_train": transfer_train, "val": val, "test": test}


def _host(ds: data_lib.Dataset) -> data_lib.Dataset:
    """Host copies (float32 images in [0, 1], as the run loop sees them), for numpy selection."""
    return data_lib.Dataset(np.asarray(ds.images), np.asarray(ds.labels))


def train_teachers(config, study_dir: Path, dataset: str, *, progress: bool = True) -> list[dict]:
    """Trains (or reuses, or resumes) one teacher per seed; returns their results."""
    teachers = []
    for seed in config.seeds:
        workdir = Path(study_dir) / dataset / f"teacher_seed{seed}"
        results = training.run(teacher_config(config, dataset, seed), workdir, resume=True, progress=progress)
        results.pop("params", None)
        teachers.append({"seed": int(seed), "workdir": str(workdir), "test_errors": int(results["test"]["errors"]),
                         "epochs": int(results["epochs"]), "wall_time_s": round(rundir.training_time_s(workdir), 1)})
    return teachers


def teacher_logits(teacher_dirs: Sequence[str], images: np.ndarray) -> jax.Array:
    """``[teachers, examples, classes]``: each teacher's logits on ``images`` (the cache)."""
    out = []
    for directory in teacher_dirs:
        apply_fn, params, _ = training.load_teacher(directory)
        out.append(training.make_predict(apply_fn)(params, jnp.asarray(images)))
    logits = jnp.stack(out)
    if not bool(jnp.all(jnp.isfinite(logits))):
        raise ValueError(f"a teacher in {list(teacher_dirs)} gives non-finite logits; retrain it.")
    return logits


# ------------------------------------------------------------------ populations


def member_step_factory(model, tx):
    """``make_step(hparams)`` for a population: Hinton's objective with traced T and weights."""

    def make_step(h):
        objective = objectives.hinton(h["temperature"], soft_weight=h["soft_weight"], hard_weight=h["hard_weight"])
        return training.make_train_step(model.apply, tx, objective)

    return make_step


def train_population(
    config,
    workdir: Path,
    *,
    width: int,
    members: list[dict[str, Any]],
    train: data_lib.Dataset,
    cached_logits: jax.Array,
    num_epochs: int,
    eval_splits: Mapping[str, data_lib.Dataset],
    progress: bool = True,
) -> dict[str, Any]:
    """Trains every member (one vmapped, scanned epoch at a time) with checkpoints; returns results.

    Returns ``{"members", "epochs", "wall_time_s", "logits": {split: [members, n, classes]},
    "evaluation": {split: per-member metrics}}``.
    """
    workdir = Path(workdir)
    student_config = ml_collections.ConfigDict(config.student.to_dict())
    student_config.model.hidden = (int(width), int(width))
    model = models.create(dict(student_config.model))
    num_classes = int(student_config.model.num_classes)
    batch_size = int(student_config.batch_size)
    num_train = int(train.labels.shape[0])
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{workdir.name}: {num_train} training examples, fewer than batch_size={batch_size}.")
    if cached_logits.shape[-1] != num_classes:
        raise ValueError(
            f"the teachers predict {cached_logits.shape[-1]} classes but the students have {num_classes}."
        )
    tx = training.make_optimizer(student_config.optimizer, steps_per_epoch, num_epochs)
    member_axis = member_axis_for(config, width)
    record = {"student": student_config.to_dict(), "width": int(width), "members": members,
              "num_epochs": int(num_epochs), "num_train": num_train}
    if member_axis != "vmap":  # recorded only then, so populations trained before the option still resume
        record["member_axis"] = member_axis
    record = json.loads(json.dumps(record, default=list))

    hparams = population.check_hparams(
        {key: np.asarray([m[key] for m in members], np.float32)
         for key in ("temperature", "soft_weight", "hard_weight")}, len(members))
    teacher_index = np.asarray([m["teacher_index"] for m in members])
    member_data = {"teacher_logits": cached_logits[teacher_index]}
    shared_data = {"image": jnp.asarray(train.images), "label": jnp.asarray(train.labels, jnp.int32)}

    epoch_fn = population.make_population_epoch(member_step_factory(model, tx), batch_size=batch_size,
                                                member_axis=member_axis)
    input_shape = (1,) + tuple(train.images.shape[1:])
    states = population.init_population(model, input_shape, tx, [m["seed"] for m in members])
    evaluate = population.population_map(
        training.make_evaluate(model.apply, num_classes=num_classes, batch_size=1000))

    checkpoint_dir = workdir / "checkpoints"
    start = ckpt.latest_epoch(checkpoint_dir) or 0
    if start:
        meta, params, opt_state, train_state = ckpt.restore_all(
            checkpoint_dir, params_like=states.params, opt_state_like=states.opt_state,
            train_like={"step": states.step, "rng": states.rng})
        rundir.check_same_config(meta.get("config", {}), record, what=f"the population checkpoint {checkpoint_dir}",
                                 fix="Delete that folder or restore the original config.")
        states = training.TrainState(train_state["step"], params, opt_state, train_state["rng"])
    with rundir.MetricsLog(workdir, resume_from=start, purge_step=start + 1, step_key="epoch") as log, \
            ckpt.manager(checkpoint_dir) as mngr, tqdm(
        total=num_epochs, initial=start, desc=f"{workdir.parent.name}/{workdir.name} ({len(members)} students)",
        unit="epoch", disable=not progress, leave=False,
    ) as bar:
        for epoch in range(start, num_epochs):
            t0 = time.perf_counter()
            states, train_metrics = epoch_fn(states, hparams, member_data, shared_data, np.asarray(epoch, np.int32))
            loss = np.asarray(train_metrics["loss"])
            epoch_time = time.perf_counter() - t0
            if not np.all(np.isfinite(loss)):
                raise FloatingPointError(f"{workdir.name} epoch {epoch + 1}: non-finite loss {loss.tolist()}.")
            test_errors = np.asarray(evaluate(states.params, jnp.asarray(eval_splits["test"].images),
                                              jnp.asarray(eval_splits["test"].labels, jnp.int32))["errors"])
            log.append({"epoch": epoch + 1, "epoch_time_s": round(epoch_time, 3),
                        "loss": loss.round(5).tolist(), "test_errors": test_errors.tolist()})
            ckpt.save(mngr, epoch + 1, params=states.params, opt_state=states.opt_state,
                      step=states.step, rng=states.rng, meta={"config": record})
            bar.set_postfix(best_test_err=int(test_errors.min()))
            bar.update(1)

    predict = population.population_map(training.make_predict(model.apply))
    logits, evaluation = {}, {}
    for name, split in eval_splits.items():
        images = jnp.asarray(split.images)
        logits[name] = np.asarray(predict(states.params, images))
        evaluation[name] = jax.device_get(evaluate(states.params, images, jnp.asarray(split.labels, jnp.int32)))
    return {"members": members, "epochs": num_epochs, "wall_time_s": round(rundir.training_time_s(workdir), 1),
            "logits": logits, "evaluation": evaluation}


# ------------------------------------------------------------------ bias shift


def shifted_errors(logits: np.ndarray, labels: np.ndarray, classes: Sequence[int], shifts: np.ndarray) -> np.ndarray:
    """Errors after adding each shift to the logits (= output biases) of ``classes``: ``[len(shifts)]``."""
    offset = np.zeros(logits.shape[-1], np.float32)
    offset[list(classes)] = 1.0
    shifted = logits[None] + shifts[:, None, None] * offset
    return np.sum(np.argmax(shifted, -1) != labels[None], axis=1)


def choose_shift(val_logits: np.ndarray, val_labels: np.ndarray, classes: Sequence[int], grid: Sequence[float],
                 sign: float) -> float:
    """The shift of the grid with the fewest validation errors (the smallest one on ties)."""
    grid = np.asarray(grid, np.float32)
    errors = shifted_errors(val_logits, val_labels, classes, sign * grid)
    return float(grid[int(np.argmin(errors))])


def transfer_result(config, spec, run: dict, splits: Mapping[str, data_lib.Dataset]) -> dict[str, Any]:
    """Test errors before/after the validation-chosen bias shift, per seed."""
    classes = list(spec.shift_classes)
    sign = float(spec.shift_sign)
    test = splits["test"]
    on_class = np.isin(test.labels, classes)
    per_seed = []
    for i, m in enumerate(run["members"]):
        shift = choose_shift(run["logits"]["val"][i], splits["val"].labels, classes, config.bias_shift_grid, sign)
        row = {"seed": m["seed"], "shift": shift}
        for when, value in (("before", 0.0), ("after", sign * shift)):
            predictions = np.argmax(run["logits"]["test"][i] + value * np.isin(np.arange(10), classes), -1)
            wrong = predictions != test.labels
            row[f"errors_{when}"] = int(wrong.sum())
            row[f"errors_on_class_{when}"] = int(wrong[on_class].sum())
            row[f"error_rate_{when}"] = round(100.0 * float(wrong.mean()), 2)
        per_seed.append(row)
    out = {"classes": classes, "class_count": int(on_class.sum()), "per_seed": per_seed,
           "epochs": run["epochs"], "wall_time_s": run["wall_time_s"]}
    for key in per_seed[0]:
        if key != "seed":
            out[key] = _mean_std([row[key] for row in per_seed])
    return out


# ------------------------------------------------------------------ teacher vs student


def agreement(teacher_logits: np.ndarray, student_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Where a student's errors come from: counts over ``[n, classes]`` logits.

    ``both_wrong`` are errors the student shares with its teacher,
    ``student_only``/``teacher_only`` the rest; ``disagreements`` counts
    examples whose predicted classes differ. ``centered_logit_rmse`` is the
    root-mean-square difference of the logits after subtracting each
    example's mean logit (the part soft targets at a high T depend on).
    """
    teacher_logits, student_logits = np.asarray(teacher_logits, np.float64), np.asarray(student_logits, np.float64)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {teacher_logits.shape} and student logits {student_logits.shape} differ.")
    teacher_pred, student_pred = teacher_logits.argmax(-1), student_logits.argmax(-1)
    teacher_wrong, student_wrong = teacher_pred != labels, student_pred != labels
    diff = (student_logits - student_logits.mean(-1, keepdims=True)) - (teacher_logits - teacher_logits.mean(-1, keepdims=True))
    return {"teacher_errors": int(teacher_wrong.sum()), "student_errors": int(student_wrong.sum()),
            "both_wrong": int((teacher_wrong & student_wrong).sum()),
            "student_only": int((student_wrong & ~teacher_wrong).sum()),
            "teacher_only": int((teacher_wrong & ~student_wrong).sum()),
            "disagreements": int((teacher_pred != student_pred).sum()),
            "centered_logit_rmse": round(float(np.sqrt(np.mean(diff**2))), 4)}


def compare_runs(teacher_dir: str, student_dir: str, *, dataset: str = "mnist", split: str = "test") -> dict[str, float]:
    """:func:`agreement` of two run directories' final models on a TFDS split.

      python -c "from distill_jax.proj.hinton import full; print(full.compare_runs(
          'runs/hinton_full_idrop02/mnist/teacher_seed0', 'runs/hinton_student_tuning/hard0.1_adam1e-3_e40'))"
    """
    ds = data_lib.load_split(dataset, split)
    teacher, student = np.asarray(teacher_logits([teacher_dir, student_dir], ds.images))
    return agreement(teacher, student, np.asarray(ds.labels))


# ------------------------------------------------------------------ the study


def run_dataset(config, study_dir: Path, dataset: str, *, progress: bool = True) -> dict[str, Any]:
    """Every stage of one dataset; returns its part of the results JSON."""
    teacher_epochs, student_epochs = (int(e) for e in config.epochs[dataset])
    splits = load_data(config, dataset)
    teachers = train_teachers(config, study_dir, dataset, progress=progress)
    teacher_dirs = [t["workdir"] for t in teachers]
    out: dict[str, Any] = {
        "teacher": {"test_errors": _mean_std([t["test_errors"] for t in teachers]), "per_seed": teachers,
                    "epochs": teacher_epochs, "wall_time_s": round(sum(t["wall_time_s"] for t in teachers), 1)},
        "students": {},
        "transfer": {},
    }
    cache = teacher_logits(teacher_dirs, splits["train"].images)
    for width in config.widths:
        members = student_members(config, width)
        run = train_population(
            config, Path(study_dir) / dataset / f"students_w{width}", width=width, members=members,
            train=splits["train"], cached_logits=cache, num_epochs=student_epochs,
            eval_splits={"test": splits["test"]}, progress=progress)
        errors = np.asarray(run["evaluation"]["test"]["errors"])
        rows = {}
        for key in ["hard"] + [f"T{_fmt_t(t)}" for t in temperatures_for(config, width)]:
            picked = [i for i, m in enumerate(members) if _member_key(m) == key]
            rows[key] = {"test_errors": _mean_std(errors[picked]),
                         "seeds": [members[i]["seed"] for i in picked]}
        out["students"][str(width)] = {"rows": rows, "epochs": student_epochs, "wall_time_s": run["wall_time_s"],
                                       "members": len(members)}
    del cache
    if config.get("patient"):
        patient = train_patient(config, study_dir, dataset, teacher_dirs, progress=progress)
        out["patient"] = {"test_errors": _mean_std([p["test_errors"] for p in patient]), "per_seed": patient,
                          "epochs": int(config.patient.epochs), "width": int(config.patient.width),
                          "temperature": float(config.patient.temperature), "jitter": int(config.patient.jitter),
                          "wall_time_s": round(sum(p["wall_time_s"] for p in patient), 1)}
    transfer_sets = tuple(config.get("transfer_sets", ("omit_3", "only_7_8")))
    transfer_cache = teacher_logits(teacher_dirs, splits["transfer_train"].images) if transfer_sets else None
    for name in transfer_sets:
        spec = config.transfer[name]
        keep = np.ones(len(splits["transfer_train"].labels), bool)
        if spec.drop_classes:
            keep &= ~np.isin(splits["transfer_train"].labels, list(spec.drop_classes))
        if spec.keep_classes:
            keep &= np.isin(splits["transfer_train"].labels, list(spec.keep_classes))
        subset = data_lib.Dataset(splits["transfer_train"].images[keep], splits["transfer_train"].labels[keep])
        run = train_population(
            config, Path(study_dir) / dataset / f"transfer_{name}", width=int(config.transfer_width),
            members=transfer_members(config), train=subset, cached_logits=transfer_cache[:, keep],
            num_epochs=student_epochs * int(spec.epochs_factor),
            eval_splits={"val": splits["val"], "test": splits["test"]}, progress=progress)
        out["transfer"][name] = transfer_result(config, spec, run, splits) | {"num_train": int(keep.sum())}
    out["dark_knowledge"] = dark_knowledge_examples(config, teacher_dirs[0], splits["test"])
    return out


def _fmt_t(t: float) -> str:
    return f"{t:g}"


def _member_key(m: Mapping[str, Any]) -> str:
    return "hard" if m["kind"] == "hard" else f"T{_fmt_t(m['temperature'])}"


def dark_knowledge_examples(config, teacher_dir: str, test: data_lib.Dataset, per_class: int = 1,
                            classes: Sequence[int] = (2, 3, 7, 9)) -> dict[str, Any]:
    """The teacher's soft targets at the configured temperatures for a few test digits."""
    indices = [int(np.flatnonzero(test.labels == c)[0]) for c in classes for _ in range(per_class)]
    apply_fn, params, _ = training.load_teacher(teacher_dir)
    logits = np.asarray(apply_fn(params, jnp.asarray(test.images[indices]), train=False), np.float64)
    soft = {}
    for t in config.dark_knowledge_temperatures:
        z = logits / float(t)
        z = np.exp(z - z.max(-1, keepdims=True))
        soft[_fmt_t(float(t))] = (z / z.sum(-1, keepdims=True)).round(6).tolist()
    return {"indices": indices, "labels": [int(test.labels[i]) for i in indices], "logits": logits.round(4).tolist(),
            "soft_targets": soft}


def run_study(config, *, runs_root: Path, results_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The whole study: every dataset, then the JSON, the markdown tables and the plots."""
    started = time.perf_counter()
    for width in config.widths:  # a bad member axis fails now, not after the teachers have trained
        member_axis_for(config, width)
    study_dir = Path(runs_root) / config.name
    summary = {"study": config.name, "profile": config.profile, "seeds": list(config.seeds), "datasets": {},
               "paper": PAPER, "config": json.loads(config.to_json_best_effort())}
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    for dataset in config.datasets:
        summary["datasets"][dataset] = run_dataset(config, study_dir, dataset, progress=progress)
        summary["session_wall_time_s"] = round(time.perf_counter() - started, 1)
        # Written after every dataset, so a long study's first column is
        # readable while the next one trains.
        table = write_report(summary, results_dir)
        print(f"[{config.name}] {dataset} done ({summary['session_wall_time_s']:.0f} s so far)", flush=True)
    print(table)
    return summary


def write_report(summary: Mapping[str, Any], results_dir: Path) -> str:
    """``<study>.json``, ``<study>.md`` and the plots; returns the markdown."""
    table = hinton_report.markdown(summary)
    (results_dir / f"{summary['study']}.json").write_text(json.dumps(summary, indent=2))
    (results_dir / f"{summary['study']}.md").write_text(table)
    hinton_report.plots(summary, results_dir)
    return table
