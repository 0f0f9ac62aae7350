"""Cross-tokenizer distillation on the reasoning task: can a student learn from a teacher that cuts text differently?

The arithmetic task of :mod:`distill_jax.proj.reasoning.task`
(``Q:347+598=<think>7+8+0=15;...</think>A:945``), two Hugging Face
tokenizers built from its text:

* **A**, the teacher's: one token per character (22 tokens);
* **B**, the student's: a BPE trained on the task's text, whose merges
  (``+0=``, ``=1``, ``5;``, ...) cut the same text into other, fewer tokens.

A teacher is trained with each tokenizer on the ground-truth traces of the
teacher set (``T_A`` and the reference ``T_B``, same size and budget). A
smaller student with tokenizer B then sees only a small transfer set, and
every row gives it the same steps (final checkpoint; nothing is chosen on
the test set):

* ``data``: cross-entropy on the transfer set's ground truth alone;
* ``seqkd``: sequence-level KD: cross-entropy on ``T_A``'s samples for the
  transfer prompts (K per prompt at temperature 1) that its answer
  verifier accepts, retokenized by B;
* ``uld``: cross-entropy + ULD against ``T_A`` at the byte-aligned positions
  (:func:`distill_jax.cross_tokenizer.aligned_uld`);
* ``aligned``: cross-entropy + the aligned KD loss against ``T_A``
  (:func:`distill_jax.cross_tokenizer.aligned_kd`);
* ``same_tok``: cross-entropy + forward KL against ``T_B``, the teacher of the
  student's own tokenizer (the reference: token-level KD without a
  tokenizer gap).

Every student trains through the training core (``training.run`` on the
JSONL files, :func:`distill_jax.lm.jsonl_splits`), seeds paired across rows
(the same seed gives the same initial student and data order in every row).
Score: greedy exact-match accuracy on the test problems (``task.verify``),
with a two-level (seeds x problems) bootstrap 95 % interval per row and per
paired difference (:func:`distill_jax.proj.stats.bootstrap_ci`).

Everything is saved under ``runs/<name>/`` (the data, the tokenizers, the
teachers' core runs, the pool, one core run and one ``eval.json`` per
student), so an interrupted study redoes only what did not finish; a
changed config under the same name is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from distill_jax import generation, training
from distill_jax.data import text
from distill_jax.models import transformer as tf
from distill_jax.proj import stats
from distill_jax.proj.reasoning import task as reasoning
from distill_jax.training import rundir
from distill_jax.training.checkpoint import CheckpointMismatchError

ROWS = ("data", "seqkd", "uld", "aligned", "aligned_bucket", "same_tok")
ROW_TITLES = {
    "data": "student on the data alone",
    "seqkd": "sequence-level KD on T_A's verified samples",
    "uld": "ULD + cross-entropy (T_A, aligned positions)",
    "aligned": "aligned KD + cross-entropy (T_A)",
    "aligned_bucket": "aligned KD with a bucket tail + cross-entropy (T_A, ablation)",
    "same_tok": "same-tokenizer KD + cross-entropy (T_B, reference)",
}
SPECIALS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>")


# ------------------------------------------------------------------ tokenizers


def char_tokenizer() -> text.Tokenizer:
    """Tokenizer A: the task's character-level vocabulary as a Hugging Face tokenizer (no merges)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*SPECIALS, *reasoning.CHARACTERS])}
    backend = Backend(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIALS))
    return text.Tokenizer.from_backend(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def bpe_tokenizer(corpus: list[str], vocab_size: int) -> text.Tokenizer:
    """Tokenizer B: a BPE trained on ``corpus`` (merges across every character: no pre-tokenizer)."""
    from tokenizers import Tokenizer as Backend, decoders, models, trainers

    backend = Backend(models.BPE())
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=list(reasoning.CHARACTERS), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return text.Tokenizer.from_backend(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _corpus(problems) -> list[str]:
    """The task's text without its special tokens (what B's merges are learned from)."""
    out = []
    for p in problems:
        out.append(p.prompt)
        out.append("".join(reasoning._steps(p)))
        out.append(f"A:{p.answer}")
    return out


def _row(problem: reasoning.Problem, completion: str | None = None) -> dict:
    done = reasoning.completion(problem, "trace") if completion is None else completion
    return {"prompt": problem.prompt, "completion": done.removesuffix("<eos>")}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ generation and scoring


def _params_and_config(workdir: Path):
    _, variables, model_config = training.load_teacher(workdir)
    config = tf.TransformerConfig.from_mapping({k: v for k, v in model_config.items() if k != "name"})
    return config, variables["params"]


def complete(workdir: Path, tok: text.Tokenizer, problems, *, key, temperature: float = 0.0, num_samples: int = 1,
             max_new_tokens: int, batch_size: int = 256) -> list[list[str]]:
    """``num_samples`` completions (text up to and including ``<eos>``) per problem, from a core run's last checkpoint."""
    config, params = _params_and_config(workdir)
    sampling = generation.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, eos_id=tok.eos_id,
                                         pad_id=tok.pad_id, banned_ids=(tok.pad_id, tok.bos_id))
    prompts = [[tok.bos_id] + tok.encode(p.prompt) for p in problems for _ in range(num_samples)]
    width = max(len(p) for p in prompts)
    texts = []
    for chunk, start in enumerate(range(0, len(prompts), batch_size)):
        rows = prompts[start : start + batch_size]
        ids = np.full((batch_size, width), tok.pad_id, np.int32)
        valid = np.zeros((batch_size, width), bool)
        valid[len(rows):, -1] = True  # padding rows: one token, so nothing is empty
        for i, row in enumerate(rows):
            ids[i, width - len(row):], valid[i, width - len(row):] = row, True
        out = generation.generate(config, params, ids, jax.random.fold_in(key, chunk), sampling, valid)
        tokens, lengths, done = (np.asarray(x) for x in (out.tokens, out.lengths, out.finished))
        for i in range(len(rows)):
            body = [t for t in tokens[i, : lengths[i]].tolist() if t != tok.eos_id]
            texts.append(tok.decode(body) + ("<eos>" if done[i] else ""))
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(problems))]


