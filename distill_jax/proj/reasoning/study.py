"""The reasoning-distillation study (``make reproduce-reasoning``): can a student beat its teacher?

Questions: does a student distilled from a teacher's verified chain-of-thought
samples (the DeepSeek-R1 recipe) beat that teacher, and what does the verifier
buy; does on-policy distillation (GKD) beat the same compute spent on more
supervised fine-tuning. The design (on the arithmetic task of
:mod:`distill_jax.proj.reasoning.task`):

1. **One teacher run, two strengths.** The teacher is trained once on
   ground-truth traces with a checkpoint every ``teacher.eval_every`` steps;
   the *weak* teacher is the first checkpoint whose validation greedy accuracy
   lies in ``teacher.weak_range``, the *strong* one the best on validation.
   Both are reported with greedy accuracy and pass@k on test.
2. **Pools of teacher outputs per strength**: its greedy output for every
   training problem (no verifier); all distinct *answer-verified* samples of
   K per problem (R1's rule-based reward); the *trace-verified* ones among
   them (answer and every trace step right). Pool sizes and acceptance rates
   are reported.
3. **Rows** (students, every one trained with the same budget and its
   checkpoint chosen on validation greedy accuracy, never on test):
   ``gt_answers`` / ``gt_traces`` (ground truth, once); per strength ``S``:
   ``S_greedy``, ``S_answer``, ``S_trace`` (SFT on each pool), ``S_tokenkd``
   (forward KL to teacher S on the answer-verified pool), ``S_gkd`` (started
   from ``S_answer``: on-policy generalized JSD with teacher S for
   ``finetune.steps`` more steps) against ``S_sft_more`` (the compute-matched
   control: the same start, the same extra steps of SFT on the same pool),
   and ``S_answer_<P>pct`` / ``S_trace_<P>pct`` on P % of a pool (accuracy
   against the number of verified samples).
4. **Statistics**: every student row runs for every seed, paired (the same
   seed gives the same initialization, and the same batch order on the same
   data); each row's test accuracy and each paired difference the
   conclusions rest on come with a two-level bootstrap 95 % interval over
   seeds and test problems (:func:`distill_jax.proj.stats.bootstrap_ci`).
   The primary result: best student (chosen on validation) minus teacher, per
   strength, against the teacher's greedy accuracy and its pass@k.
5. **OOD**: operand combinations absent from every other split: units
   digits ``task.held_out_units`` (e.g. 3 + 8: added in training only at the
   tens and hundreds), and optionally operand-length pairs ``task.held_out``.
   (Unseen operand-length pairs such as 1 + 3 digits score 0 % for every
   model, teachers included, in the quick profile: a prompt layout never
   seen, the length-generalization failure of standard positions.)

Teacher, selection and pools run once, in this process, and are saved under
``<runs>/<name>/``; seeds then run in single-core worker processes and are
saved one file each, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import serialization

from distill_jax.models.transformer import TransformerConfig
from distill_jax.proj.reasoning import sequence as seq
from distill_jax.proj.reasoning import task as reasoning
from distill_jax.proj.stats import bootstrap_ci, from_bits, to_bits
from distill_jax.training import rundir
from distill_jax.training.checkpoint import CheckpointMismatchError

__all__ = ["run_reasoning_study", "summarize", "markdown_report", "STRENGTHS"]

STRENGTHS = ("weak", "strong")
POOLS = ("greedy", "answer", "trace")


# ------------------------------------------------------------------ task, models, evaluation


class _Task:
    """The splits and the padded shapes every stage shares (one compiled shape each)."""

    def __init__(self, config: ml_collections.ConfigDict):
        t = config.task
        self.splits = reasoning.make_study_splits(
            int(t.data_seed), num_train=int(t.num_train), num_val=int(t.num_val), num_test=int(t.num_test),
            num_ood=int(t.num_ood), max_digits=int(t.max_digits), held_out=tuple(tuple(p) for p in t.held_out),
            held_out_units=tuple(tuple(p) for p in t.held_out_units),
        )
        self.prompt_len = reasoning.max_prompt_len(int(t.max_digits))
        self.new_tokens = reasoning.max_completion_len(int(t.max_digits))
        self.train_len = self.prompt_len + self.new_tokens
        self.train_prompts = dict(zip(("tokens", "valid"), reasoning.prompt_arrays(self.splits["train"], length=self.prompt_len)))

    def arrays(self, problems, fmt="trace") -> dict[str, np.ndarray]:
        return reasoning.encode_problems(problems, fmt, length=self.train_len)

    def arrays_of(self, pairs: Sequence[tuple[int, str]]) -> dict[str, np.ndarray]:
        train = self.splits["train"]
        return reasoning.encode_examples([train[i].prompt for i, _ in pairs], [c for _, c in pairs], length=self.train_len)


def _model(config: Mapping[str, Any], task: _Task) -> TransformerConfig:
    return TransformerConfig.from_mapping(dict(config) | {"vocab_size": reasoning.TOKENIZER.vocab_size, "max_len": task.train_len})


def _optimizer(stage: Mapping[str, Any]) -> seq.OptimizerSpec:
    return seq.OptimizerSpec(
        learning_rate=float(stage.learning_rate), steps=int(stage.steps), warmup_steps=int(stage.warmup_steps),
        weight_decay=float(stage.get("weight_decay", 0.01)),
    )


def _generate(model, params, problems, task, batch_size, *, key=0, temperature=0.0, num_samples=1):
    return seq.generate_for(model, params, problems, key=jax.random.key(key), max_new_tokens=task.new_tokens,
                            temperature=temperature, num_samples=num_samples, batch_size=batch_size, prompt_len=task.prompt_len)


def _greedy_correct(model, params, problems, task, batch_size) -> np.ndarray:
    """Per-problem exact-match correctness of greedy decoding."""
    out = _generate(model, params, problems, task, batch_size)
    return np.array([reasoning.verify(p, g[0]) for p, g in zip(problems, out)], bool)


def _pass_at_k(model, params, problems, task, batch_size, *, k, temperature, key) -> np.ndarray:
    """Per-problem: is any of k samples at ``temperature`` correct."""
    out = _generate(model, params, problems, task, batch_size, key=key, temperature=temperature, num_samples=k)
    return np.array([any(reasoning.verify(p, s) for s in ss) for p, ss in zip(problems, out)], bool)


def _choose_on_val(model, checkpoints, task, batch_size) -> tuple[int, Any, list]:
    """The checkpoint with the best validation greedy accuracy (the earliest of equals), and the curve."""
    curve = [(step, float(_greedy_correct(model, params, task.splits["val"], task, batch_size).mean())) for step, params in checkpoints]
    best = max(range(len(curve)), key=lambda i: (curve[i][1], -i))
    return curve[best][0], checkpoints[best][1], curve


# ------------------------------------------------------------------ shared stage: teacher, strengths, pools


def _shared_fingerprint(config) -> str:
    c = json.loads(config.to_json_best_effort())
    return rundir.fingerprint({k: c[k] for k in ("task", "teacher", "eval", "samples")})


def _seed_fingerprint(config) -> str:
    return rundir.fingerprint(json.loads(config.to_json_best_effort()), ignore=("seeds", "workers", "title"))


def _refuse_other_config(path: Path, found: str, wanted: str) -> None:
    if found != wanted:
        raise CheckpointMismatchError(
            f"{path} was made by a run of this study with another config. Delete {path.parent} to start over, "
            "or give this config another name (--config.name=...)."
        )


def _pick_strengths(curve: list[tuple[int, float]], weak_range: Sequence[float]) -> dict[str, int]:
    """Checkpoint indices: weak = first in ``weak_range`` (else the closest to its middle), strong = best (earliest of equals)."""
    low, high = map(float, weak_range)
    inside = [i for i, (_, acc) in enumerate(curve) if low <= acc <= high]
    middle = (low + high) / 2
    weak = inside[0] if inside else min(range(len(curve)), key=lambda i: (abs(curve[i][1] - middle), i))
    strong = max(range(len(curve)), key=lambda i: (curve[i][1], -i))
    return {"weak": weak, "strong": strong}


def _shared_stage(config, task: _Task, study_dir: Path, log) -> dict[str, Any]:
    """Trains the teacher, picks its two strengths on validation, evaluates them, builds the pools; cached on disk."""
    meta_file, params_file = study_dir / "teachers.json", study_dir / "teachers.msgpack"
    fingerprint = _shared_fingerprint(config)
    if meta_file.exists() and params_file.exists():
        meta = json.loads(meta_file.read_text())
        _refuse_other_config(meta_file, meta["fingerprint"], fingerprint)
        log(f"teachers and pools: reusing {meta_file}")
        return meta | {"params": serialization.msgpack_restore(params_file.read_bytes())}
    c, e = config, config.eval
    model = _model(c.teacher.model, task)
    batch = int(e.batch_size)
    t0 = time.perf_counter()
    _, history = seq.train(
        model, task.arrays(task.splits["train"]), spec=seq.LossSpec("sft"), optimizer=_optimizer(c.teacher),
        batch_size=int(c.teacher.batch_size), seed=int(c.teacher.seed), checkpoint_every=int(c.teacher.eval_every),
    )
    train_s = time.perf_counter() - t0
    checkpoints = history["checkpoints"]
    curve = [(step, float(_greedy_correct(model, p, task.splits["val"], task, batch).mean())) for step, p in checkpoints]
    log("teacher validation curve: " + ", ".join(f"{s}:{a:.3f}" for s, a in curve))
    picks = _pick_strengths(curve, c.teacher.weak_range)
    meta: dict[str, Any] = {"fingerprint": fingerprint, "val_curve": curve, "train_wall_s": round(train_s, 1), "teachers": {}, "pools": {}}
    params = {}
    k, s = int(e.pass_k), c.samples
    for strength, index in picks.items():
        step, p = checkpoints[index]
        params[strength] = p
        row = {"step": step, "val": curve[index][1], "weak_range": list(c.teacher.weak_range)}
        for split in ("test", "ood"):
            row[f"{split}_correct"] = to_bits(_greedy_correct(model, p, task.splits[split], task, batch))
            row[f"{split}_pass@{k}_correct"] = to_bits(_pass_at_k(model, p, task.splits[split], task, batch, k=k,
                                                                temperature=float(e.pass_temperature), key=17))
        meta["teachers"][strength] = row
        # Pools: greedy outputs (no verifier), K samples filtered by the answer, and by answer + trace.
        t0 = time.perf_counter()
        train = task.splits["train"]
        greedy = _generate(model, p, train, task, batch)
        samples = _generate(model, p, train, task, batch, key=29, temperature=float(s.temperature), num_samples=int(s.num_samples))
        text = lambda ids: reasoning.TOKENIZER.decode(ids, stop_at_eos=True, skip_pad=False)
        pools = {"greedy": [(i, text(g[0])) for i, g in enumerate(greedy) if reasoning.EOS in g[0]], "answer": [], "trace": []}
        accepted = {"answer": 0, "trace": 0}
        for i, (problem, outs) in enumerate(zip(train, samples)):
            for name, check in (("answer", reasoning.verify), ("trace", reasoning.verify_trace)):
                ok = [o for o in outs if check(problem, o)]
                accepted[name] += len(ok)
                pools[name] += [(i, t) for t in sorted({text(o) for o in ok})]
        sampled = len(train) * int(s.num_samples)
        meta["pools"][strength] = {
            "pairs": pools,
            "stats": {
                "sampled": sampled,
                "greedy_correct": float(np.mean([reasoning.verify(train[i], t) for i, t in pools["greedy"]])) if pools["greedy"] else 0.0,
                **{f"{n}_acceptance": accepted[n] / max(sampled, 1) for n in ("answer", "trace")},
                **{f"{n}_pool": len(pools[n]) for n in POOLS},
                **{f"{n}_problems_covered": len({i for i, _ in pools[n]}) / max(len(train), 1) for n in ("answer", "trace")},
                "wall_s": round(time.perf_counter() - t0, 1),
            },
        }
        log(f"teacher {strength} (step {step}): val {row['val']:.3f}, test {from_bits(row['test_correct']).mean():.3f}; "
            f"pools {', '.join(f'{n} {len(pools[n])}' for n in POOLS)}")
    rundir.write_json(meta_file, meta, indent=None)
    params_file.write_bytes(serialization.msgpack_serialize(params))
    return meta | {"params": params}


# ------------------------------------------------------------------ one seed: every student row


class _Runner:
    def __init__(self, config, task: _Task, shared: Mapping[str, Any], seed: int, log):
        self.c, self.task, self.shared, self.seed, self.log = config, task, shared, seed, log
        self.student = _model(config.student.model, task)
        self.teacher_model = _model(config.teacher.model, task)
        self.rows: dict[str, dict] = {}
        self.params: dict[str, Any] = {}

    def fit(self, name, stage, data, spec, **kwargs):
        """Trains one row (checkpoint chosen on validation), evaluates it on test and OOD, records it; returns its params."""
        t0 = time.perf_counter()
        _, history = seq.train(
            self.student, data, spec=spec, optimizer=_optimizer(stage), batch_size=int(stage.batch_size),
            seed=self.seed, checkpoint_every=int(stage.eval_every), **kwargs,
        )
        train_s = time.perf_counter() - t0
        batch = int(self.c.eval.batch_size)
        step, params, curve = _choose_on_val(self.student, history["checkpoints"], self.task, batch)
        row = {"step": step, "val": dict(curve)[step], "val_curve": curve, "train_wall_s": round(train_s, 1),
               "train_examples": int(len(data["inputs"])), "final_loss": history["final_loss"]}
        for split in ("test", "ood"):
            row[f"{split}_correct"] = to_bits(_greedy_correct(self.student, params, self.task.splits[split], self.task, batch))
        self.rows[name], self.params[name] = row, params
        self.log(f"seed {self.seed} {name}: val {row['val']:.3f} (step {step}), test {from_bits(row['test_correct']).mean():.3f} "
                 f"({train_s:.0f} s)")
        return params

    def run(self) -> dict[str, Any]:
        c, task = self.c, self.task
        train, sft = task.splits["train"], seq.LossSpec("sft")
        wanted = set(c.rows)
        if "gt_answers" in wanted:
            self.fit("gt_answers", c.student, task.arrays(train, "answer"), sft)
        if "gt_traces" in wanted:
            self.fit("gt_traces", c.student, task.arrays(train, "trace"), sft)
        g = c.gkd
        for strength in STRENGTHS:
            teacher = [(self.teacher_model, self.shared["params"][strength])]
            pairs = self.shared["pools"][strength]["pairs"]
            for pool in POOLS:
                if pool in wanted and pairs[pool]:
                    self.fit(f"{strength}_{pool}", c.student, task.arrays_of(pairs[pool]), sft)
            if not pairs["answer"]:
                self.log(f"seed {self.seed} {strength}: no answer-verified sample; its KD rows are skipped")
                continue
            answer_data = task.arrays_of(pairs["answer"])
            if "tokenkd" in wanted:
                self.fit(f"{strength}_tokenkd", c.student, answer_data,
                         seq.LossSpec("forward_kl", temperature=float(c.token_kd.temperature)), teachers=teacher)
            if wanted & {"gkd", "sft_more"}:
                # Both start from the SFT'd student of this strength, at its checkpoint chosen on validation.
                base = self.params.get(f"{strength}_answer")
                if base is None:
                    base = self.fit(f"{strength}_answer", c.student, answer_data, sft)
                if "gkd" in wanted:
                    self.fit(f"{strength}_gkd", c.finetune, answer_data,
                             seq.LossSpec("gkd", beta=float(g.beta), temperature=float(g.temperature)), teachers=teacher,
                             params=base, on_policy_fraction=float(g.on_policy_fraction), prompts=task.train_prompts,
                             max_new_tokens=task.new_tokens, on_policy_temperature=float(g.sample_temperature))
                if "sft_more" in wanted:
                    self.fit(f"{strength}_sft_more", c.finetune, answer_data, sft, params=base)
            if "curve" in wanted:
                rng = np.random.default_rng(self.seed)
                for pool in ("answer", "trace"):
                    for fraction in sorted(c.samples.curve_fractions):
                        n = int(round(fraction * len(pairs[pool])))
                        if 1 <= n < len(pairs[pool]):
                            subset = [pairs[pool][i] for i in sorted(rng.choice(len(pairs[pool]), n, replace=False))]
                            self.fit(f"{strength}_{pool}_{int(round(100 * fraction))}pct", c.student, task.arrays_of(subset), sft)
        return {"rows": self.rows}


def _run_seed(config_dict: dict, seed: int, progress: bool, study_dir: str) -> dict[str, Any]:
    """One seed's rows (in this process or a worker), saved to ``<study_dir>/seed<N>.json``."""
    config = ml_collections.ConfigDict(config_dict)
    log = (lambda msg: print(f"[{config.name}] {msg}", flush=True)) if progress else (lambda msg: None)
    task = _Task(config)
    shared = _shared_stage(config, task, Path(study_dir), lambda msg: None)
    started = time.perf_counter()
    result = _Runner(config, task, shared, int(seed), log).run()
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    rundir.write_json(Path(study_dir) / f"seed{seed}.json",
                      {"fingerprint": _seed_fingerprint(config), "seed": int(seed), "result": result}, indent=None)
    return result


