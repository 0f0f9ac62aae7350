"""The reasoning-distillation study (``make reproduce-reasoning``): R1-style, token-level, on-policy, multi-teacher.

For each seed, on the arithmetic task of :mod:`distill_jax.proj.reasoning.task`:

========================  ==================================================================
row                       what the student (or teacher) is trained on
========================  ==================================================================
``teacher``               teacher, ground-truth traces (SFT)
``teacher_b``             second teacher, another seed (for the multi-teacher rows)
``answer_only``           student, ground-truth answers without traces (SFT)
``traces``                student, ground-truth traces (oracle data, SFT)
``seqkd``                 student, SFT on the teacher's verified samples (rejection
                          sampling, K per training problem): the DeepSeek-R1 recipe
``seqkd_<P>pct``          the same on P % of the kept samples (accuracy vs samples)
``tokenkd``               student, forward KL at T to the teacher in the loop, on GT traces
``tokenkd_top<k>``        the same from an offline cache of the teacher's top-k log-probs
``gkd_offpolicy``         generalized JSD at beta on GT traces (lambda = 0)
``gkd_onpolicy``          the same with a fraction lambda of batches sampled by the student
``multi_seqkd``           SFT on both teachers' verified samples, pooled
``multi_tokenkd``         forward KL to both teachers' averaged distribution
========================  ==================================================================

Every row reports greedy exact-match accuracy and pass@k on the held-out
test split and on the longer-operand OOD split, its wall time, and the
student's test accuracy as a fraction of its teacher's (the best teacher's for
the multi-teacher rows). Rows are aggregated as mean and std over seeds into
``results/<name>.{json,md}`` plus a plot of accuracy against the number of
sequence-KD samples.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from distill_jax.models.transformer import TransformerConfig
from distill_jax.proj.stats import mean_std
from distill_jax.proj.reasoning import sequence as seq
from distill_jax.proj.reasoning import task as reasoning
from distill_jax.training import rundir
from distill_jax.training.checkpoint import CheckpointMismatchError

__all__ = ["run_reasoning_study", "aggregate", "markdown_table", "plot_samples_curve", "ROW_LABELS"]

ROW_LABELS = {
    "teacher": "teacher, GT traces",
    "teacher_b": "teacher B (other seed), GT traces",
    "answer_only": "student, GT answers only",
    "traces": "student, GT traces (oracle)",
    "seqkd": "student, seq-KD on verified teacher samples (R1)",
    "tokenkd": "student, token KD (forward KL, teacher in loop)",
    "gkd_offpolicy": "student, GKD JSD off-policy (lambda=0)",
    "gkd_onpolicy": "student, GKD JSD on-policy",
    "multi_seqkd": "student, seq-KD pooled from 2 teachers",
    "multi_tokenkd": "student, token KD to 2 teachers' mean",
}


class _Task:
    """The splits, the padded training arrays and the lengths every stage shares (one compiled shape each)."""

    def __init__(self, config: ml_collections.ConfigDict):
        t = config.task
        self.op = t.op
        self.splits = reasoning.make_splits(
            t.data_seed, num_train=t.num_train, num_test=t.num_test, num_ood=t.num_ood,
            op=t.op, max_digits=t.max_digits, ood_digits=t.ood_digits,
        )
        # One prompt length and one completion budget (the OOD split's, the
        # longest) for every split, and training rows of exactly prompt +
        # completion: generation and the off- and on-policy train steps then
        # share their compiled shapes across splits and stages.
        digits = max(t.max_digits, t.ood_digits)
        self.prompt_len = reasoning.max_prompt_len(digits, op=t.op)
        self.new_tokens = reasoning.max_completion_len(digits, op=t.op)
        self.train_len = self.prompt_len + self.new_tokens
        self.max_len = self.train_len
        self.train_prompts = dict(zip(("tokens", "valid"), reasoning.prompt_arrays(self.splits["train"], length=self.prompt_len)))

    def arrays(self, problems, fmt="trace") -> dict[str, np.ndarray]:
        return reasoning.encode_problems(problems, fmt, length=self.train_len)

    def arrays_of(self, pairs: Sequence[tuple[reasoning.Problem, str]]) -> dict[str, np.ndarray]:
        return reasoning.encode_examples([p.prompt for p, _ in pairs], [c for _, c in pairs], length=self.train_len)


def _model(config: Mapping[str, Any], task: _Task) -> TransformerConfig:
    return TransformerConfig.from_mapping(dict(config) | {"vocab_size": reasoning.TOKENIZER.vocab_size, "max_len": task.max_len})


def _optimizer(stage: Mapping[str, Any]) -> seq.OptimizerSpec:
    return seq.OptimizerSpec(
        learning_rate=float(stage.learning_rate), steps=int(stage.steps), warmup_steps=int(stage.warmup_steps),
        weight_decay=float(stage.get("weight_decay", 0.01)),
    )


class _Runner:
    """Trains and evaluates the rows of one seed; every row's numbers end up in ``self.rows``."""

    def __init__(self, config, task: _Task, seed: int, log):
        self.c, self.task, self.seed, self.log = config, task, seed, log
        self.teacher_model = _model(config.teacher.model, task)
        self.student_model = _model(config.student.model, task)
        self.rows: dict[str, dict] = {}
        self.curve: list[dict] = []
        self.extra: dict[str, Any] = {}

    def evaluate(self, model, params) -> dict[str, float]:
        e, t = self.c.eval, self.task
        common = dict(pass_k=int(e.pass_k), pass_temperature=float(e.pass_temperature), seed=self.seed, batch_size=int(e.batch_size))
        test = seq.evaluate(model, params, t.splits["test"], max_new_tokens=t.new_tokens, prompt_len=t.prompt_len, **common)
        ood = seq.evaluate(model, params, t.splits["ood"], max_new_tokens=t.new_tokens, prompt_len=t.prompt_len, **common)
        k = int(e.pass_k)
        out = {"test": test["greedy"], "ood": ood["greedy"]}
        if k:
            out |= {f"test_pass@{k}": test[f"pass@{k}"], f"ood_pass@{k}": ood[f"pass@{k}"]}
        return out

    def fit(self, name, model, stage, data, spec, *, teachers=(), seed_offset=0, ratio_to=None, **kwargs):
        """Trains one row, evaluates it, records it; returns the params."""
        t0 = time.perf_counter()
        params, history = seq.train(
            model, data, spec=spec, optimizer=_optimizer(stage), batch_size=int(stage.batch_size),
            seed=self.seed * 1000 + seed_offset, teachers=teachers, **kwargs,
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = self.evaluate(model, params)
        row = metrics | {
            "train_wall_s": round(train_s, 2),
            "eval_wall_s": round(time.perf_counter() - t0, 2),
            "final_loss": history["final_loss"],
            "train_examples": int(len(data["inputs"])),
        }
        if ratio_to is not None:
            row["ratio_to_teacher"] = metrics["test"] / ratio_to if ratio_to > 0 else float("nan")
        self.rows[name] = row
        self.log(f"seed {self.seed} {name}: test {metrics['test']:.3f} ood {metrics['ood']:.3f} ({train_s:.1f} s)")
        return params

    def run(self):
        c, task, rows_wanted = self.c, self.task, set(self.c.rows)
        sft = seq.LossSpec("sft")
        train = task.splits["train"]
        traces = task.arrays(train, "trace")
        teacher = self.fit("teacher", self.teacher_model, c.teacher, traces, sft)
        teacher_acc = self.rows["teacher"]["test"]
        teachers = [(self.teacher_model, teacher)]
        multi = rows_wanted & {"multi_seqkd", "multi_tokenkd"}
        if multi:
            teacher_b = self.fit("teacher_b", self.teacher_model, c.teacher, traces, sft, seed_offset=500)
            teachers.append((self.teacher_model, teacher_b))
        student, s_stage = self.student_model, c.student
        if "answer_only" in rows_wanted:
            self.fit("answer_only", student, s_stage, task.arrays(train, "answer"), sft, ratio_to=teacher_acc)
        if "traces" in rows_wanted:
            self.fit("traces", student, s_stage, traces, sft, ratio_to=teacher_acc)

        kd = c.seqkd
        sample_args = dict(
            num_samples=int(kd.num_samples), max_new_tokens=task.new_tokens, temperature=float(kd.temperature),
            batch_size=int(c.eval.batch_size), prompt_len=task.prompt_len,
        )
        pools = []
        if rows_wanted & {"seqkd", "multi_seqkd"}:
            for i, (_, params) in enumerate(teachers):
                t0 = time.perf_counter()
                kept, stats = seq.sample_verified(self.teacher_model, params, train, seed=self.seed * 1000 + 7 + i, **sample_args)
                stats["wall_s"] = round(time.perf_counter() - t0, 2)
                self.extra[f"rejection_sampling_teacher_{'ab'[i]}"] = stats
                self.log(f"seed {self.seed} teacher {'ab'[i]} samples: acceptance {stats['acceptance_rate']:.3f}, kept {len(kept)}")
                pools.append(kept)
        if "seqkd" in rows_wanted:
            kept = pools[0]
            if kept:
                self.fit("seqkd", student, s_stage, task.arrays_of(kept), sft, ratio_to=teacher_acc)
                self.curve.append({"samples": len(kept), "test": self.rows["seqkd"]["test"], "ood": self.rows["seqkd"]["ood"]})
                rng = np.random.default_rng(self.seed)
                for fraction in sorted(kd.curve_fractions):
                    n = int(round(fraction * len(kept)))
                    if n < 1 or n >= len(kept):
                        continue
                    subset = [kept[i] for i in rng.choice(len(kept), n, replace=False)]
                    # Named by fraction, not count, so the row lines up across seeds.
                    name = f"seqkd_{int(round(100 * fraction))}pct"
                    self.fit(name, student, s_stage, task.arrays_of(subset), sft, ratio_to=teacher_acc)
                    self.curve.append({"samples": n, "test": self.rows[name]["test"], "ood": self.rows[name]["ood"]})
            else:
                self.log(f"seed {self.seed} seqkd: no verified teacher sample; row skipped")

        tk = c.token_kd
        forward = seq.LossSpec("forward_kl", temperature=float(tk.temperature))
        if "tokenkd" in rows_wanted:
            self.fit("tokenkd", student, s_stage, traces, forward, teachers=teachers[:1], ratio_to=teacher_acc)
        for k in tk.top_k:
            name = f"tokenkd_top{k}"
            if "tokenkd_topk" not in rows_wanted:
                break
            cache = seq.teacher_top_k_cache(self.teacher_model, teacher, traces, int(k), temperature=float(tk.temperature))
            spec = seq.LossSpec("top_k", temperature=float(tk.temperature), tail=str(tk.tail))
            self.fit(name, student, s_stage, dict(traces) | cache, spec, ratio_to=teacher_acc)
            self.rows[name]["cache_bytes_per_token"] = seq.cache_bytes_per_token(cache)
            self.rows[name]["full_logits_bytes_per_token"] = 4 * self.teacher_model.vocab_size

        g = c.gkd
        jsd = seq.LossSpec("gkd", beta=float(g.beta), temperature=float(g.temperature))
        if "gkd_offpolicy" in rows_wanted:
            self.fit("gkd_offpolicy", student, s_stage, traces, jsd, teachers=teachers[:1], ratio_to=teacher_acc)
        if "gkd_onpolicy" in rows_wanted:
            self.fit(
                "gkd_onpolicy", student, s_stage, traces, jsd, teachers=teachers[:1], ratio_to=teacher_acc,
                on_policy_fraction=float(g.on_policy_fraction), prompts=task.train_prompts, max_new_tokens=task.new_tokens,
            )
        if multi:
            best = max(self.rows["teacher"]["test"], self.rows["teacher_b"]["test"])
            if "multi_seqkd" in rows_wanted and len(pools) == 2 and pools[0] + pools[1]:
                self.fit("multi_seqkd", student, s_stage, task.arrays_of(pools[0] + pools[1]), sft, ratio_to=best)
            if "multi_tokenkd" in rows_wanted:
                self.fit("multi_tokenkd", student, s_stage, traces, forward, teachers=teachers, ratio_to=best)
        return {"rows": self.rows, "curve": self.curve, "extra": self.extra}


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Row -> metric -> mean/std/n over the seeds that have that row."""
    names = []
    for result in per_seed:
        names += [n for n in result["rows"] if n not in names]
    out = {}
    for name in names:
        rows = [r["rows"][name] for r in per_seed if name in r["rows"]]
        # None is a NaN that went through JSON (a reused seed): still a metric.
        metrics = [m for m in rows[0] if rows[0][m] is None or isinstance(rows[0][m], (int, float))]
        out[name] = {m: mean_std([r.get(m) for r in rows]) for m in metrics}
    return out


def _fmt(stat: Mapping[str, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None or stat["n"] == 0:
        return ""
    if stat["n"] == 1:  # one seed: no spread to show
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    k = summary["pass_k"]
    header = ["row", "test greedy %", "OOD greedy %"]
    if k:
        header += [f"test pass@{k} %", f"OOD pass@{k} %"]
    header += ["student/teacher (test)", "train s", "train examples"]
    lines = [f"## {summary['title']}", "", "| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, stats in summary["rows"].items():
        label = ROW_LABELS.get(name) or (
            f"student, seq-KD on {name[len('seqkd_'):-len('pct')]}% of the kept samples" if name.startswith("seqkd_") and name.endswith("pct")
            else f"student, token KD from top-{name.split('top')[1]} cache" if name.startswith("tokenkd_top") else name
        )
        if "cache_bytes_per_token" in stats:
            label += f" ({stats['cache_bytes_per_token']['mean']:.0f} B/token)"
        cells = [label, _fmt(stats.get("test")), _fmt(stats.get("ood"))]
        if k:
            cells += [_fmt(stats.get(f"test_pass@{k}")), _fmt(stats.get(f"ood_pass@{k}"))]
        cells += [_fmt(stats.get("ratio_to_teacher"), 1.0, 2), _fmt(stats.get("train_wall_s"), 1.0, 1),
                  f"{stats['train_examples']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    rs = summary.get("rejection_sampling", {})
    if rs:
        lines += ["", "Rejection sampling (teacher samples per training problem, verified answers kept): " + "; ".join(
            f"teacher {t}: acceptance {_fmt(v['acceptance_rate'])} %, problems with a kept sample {_fmt(v['problems_covered'])} %"
            for t, v in rs.items()
        ) + "."]
    per_seed_s = ", ".join(f"{t:.0f}" for t in summary.get("seed_wall_time_s", []) if t is not None)
    lines += ["", f"Seeds: {summary['seeds']} (wall time per seed: {per_seed_s} s; {summary.get('workers', 1)} at a time). "
              f"Total wall time of this run: {summary['total_wall_time_s']} s"
              + (f" (seeds {summary['reused_seeds']} reused from earlier runs)." if summary.get("reused_seeds") else "."), ""]
    return "\n".join(lines)


def plot_samples_curve(per_seed: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Accuracy (test and OOD, greedy) against the number of sequence-KD samples, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for result in per_seed:
        curve = sorted(result["curve"], key=lambda p: p["samples"])
        if not curve:
            continue
        x = [p["samples"] for p in curve]
        ax.plot(x, [100 * p["test"] for p in curve], "o-", color="C0", alpha=0.7)
        ax.plot(x, [100 * p["ood"] for p in curve], "s--", color="C1", alpha=0.7)
    ax.plot([], [], "o-", color="C0", label="test (greedy)")
    ax.plot([], [], "s--", color="C1", label="OOD (greedy)")
    ax.set_xlabel("verified teacher samples used for fine-tuning")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(value):
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _seed_config_fingerprint(config: ml_collections.ConfigDict) -> str:
    """What a seed's result depends on: the whole config except the seed list and the worker count."""
    return rundir.fingerprint(json.loads(config.to_json_best_effort()), ignore=("seeds", "workers"))


def _run_seed(config_dict: dict, seed: int, progress: bool, seed_file: str | None) -> dict[str, Any]:
    """One seed's rows (in this process or a worker), saved to ``seed_file`` when given."""
    config = ml_collections.ConfigDict(config_dict)
    log = (lambda msg: print(f"[{config.name}] {msg}", flush=True)) if progress else (lambda msg: None)
    started = time.perf_counter()
    result = _Runner(config, _Task(config), int(seed), log).run()
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    result = _json_safe(result)  # what a reused seed looks like, so both aggregate alike
    if seed_file:
        record = {"fingerprint": _seed_config_fingerprint(config), "seed": int(seed), "result": result}
        rundir.write_json(seed_file, record, indent=None)
    return result


def _load_seed(seed_file: Path, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    if not seed_file.exists():
        return None
    record = json.loads(seed_file.read_text())
    if record["fingerprint"] != _seed_config_fingerprint(config):
        raise CheckpointMismatchError(
            f"{seed_file} holds a seed of {config.name!r} run with another config. Delete {seed_file.parent} "
            f"to start over, or give this config another name (--config.name=...)."
        )
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


def _run_seeds_in_workers(config, todo, progress, seed_files, workers: int) -> dict[int, dict]:
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
        futures = {
            seed: pool.submit(_run_seed, config.to_dict(), seed, progress, seed_files[seed])
            for seed in todo
        }
        return {seed: future.result() for seed, future in futures.items()}


def run_reasoning_study(
    config: ml_collections.ConfigDict, *, results_dir: Path, runs_root: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Runs every row for every seed, prints the table, writes ``results/<name>.{json,md}`` and the plot.

    With ``runs_root``, each finished seed is saved to
    ``<runs_root>/<name>/seed<N>.json`` and reused by a later run of the same
    config (a changed config is refused with :class:`CheckpointMismatchError`),
    so an interrupted study loses at most the seeds in progress.
    ``config.workers`` > 1 runs that many seeds at once, one process per
    seed, each pinned to its own core.
    """
    log = (lambda msg: print(f"[{config.name}] {msg}", flush=True)) if progress else (lambda msg: None)
    started = time.perf_counter()
    seeds = [int(s) for s in config.seeds]
    seed_files: dict[int, str | None] = {seed: None for seed in seeds}
    done: dict[int, dict] = {}
    if runs_root is not None:
        study_dir = Path(runs_root) / config.name
        study_dir.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            seed_files[seed] = str(study_dir / f"seed{seed}.json")
            previous = _load_seed(Path(seed_files[seed]), config)
            if previous is not None:
                done[seed] = previous
                log(f"seed {seed}: reusing {seed_files[seed]}")
    todo = [seed for seed in seeds if seed not in done]
    workers = max(1, min(int(config.get("workers", 1)), len(todo)))
    if workers > 1:
        done |= _run_seeds_in_workers(config, todo, progress, seed_files, workers)
    else:
        for seed in todo:
            done[seed] = _run_seed(config.to_dict(), seed, progress, seed_files[seed])
    per_seed = [done[seed] for seed in seeds]
    rejection = {}
    for t in "ab":
        stats = [r["extra"][f"rejection_sampling_teacher_{t}"] for r in per_seed if f"rejection_sampling_teacher_{t}" in r["extra"]]
        if stats:
            rejection[t] = {m: mean_std([s[m] for s in stats]) for m in ("acceptance_rate", "problems_covered", "kept_unique")}
    summary = {
        "study": config.name,
        "title": config.get("title", config.name),
        "seeds": list(config.seeds),
        "pass_k": int(config.eval.pass_k),
        "rows": aggregate(per_seed),
        "rejection_sampling": rejection,
        "per_seed": per_seed,
        "total_wall_time_s": round(time.perf_counter() - started, 1),
        "seed_wall_time_s": [r.get("wall_time_s") for r in per_seed],
        "reused_seeds": sorted(set(seeds) - set(todo)),
        "workers": int(config.get("workers", 1)),
        "config": json.loads(config.to_json_best_effort()),
    }
    table = markdown_table(summary)
    print(table, flush=True)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{config.name}.md").write_text(table)
    (results_dir / f"{config.name}.json").write_text(json.dumps(_json_safe(summary), indent=2))
    if any(r["curve"] for r in per_seed):
        plot_samples_curve(per_seed, results_dir / f"{config.name}_samples.png", summary["title"])
    return summary