def greedy_correct(workdir: Path, tok: text.Tokenizer, problems, *, max_new_tokens: int, batch_size: int) -> np.ndarray:
    """1.0 per problem whose greedy completion has the exact answer (``task.verify``), else 0.0."""
    done = complete(workdir, tok, problems, key=jax.random.key(0), max_new_tokens=max_new_tokens, batch_size=batch_size)
    return np.array([float(reasoning.verify(p, c[0])) for p, c in zip(problems, done)])


# ------------------------------------------------------------------ core runs


def _run_config(config, *, tokenizer: Path, train: Path, val: Path, model: Mapping[str, Any], stage: Mapping[str, Any],
                seed: int, vocab_size: int, max_len: int, num_epochs: int) -> ml_collections.ConfigDict:
    c = training.default_config()
    c.dataset = "distill_jax.lm:jsonl_splits"
    c.task = ml_collections.ConfigDict({"tokenizer": str(tokenizer), "train": str(train), "val": str(val), "test": "",
                                        "max_len": max_len, "chat": False, "truncate": "error", "pack": 0,
                                        "teacher_tokenizer": "", "teacher_max_len": 0})
    # The model's positions also hold generation's longest prompt + completion.
    c.model = ml_collections.ConfigDict({"name": "transformer", "vocab_size": vocab_size, "max_len": max_len + 2, **model})
    c.optimizer = ml_collections.ConfigDict({"name": "adamw", "learning_rate": float(stage["learning_rate"]),
                                             "schedule": "cosine", "warmup_epochs": float(stage["warmup_epochs"]),
                                             "final_lr_fraction": 0.1, "weight_decay": 0.01})
    c.batch_size, c.num_epochs, c.eval_batch_size = int(stage["batch_size"]), int(num_epochs), 256
    c.seed = int(seed)
    c.checkpoint_every = int(num_epochs)
    c.objective = ml_collections.ConfigDict({"sft": {"loss": "cross_entropy", "weight": 1.0}})
    return c