def _load_seed(seed_file: Path, config) -> dict[str, Any] | None:
    if not seed_file.exists():
        return None
    record = json.loads(seed_file.read_text())
    _refuse_other_config(seed_file, record["fingerprint"], _seed_fingerprint(config))
    return record["result"]


def _pin_worker(slots, cores: list[int]) -> None:
    """Pins a worker process to one core of its own.

    XLA's CPU thread pool spends much of its time synchronizing on the small
    matmuls of these models; one single-core process per seed is measured
    faster in total (RESULTS.md; benchmarks/lm_step.py).
    """
    with slots.get_lock():
        index = slots.value
        slots.value += 1
    if hasattr(os, "sched_setaffinity") and cores:
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def _run_seeds_in_workers(config, todo, progress, study_dir, workers: int) -> dict[int, dict]:
    import concurrent.futures
    import multiprocessing

    # glibc returns big freed blocks to the OS and maps new ones on every
    # step (measured: a third of a step's time in the kernel); workers
    # inherit these settings at start.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**31 - 1))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**31 - 1))
    ctx = multiprocessing.get_context("spawn")  # a fork of a process that has started XLA threads is unsafe
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    slots = ctx.Value("i", 0)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_pin_worker, initargs=(slots, cores)
    ) as pool:
        futures = {seed: pool.submit(_run_seed, config.to_dict(), seed, progress, str(study_dir)) for seed in todo}
        return {seed: future.result() for seed, future in futures.items()}