def _train(run_config, workdir: Path, progress: bool) -> float:
    """Trains (or resumes, or reuses) a core run; returns its training time in seconds."""
    resume = (workdir / "checkpoints").is_dir()
    started = time.perf_counter()
    training.run(run_config, workdir, resume=resume, progress=progress)
    return time.perf_counter() - started


class _Study:
    def __init__(self, config, runs_root: Path, progress: bool, log: Callable[[str], None]):
        self.config, self.progress, self.log = config, progress, log
        self.dir = Path(runs_root) / config.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_config()
        t = config.task
        splits = reasoning.make_study_splits(int(t.data_seed), num_train=int(t.num_teacher) + int(t.num_transfer),
                                             num_val=int(t.num_val), num_test=int(t.num_test), num_ood=0,
                                             max_digits=int(t.max_digits), held_out_units=())
        self.teacher_set = splits["train"][: int(t.num_teacher)]
        self.transfer = splits["train"][int(t.num_teacher):]
        self.val, self.test = splits["val"], splits["test"]
        digits = int(t.max_digits)
        # Character counts bound every tokenizer's lengths here (B only merges characters).
        self.max_len = reasoning.max_prompt_len(digits) + reasoning.max_completion_len(digits)
        self.max_new = reasoning.max_completion_len(digits) + 2  # a wrong completion may run a little longer

    def _check_config(self) -> None:
        record = self.dir / "study_config.json"
        wanted = rundir.fingerprint(json.loads(self.config.to_json_best_effort()), ignore=("seeds", "title"))
        if record.exists():
            found = json.loads(record.read_text())["fingerprint"]
            if found != wanted:
                raise CheckpointMismatchError(
                    f"{self.dir} holds a run of this study with another config. Delete it to start over, or give "
                    "this config another name (--config.name=...).")
        else:
            rundir.write_json(record, {"fingerprint": wanted, "config": json.loads(self.config.to_json_best_effort())})

    # -- shared stage: data, tokenizers, teachers, pool

    def tokenizers(self) -> dict[str, Path]:
        paths = {"A": self.dir / "tokenizer_A", "B": self.dir / "tokenizer_B"}
        if not (paths["B"] / text.TOKENIZER_FILE).exists():
            char_tokenizer().save(paths["A"])
            bpe_tokenizer(_corpus(self.teacher_set), int(self.config.tokenizer_b_size)).save(paths["B"])
        return paths

    def data(self) -> dict[str, Path]:
        files = {name: self.dir / "data" / f"{name}.jsonl" for name in ("teacher", "transfer", "val")}
        if not files["val"].exists():
            _write_jsonl(files["teacher"], [_row(p) for p in self.teacher_set])
            _write_jsonl(files["transfer"], [_row(p) for p in self.transfer])
            _write_jsonl(files["val"], [_row(p) for p in self.val])
        return files

    def teacher(self, which: str, toks: Mapping[str, Path], files: Mapping[str, Path]) -> dict[str, Any]:
        workdir = self.dir / f"teacher_{which}"
        tok = text.load_tokenizer(toks[which])
        run_config = _run_config(self.config, tokenizer=toks[which], train=files["teacher"], val=files["val"],
                                 model=self.config.teacher.model, stage=self.config.teacher, seed=0,
                                 vocab_size=tok.vocab_size, max_len=self.max_len,
                                 num_epochs=int(self.config.teacher.num_epochs))
        summary_file = workdir / "study_eval.json"
        if summary_file.exists():
            return json.loads(summary_file.read_text())
        self.log(f"teacher {which}: training")
        seconds = _train(run_config, workdir, self.progress)
        correct = self._score(workdir, tok)
        summary = {"workdir": str(workdir), "vocab_size": tok.vocab_size, "test_correct": stats.to_bits(correct),
                   "test_accuracy": float(correct.mean()), "train_s": round(seconds, 1)}
        rundir.write_json(summary_file, summary)
        self.log(f"teacher {which}: test greedy {summary['test_accuracy']:.3f}")
        return summary

    def pool(self, toks, teacher_a: Mapping[str, Any]) -> dict[str, Any]:
        """T_A's distinct answer-verified samples for the transfer prompts (sequence-level KD), as JSONL."""
        path = self.dir / "data" / "seqkd.jsonl"
        summary_file = self.dir / "data" / "seqkd.json"
        if summary_file.exists():
            return json.loads(summary_file.read_text())
        k = int(self.config.seqkd.num_samples)
        samples = complete(Path(teacher_a["workdir"]), text.load_tokenizer(toks["A"]), self.transfer,
                           key=jax.random.key(int(self.config.seqkd.seed)), temperature=float(self.config.seqkd.temperature),
                           num_samples=k, max_new_tokens=self.max_new, batch_size=int(self.config.eval_batch_size))
        accepted = sum(reasoning.verify(p, s) for p, ss in zip(self.transfer, samples) for s in ss)
        # The distinct verified completions of each prompt (a confident teacher repeats itself).
        rows = [_row(p, s) for p, ss in zip(self.transfer, samples) for s in dict.fromkeys(ss) if reasoning.verify(p, s)]
        if not rows:
            raise RuntimeError("T_A's samples hold no verified completion: train the teacher longer.")
        _write_jsonl(path, rows)
        summary = {"path": str(path), "rows": len(rows), "samples": k * len(self.transfer),
                   "acceptance": accepted / (k * len(self.transfer)),
                   "problems_covered": int(sum(any(reasoning.verify(p, s) for s in ss)
                                               for p, ss in zip(self.transfer, samples)))}
        rundir.write_json(summary_file, summary)
        self.log(f"sequence-level pool: {len(rows)} verified of {summary['samples']} samples")
        return summary

    def _score(self, workdir: Path, tok: text.Tokenizer) -> np.ndarray:
        return greedy_correct(workdir, tok, self.test, max_new_tokens=self.max_new,
                              batch_size=int(self.config.eval_batch_size))

    # -- students

    def student(self, row: str, seed: int, toks, files, teachers, pool) -> dict[str, Any]:
        workdir = self.dir / f"{row}_s{seed}"
        eval_file = workdir / "study_eval.json"
        if eval_file.exists():
            return json.loads(eval_file.read_text())
        tok_b = text.load_tokenizer(toks["B"])
        train = Path(pool["path"]) if row == "seqkd" else files["transfer"]
        # Every row gets the same number of optimizer steps, whatever the size of its training set.
        steps_per_epoch = len(text.read_jsonl(train)) // int(self.config.student.batch_size)
        num_epochs = max(1, round(int(self.config.student.steps) / max(steps_per_epoch, 1)))
        run_config = _run_config(self.config, tokenizer=toks["B"], train=train, val=files["val"],
                                 model=self.config.student.model, stage=self.config.student, seed=seed,
                                 vocab_size=tok_b.vocab_size, max_len=self.max_len, num_epochs=num_epochs)
        kd = self.config.kd
        if row in ("uld", "aligned", "aligned_bucket"):
            run_config.task.teacher_tokenizer = str(toks["A"])
            run_config.teacher.checkpoint = teachers["A"]["workdir"]
            run_config.objective.kd = {"loss": "aligned_uld" if row == "uld" else "aligned_kd", "weight": float(kd.weight),
                                       "temperature": float(kd.temperature), "student_tokenizer": str(toks["B"]),
                                       "teacher_tokenizer": str(toks["A"])}
            if row == "aligned_bucket":
                run_config.objective.kd.tail = "bucket"
        elif row == "same_tok":
            run_config.teacher.checkpoint = teachers["B"]["workdir"]
            run_config.objective.kd = {"loss": "forward_kl", "weight": float(kd.weight), "temperature": float(kd.temperature)}
        self.log(f"{row} seed {seed}: training")
        seconds = _train(run_config, workdir, self.progress)
        correct = self._score(workdir, tok_b)
        val = greedy_correct(workdir, tok_b, self.val, max_new_tokens=self.max_new, batch_size=int(self.config.eval_batch_size))
        result = {"row": row, "seed": seed, "test_correct": stats.to_bits(correct), "test_accuracy": float(correct.mean()),
                  "val_accuracy": float(val.mean()),
                  "train_s": round(seconds, 1), "steps": num_epochs * steps_per_epoch,
                  "val_loss": json.loads((workdir / rundir.RESULTS).read_text())["val"]["loss"]}
        rundir.write_json(eval_file, result)
        self.log(f"{row} seed {seed}: test greedy {result['test_accuracy']:.3f} ({seconds:.0f} s)")
        return result