# ------------------------------------------------------------------ summary: intervals, differences, table, plots


def _matrix(per_seed: Sequence[Mapping], name: str, key: str) -> np.ndarray | None:
    """``[seeds, problems]`` 0/1 scores of one row (None unless every seed has it: pairing needs all)."""
    if not all(name in r["rows"] for r in per_seed):
        return None
    return np.stack([from_bits(r["rows"][name][key]) for r in per_seed]).astype(np.float64)


def summarize(shared: Mapping[str, Any], per_seed: Sequence[Mapping], task: _Task, config) -> dict[str, Any]:
    """Row intervals, by-length accuracy, and the paired differences the conclusions rest on."""
    k = int(config.eval.pass_k)
    teachers = {}
    for strength, t in shared["teachers"].items():
        teachers[strength] = {"step": t["step"], "val": t["val"]} | {
            f"{split}{suffix}": bootstrap_ci(from_bits(t[f"{split}{suffix}_correct"]))
            for split in ("test", "ood") for suffix in ("", f"_pass@{k}")}
    lengths = np.array([max(reasoning.operand_lengths(p)) for p in task.splits["test"]])
    names = [n for n in per_seed[0]["rows"] if all(n in r["rows"] for r in per_seed)]
    rows = {}
    for name in names:
        test, ood = _matrix(per_seed, name, "test_correct"), _matrix(per_seed, name, "ood_correct")
        rows[name] = {
            "test": bootstrap_ci(test), "ood": bootstrap_ci(ood),
            "val": float(np.mean([r["rows"][name]["val"] for r in per_seed])),
            "step": [r["rows"][name]["step"] for r in per_seed],
            "train_examples": int(per_seed[0]["rows"][name]["train_examples"]),
            "train_wall_s": float(np.mean([r["rows"][name]["train_wall_s"] for r in per_seed])),
            "by_length": {int(d): float(test[:, lengths == d].mean()) for d in np.unique(lengths)},
        }
        strength = name.split("_")[0]
        if strength in shared["teachers"]:
            t = shared["teachers"][strength]
            rows[name]["minus_teacher"] = bootstrap_ci(test - from_bits(t["test_correct"]))
            rows[name][f"minus_teacher_pass@{k}"] = bootstrap_ci(test - from_bits(t[f"test_pass@{k}_correct"]))
    comparisons = {}

    def diff(label, a, b):
        if a in rows and b in rows:
            comparisons[label] = {"rows": [a, b], **bootstrap_ci(_matrix(per_seed, a, "test_correct") - _matrix(per_seed, b, "test_correct"))}

    best = {}
    for s in STRENGTHS:
        candidates = [n for n in rows if n.startswith(f"{s}_") and not n.endswith("pct")]
        if candidates:  # chosen on validation accuracy, never on test
            best[s] = max(candidates, key=lambda n: rows[n]["val"])
        diff(f"{s}: on-policy GKD minus compute-matched SFT", f"{s}_gkd", f"{s}_sft_more")
        diff(f"{s}: trace verifier minus answer verifier", f"{s}_trace", f"{s}_answer")
        diff(f"{s}: answer verifier minus no verifier (greedy outputs)", f"{s}_answer", f"{s}_greedy")
        diff(f"{s}: token KD minus SFT on the same pool", f"{s}_tokenkd", f"{s}_answer")
    diff("ground-truth traces minus answers only", "gt_traces", "gt_answers")
    return {"teachers": teachers, "rows": rows, "best_student": best, "comparisons": comparisons,
            "pools": {s: p["stats"] for s, p in shared["pools"].items()}, "pass_k": k}