# ------------------------------------------------------------------ the study


def run_study(config, *, results_dir: Path = Path("results"), runs_root: Path = Path("runs"),
              progress: bool = True) -> dict[str, Any]:
    """Runs (or finishes) the study of ``config`` and writes ``results/<name>.{json,md,png}``."""
    log = (lambda msg: print(f"[{config.name}] {msg}", flush=True)) if progress else (lambda msg: None)
    started = time.perf_counter()
    study = _Study(config, Path(runs_root), progress, log)
    toks = study.tokenizers()
    files = study.data()
    teachers = {which: study.teacher(which, toks, files) for which in ("A", "B")}
    pool = study.pool(toks, teachers["A"])
    students = {row: {} for row in config.rows}
    for seed in config.seeds:  # seed by seed: an interruption leaves whole seeds of paired rows
        for row in config.rows:
            students[row][int(seed)] = study.student(row, int(seed), toks, files, teachers, pool)
    # The study's wall time over every invocation (an interrupted study is finished by a later one).
    clock = study.dir / "wall_time.json"
    wall_s = (json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0) + time.perf_counter() - started
    rundir.write_json(clock, {"seconds": wall_s})
    summary = summarize(config, study, toks, teachers, pool, students, wall_s=wall_s)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(results_dir / f"{config.name}.json", summary)
    (results_dir / f"{config.name}.md").write_text(markdown_report(summary))
    _plot(summary, results_dir / f"{config.name}.png")
    log(f"wrote {results_dir / config.name}.{{json,md,png}}")
    return summary