def _ci(stat: Mapping[str, float] | None, signed: bool = False) -> str:
    if stat is None:
        return ""
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * stat['mean'])} [{f.format(100 * stat['low'])}, {f.format(100 * stat['high'])}]"


def markdown_report(summary: Mapping[str, Any], title: str, seeds: Sequence[int], wall_s: float) -> str:
    k = summary["pass_k"]
    out = [f"## {title}", "", "Accuracy in %, mean over seeds and test problems, with two-level bootstrap 95 % intervals "
           f"(seeds {list(seeds)} paired across rows; checkpoints chosen on validation).", "",
           f"| teacher | step | val greedy | test greedy | test pass@{k} | OOD greedy | OOD pass@{k} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s, t in summary["teachers"].items():
        out.append(f"| {s} | {t['step']} | {100 * t['val']:.1f} | {_ci(t['test'])} | {_ci(t[f'test_pass@{k}'])} | "
                   f"{_ci(t['ood'])} | {_ci(t[f'ood_pass@{k}'])} |")
    out += ["", "| pool | greedy outputs | of them correct | answer-verified | answer acceptance | trace-verified | trace acceptance |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for s, p in summary["pools"].items():
        out.append(f"| {s} teacher | {p['greedy_pool']} | {100 * p['greedy_correct']:.1f} % | {p['answer_pool']} | "
                   f"{100 * p['answer_acceptance']:.1f} % | {p['trace_pool']} | {100 * p['trace_acceptance']:.1f} % |")
    lengths = sorted({d for r in summary["rows"].values() for d in r["by_length"]})
    out += ["", "| student row | train examples | val | test greedy | student − teacher (greedy) | student − teacher pass@k | OOD greedy | "
            + " | ".join(f"test, {d}-digit" for d in lengths) + " |", "|---|" + "---:|" * (6 + len(lengths))]
    for name, r in summary["rows"].items():
        out.append(f"| {name} | {r['train_examples']} | {100 * r['val']:.1f} | {_ci(r['test'])} | {_ci(r.get('minus_teacher'), True)} | "
                   f"{_ci(r.get(f'minus_teacher_pass@{k}'), True)} | {_ci(r['ood'])} | "
                   + " | ".join(f"{100 * r['by_length'].get(d, float('nan')):.1f}" for d in lengths) + " |")
    out += ["", "Paired differences (test greedy, percentage points):", ""]
    for label, d in summary["comparisons"].items():
        out.append(f"- {label}: {_ci(d, True)}")
    for s, name in summary["best_student"].items():
        r = summary["rows"][name]
        out.append(f"- best {s}-teacher student on validation ({name}) minus the {s} teacher: {_ci(r['minus_teacher'], True)} "
                   f"(against its pass@{k}: {_ci(r[f'minus_teacher_pass@{k}'], True)})")
    out += ["", f"Total wall time: {wall_s:.0f} s.", ""]
    return "\n".join(out)


def _plots(summary: Mapping[str, Any], results_dir: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for color, s in zip(("C0", "C1"), STRENGTHS):
        for style, pool in (("o-", "answer"), ("s--", "trace")):
            points = sorted((r["train_examples"], r["test"]) for n, r in rows.items()
                            if n == f"{s}_{pool}" or (n.startswith(f"{s}_{pool}_") and n.endswith("pct")))
            if points:
                x = [p[0] for p in points]
                ax.errorbar(x, [100 * p[1]["mean"] for p in points],
                            yerr=[[100 * (p[1]["mean"] - p[1]["low"]) for p in points], [100 * (p[1]["high"] - p[1]["mean"]) for p in points]],
                            fmt=style, color=color, capsize=3, label=f"{s} teacher, {pool}-verified")
    ax.set_xlabel("verified teacher samples used for fine-tuning")
    ax.set_ylabel("student test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / f"{name}_samples.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    names = [n for n in rows if "minus_teacher" in rows[n] and not n.endswith("pct")]
    if names:
        y = np.arange(len(names))
        d = [rows[n]["minus_teacher"] for n in names]
        ax.errorbar([100 * x["mean"] for x in d], y, xerr=[[100 * (x["mean"] - x["low"]) for x in d], [100 * (x["high"] - x["mean"]) for x in d]],
                    fmt="o", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, names, fontsize=7)
        ax.set_xlabel("student − its teacher, test greedy accuracy (points, 95 % CI)")
        fig.tight_layout()
        fig.savefig(results_dir / f"{name}_student_minus_teacher.png", dpi=120)
    plt.close(fig)


def run_reasoning_study(
    config: ml_collections.ConfigDict, *, results_dir: Path, runs_root: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Runs the study (teacher stage, then every seed), prints the report, writes ``results/<name>.{json,md}`` and plots.

    Each stage is saved under ``<runs_root>/<name>/`` and reused by a later
    run of the same config (another config is refused with
    :class:`CheckpointMismatchError`). ``config.workers`` > 1 runs that many
    seeds at once, one single-core process each.
    """
    log = (lambda msg: print(f"[{config.name}] {msg}", flush=True)) if progress else (lambda msg: None)
    started = time.perf_counter()
    root = Path(runs_root) if runs_root is not None else Path(tempfile.mkdtemp())
    study_dir = root / config.name
    study_dir.mkdir(parents=True, exist_ok=True)
    task = _Task(config)
    shared = _shared_stage(config, task, study_dir, log)
    seeds = [int(s) for s in config.seeds]
    if len(seeds) != len(set(seeds)):
        raise ValueError(f"seeds must be distinct, got {seeds}.")
    done = {}
    for seed in seeds:
        previous = _load_seed(study_dir / f"seed{seed}.json", config)
        if previous is not None:
            done[seed] = previous
            log(f"seed {seed}: reusing {study_dir / f'seed{seed}.json'}")
    todo = [s for s in seeds if s not in done]
    workers = max(1, min(int(config.get("workers", 1)), len(todo)))
    if workers > 1:
        done |= _run_seeds_in_workers(config, todo, progress, study_dir, workers)
    else:
        for seed in todo:
            done[seed] = _run_seed(config.to_dict(), seed, progress, str(study_dir))
    per_seed = [done[s] for s in seeds]
    summary = summarize(shared, per_seed, task, config)
    wall = time.perf_counter() - started
    report = markdown_report(summary, config.get("title", config.name), seeds, wall)
    print(report, flush=True)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{config.name}.md").write_text(report)
    record = {"study": config.name, "seeds": seeds, "summary": summary, "teacher_val_curve": shared["val_curve"],
              "seed_wall_time_s": [r["wall_time_s"] for r in per_seed], "reused_seeds": sorted(set(seeds) - set(todo)),
              "total_wall_time_s": round(wall, 1), "config": json.loads(config.to_json_best_effort())}
    (results_dir / f"{config.name}.json").write_text(json.dumps(record, indent=2))
    _plots(summary, results_dir, config.name)
    return record