def summarize(config, study: _Study, toks, teachers, pool, students, *, wall_s: float) -> dict[str, Any]:
    seeds = [int(s) for s in config.seeds]
    tok_a, tok_b = text.load_tokenizer(toks["A"]), text.load_tokenizer(toks["B"])
    lengths = {name: float(np.mean([len(t.encode(reasoning.completion(p, "trace").removesuffix("<eos>")))
                                    for p in study.test])) for name, t in (("A", tok_a), ("B", tok_b))}
    rows = {}
    matrices = {row: np.stack([stats.from_bits(students[row][s]["test_correct"]) for s in seeds]).astype(np.float64)
                for row in config.rows}
    for row in config.rows:
        rows[row] = {
            "title": ROW_TITLES[row],
            "test": stats.bootstrap_ci(matrices[row]),
            "per_seed": [students[row][s]["test_accuracy"] for s in seeds],
            "val": stats.mean_std([students[row][s]["val_accuracy"] for s in seeds], digits=4),
            "steps": students[row][seeds[0]]["steps"],
            "train_s": stats.mean_std([students[row][s]["train_s"] for s in seeds], digits=1),
        }
    differences = {}
    for base in ("data", "same_tok"):
        if base not in matrices:
            continue
        for row in config.rows:
            if row != base and not (base == "same_tok" and row == "data"):
                differences[f"{row} - {base}"] = stats.bootstrap_ci(matrices[row] - matrices[base])
    return {
        "name": config.name,
        "title": config.title,
        "command": config.command,
        "seeds": seeds,
        "num_test": len(study.test),
        "num_transfer": len(study.transfer),
        "num_teacher_set": len(study.teacher_set),
        "tokenizers": {"A": {"vocab_size": tok_a.vocab_size, "completion_tokens": round(lengths["A"], 2)},
                       "B": {"vocab_size": tok_b.vocab_size, "completion_tokens": round(lengths["B"], 2)}},
        "teachers": {k: {kk: v[kk] for kk in ("test_accuracy", "train_s", "vocab_size")} for k, v in teachers.items()},
        "pool": {k: pool[k] for k in ("rows", "samples", "acceptance", "problems_covered")},
        "rows": rows,
        "differences": differences,
        "wall_time_s": round(wall_s, 1),
        "config": json.loads(config.to_json_best_effort()),
    }


def _pct(stat: Mapping[str, float], signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(100 * stat['mean'])} [{fmt.format(100 * stat['low'])}, {fmt.format(100 * stat['high'])}]"


def markdown_report(summary: Mapping[str, Any]) -> str:
    tok, t = summary["tokenizers"], summary["teachers"]
    lines = [
        f"# {summary['title']}",
        "",
        f"Command: `{summary['command']}`. Seeds {summary['seeds']} (paired across rows); "
        f"{summary['num_test']} test problems; wall time {summary['wall_time_s'] / 60:.1f} min (every invocation, "
        "on this machine's 2 CPU cores).",
        "",
        f"Tokenizer A (teacher T_A): {tok['A']['vocab_size']} tokens, {tok['A']['completion_tokens']} per test "
        f"completion on average; tokenizer B (student, T_B): {tok['B']['vocab_size']} tokens, "
        f"{tok['B']['completion_tokens']} per completion.",
        f"Teachers (trained on {summary['num_teacher_set']} problems): T_A {100 * t['A']['test_accuracy']:.1f} %, "
        f"T_B {100 * t['B']['test_accuracy']:.1f} % test greedy accuracy. Students see {summary['num_transfer']} "
        f"transfer problems. Sequence-level pool: {summary['pool']['samples']} samples, "
        f"{100 * summary['pool']['acceptance']:.1f} % verified, {summary['pool']['rows']} distinct verified ones covering "
        f"{summary['pool']['problems_covered']} problems.",
        "",
        "| student (tokenizer B) | test greedy % [95 % CI] | per seed | val greedy % (mean) | steps | train s (mean) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row, r in summary["rows"].items():
        seeds = ", ".join(f"{100 * v:.1f}" for v in r["per_seed"])
        lines.append(f"| {r['title']} | {_pct(r['test'])} | {seeds} | {100 * r['val']['mean']:.1f} | {r['steps']} | "
                     f"{r['train_s']['mean']:.0f} |")
    lines += ["", "Paired differences (points, 95 % CI over seeds x problems):", "", "| difference | points |", "|---|---:|"]
    for name, d in summary["differences"].items():
        lines.append(f"| {name} | {_pct(d, signed=True)} |")
    return "\n".join(lines) + "\n"


def _plot(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summary["rows"].items())
    fig, ax = plt.subplots(figsize=(7, 3.2))
    y = np.arange(len(rows))[::-1]
    for yi, (row, r) in zip(y, rows):
        m, lo, hi = (100 * r["test"][k] for k in ("mean", "low", "high"))
        ax.errorbar(m, yi, xerr=[[m - lo], [hi - m]], fmt="o", capsize=3, color="C3" if row == "same_tok" else "C0")
        ax.scatter([100 * v for v in r["per_seed"]], [yi] * len(r["per_seed"]), s=8, color="0.5", zorder=0)
    ax.axvline(100 * summary["teachers"]["A"]["test_accuracy"], color="0.3", ls="--", lw=1, label="teacher T_A")
    ax.set_yticks(y, [r["title"] for _, r in rows], fontsize=7)
    ax.set_xlabel("test greedy exact match (%)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
