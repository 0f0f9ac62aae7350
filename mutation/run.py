"""Mutation testing of the core with cosmic-ray: `make mutation` (not part of `make test`).

Each session of mutation/sessions.toml mutates one module in its own copy of
the tree (cosmic-ray edits files in place, so the working tree is never
touched) and runs that session's tests against every mutant with
``pytest -x``. Sessions are resumable: a session's database lives in
``<workdir>/<name>/`` and a re-run executes only the mutants still pending,
unless the code changed, which starts the session afresh; changed tests
re-run only the surviving mutants.

Operators: a fixed subset of cosmic-ray's core operators (ALLOWED below), the
boundary and sign flips a reviewer would plant by hand. cosmic-ray's full set
also replaces every binary operator by ten others (``+`` by ``<<``, ``%``,
...): 1,759 mutants of losses.py instead of 555.

Surviving mutants listed in mutation/equivalent.toml (module, the mutated
source line, operator, and a one-line reason) count as equivalent, and so do
two kinds recognised here (``_classify``): mutants of type annotations only,
and of a signature's keyword-only marker. The score is
killed / (mutants - skipped - equivalent); "skipped" are the operators
outside ALLOWED.

Writes results/mutation.json and results/mutation.md, and copies each
session's database to results/mutation/<name>/, from which a fresh checkout
continues.

  python mutation/run.py                          # every session, two at a time
  python mutation/run.py --budget-s 3600          # at most an hour per session (resumable)
  python mutation/run.py --sessions losses,objectives --jobs 1
  python mutation/run.py --report-only            # tables from the databases so far
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

ALLOWED = (
    "ReplaceBinaryOperator_(?:Add_Sub|Sub_Add|Mul_Div|Div_Mul|Pow_Mul|FloorDiv_Div|Mod_FloorDiv|BitAnd_BitOr|BitOr_BitAnd)",
    "ReplaceComparisonOperator_(?:Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Eq_NotEq|NotEq_Eq|Is_IsNot|IsNot_Is|In_NotIn|NotIn_In)",
    "ReplaceUnaryOperator_(?:USub_UAdd|Delete_USub|Delete_Not|Delete_Invert)",
    "AddNot", "ReplaceTrueWithFalse", "ReplaceFalseWithTrue", "ReplaceAndWithOr", "ReplaceOrWithAnd",
    "ReplaceBreakWithContinue", "ReplaceContinueWithBreak", "NumberReplacer", "ZeroIterationForLoop",
    "ExceptionReplacer",
)
# cosmic-ray's operator filter takes exclusion patterns: exclude all but ALLOWED.
EXCLUDE = "core/(?!(?:" + "|".join(ALLOWED) + ")$)"

COPIED = ("distill_jax", "tests", "experiments", "notebooks", "pyproject.toml")
# Each session's results travel with the repository (results/mutation/<name>/),
# so that another machine continues them instead of starting over.
SAVED = REPO / "results" / "mutation"
STATE_FILES = ("session.sqlite", "fingerprint_code", "fingerprint_tests", "baseline_s", "exec_s")

# Mutants run many times over: fewer hypothesis examples (tests/conftest.py),
# and the persistent XLA cache, so that only the mutated functions recompile.
def _env(workdir: Path) -> dict:
    return os.environ | {
        "HYPOTHESIS_PROFILE": "mutation",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(workdir / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(set(paths)):
        path = REPO / rel
        h.update(rel.encode())
        if path.is_dir():
            for f in sorted(path.rglob("*.py")):
                h.update(f.read_bytes())
        else:
            h.update(path.read_bytes() if path.exists() else b"<missing>")
    return h.hexdigest()[:16]


def _code_digest() -> str:
    """The package's code without docstrings and comments: editing prose invalidates nothing."""
    h = hashlib.sha256()
    for path in sorted((REPO / "distill_jax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def _fingerprints(session: dict) -> tuple[str, str]:
    """(code, tests): a code change invalidates every result, a test change only the survivors'."""
    tests = [t for t in session["tests"] if not t.startswith("-")] + ["tests"]
    return _code_digest(), _digest(tests)


def _cosmic(*args, cwd: Path, env: dict, log) -> None:
    subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)


def _copy_tree(tree: Path, names=COPIED) -> None:
    for name in names:
        src, dst = REPO / name, tree / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        elif src.exists():
            shutil.copy2(src, dst)


def _write_config(session: dict, config: Path) -> None:
    test_command = " ".join(
        [shlex.quote(sys.executable), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
        + [shlex.quote(t) for t in session["tests"]]
    )
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{session["module"]}"\n'
        f'timeout = {float(session["timeout"])}\n'
        "excluded-modules = []\n"
        f"test-command = {json.dumps(test_command)}\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = [{json.dumps(EXCLUDE)}]\n"
    )


def _prepare(session: dict, workdir: Path, log) -> tuple[Path, Path, Path, bool]:
    """The session's tree, config and database; True when the database is fresh."""
    root = workdir / session["name"]
    tree, config, db = root / "tree", root / "cosmic-ray.toml", root / "session.sqlite"
    code_stamp, tests_stamp = root / "fingerprint_code", root / "fingerprint_tests"
    code, tests = _fingerprints(session)
    saved = SAVED / session["name"]
    if not db.exists() and (saved / "session.sqlite").exists():
        # Continue the results committed by an earlier machine (results/mutation/).
        root.mkdir(parents=True, exist_ok=True)
        for name in STATE_FILES:
            if (saved / name).exists():
                shutil.copy2(saved / name, root / name)
    if db.exists() and code_stamp.exists() and code_stamp.read_text() == _digest(["distill_jax"]):
        code_stamp.write_text(code)  # a stamp of the earlier whole-file digest, same code
    fresh = not (db.exists() and code_stamp.exists() and code_stamp.read_text() == code)
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
        tree.mkdir(parents=True)
    _write_config(session, config)  # the session's test list may have changed
    # The tree is the repository's (a run killed mid-mutant leaves its module
    # mutated; a checkout that continues saved results has no tree yet).
    tree.mkdir(parents=True, exist_ok=True)
    _copy_tree(tree)
    shared = REPO.parent / "shared"  # the data loader looks for ../shared/data beside the repository
    if shared.exists() and not (root / "shared").is_symlink():
        (root / "shared").symlink_to(shared.resolve())
    if not fresh:
        if tests_stamp.read_text() != tests:
            # New or changed tests: the survivors are what new tests are
            # written for, so those re-run; killed mutants stay killed.
            with sqlite3.connect(db) as con:
                survivors = [row[0] for row in con.execute("SELECT job_id FROM work_results WHERE test_outcome = 'SURVIVED'")]
                con.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
            # They were part of the random prefix already done: re-run them
            # first, so that the done mutants stay a prefix of the order.
            (root / "rerun_first").write_text("\n".join(survivors))
            tests_stamp.write_text(tests)
            print(f"{session['name']}: tests changed, survivors reset to pending", file=log, flush=True)
        return tree, config, db, False
    code_stamp.write_text(code)
    tests_stamp.write_text(tests)
    return tree, config, db, True


def run_session(session: dict, workdir: Path, budget_s: float | None) -> str:
    root = workdir / session["name"]
    root.mkdir(parents=True, exist_ok=True)
    env = _env(workdir)
    with (workdir / f"{session['name']}.log").open("a") as log:
        tree, config, db, fresh = _prepare(session, workdir, log)
        if fresh:
            # The unmutated tree must pass, or every mutant would count as killed.
            t0 = time.perf_counter()
            cmd = tomllib.loads(config.read_text())["cosmic-ray"]["test-command"]
            baseline = subprocess.run(shlex.split(cmd), cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
            if baseline.returncode != 0:
                raise RuntimeError(f"{session['name']}: the tests fail on the unmutated tree; see {log.name}.")
            (root / "baseline_s").write_text(f"{time.perf_counter() - t0:.1f}")
            _cosmic("cosmic-ray", "init", str(config), str(db), cwd=tree, env=env, log=log)
            _cosmic("cr-filter-operators", str(db), str(config), cwd=tree, env=env, log=log)
            _cosmic("cr-filter-pragma", str(db), cwd=tree, env=env, log=log)
        # The executor runs in the tree (cosmic-ray resolves the module path
        # from the working directory), one process per session.
        cmd = [sys.executable, str(Path(__file__).resolve()), "--execute", str(db), "--config", str(config)]
        if budget_s:
            cmd += ["--budget-s", str(budget_s)]
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return session["name"]


def execute(db_path: Path, config_path: Path, budget_s: float | None) -> None:
    """Runs the pending mutants of one database in a seeded random order.

    The order is random (seed 0), so the mutants done when a budget runs out
    are a uniform sample of the module's mutants and their score an unbiased
    estimate; a re-run continues with the rest.
    """
    import random

    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db

    config = tomllib.loads(config_path.read_text())["cosmic-ray"]
    elapsed_file = db_path.parent / "exec_s"
    elapsed = float(elapsed_file.read_text()) if elapsed_file.exists() else 0.0
    started = time.perf_counter()
    with use_db(str(db_path), WorkDB.Mode.open) as work_db:
        order = sorted(work_db.work_items, key=lambda item: item.job_id)
        random.Random(0).shuffle(order)
        rerun = db_path.parent / "rerun_first"
        first = set(rerun.read_text().split()) if rerun.exists() else set()
        order = [i for i in order if i.job_id in first] + [i for i in order if i.job_id not in first]
        pending = {item.job_id for item in work_db.pending_work_items}
        for item in (i for i in order if i.job_id in pending):
            if budget_s and time.perf_counter() - started > budget_s:
                print(f"budget of {budget_s:.0f} s spent; run again to continue", flush=True)
                break
            result = mutate_and_test(item.mutations, config["test-command"], float(config["timeout"]))
            work_db.set_result(item.job_id, result)
            elapsed_file.write_text(f"{elapsed + time.perf_counter() - started:.1f}")


# ------------------------------------------------------------------ report


def _load_equivalent() -> list[dict]:
    path = REPO / "mutation" / "equivalent.toml"
    return tomllib.loads(path.read_text()).get("equivalent", []) if path.exists() else []


class _DropAnnotations(ast.NodeTransformer):
    def visit_arg(self, node):
        node.annotation = None
        return node

    def visit_FunctionDef(self, node):
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        node.annotation = ast.Constant(None)
        return self.generic_visit(node)


class _MergeParameterKinds(ast.NodeTransformer):
    """Positional-only, ordinary and keyword-only parameters as one list."""

    def visit_arguments(self, node):
        positional = node.posonlyargs + node.args
        defaults = [None] * (len(positional) - len(node.defaults)) + node.defaults + node.kw_defaults
        return ast.arguments(posonlyargs=[], args=positional + node.kwonlyargs, vararg=node.vararg,
                             kwonlyargs=[], kw_defaults=defaults, kwarg=node.kwarg, defaults=[])


def _classify(source: str, line_no: int, diff: list[str]) -> str | None:
    """``"annotation"`` or ``"marker"`` for the two kinds of mutant that are equivalent by construction.

    * annotation: it changes only type annotations (``Array | None`` ->
      ``Array & None``). Every module here has ``from __future__ import
      annotations``, so annotations are strings that are never evaluated.
    * marker: it turns a signature's keyword-only marker ``*`` into the
      positional-only marker ``/`` (cosmic-ray treats the ``*`` as a
      multiplication). Every call that was valid keeps its meaning; only
      calls that passed those parameters by position, which raised
      TypeError, now run.
    """
    removed = [d[1:] for d in diff if d.startswith("-")]
    added = [d[1:] for d in diff if d.startswith("+")]
    lines = source.splitlines()
    if len(removed) != 1 or len(added) != 1 or lines[line_no - 1] != removed[0]:
        return None
    mutated = "\n".join(lines[: line_no - 1] + added + lines[line_no:])
    try:
        ast.parse(mutated)
    except SyntaxError:
        return None
    strip = lambda text: ast.dump(_DropAnnotations().visit(ast.parse(text)))
    if strip(source) == strip(mutated):
        return "annotation"
    merge = lambda text: ast.dump(_MergeParameterKinds().visit(_DropAnnotations().visit(ast.parse(text))))
    if merge(source) == merge(mutated):
        return "marker"
    return None


def _mutant_diff(source: str, mutation: dict) -> str:
    """The unified diff of one mutant, made without touching any file."""
    import difflib

    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_code

    operator = cosmic_ray.plugins.get_operator(mutation["operator_name"])(**(mutation.get("operator_args") or {}))
    mutated = mutate_code(source, operator, mutation["occurrence"])
    if mutated is None:
        return ""
    return "".join(difflib.unified_diff(source.splitlines(True), mutated.splitlines(True)))


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n (the score of a random sample of mutants)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _line(tree: Path, module: str, line_no: int) -> str:
    lines = (tree / module).read_text().splitlines()
    return lines[line_no - 1].strip() if 0 < line_no <= len(lines) else ""


def session_report(session: dict, workdir: Path, equivalent: list[dict]) -> dict | None:
    root = workdir / session["name"]
    db = root / "session.sqlite"
    if not db.exists():
        return None
    dump = subprocess.run([str(BIN / "cosmic-ray"), "dump", str(db)], capture_output=True, text=True, check=True).stdout
    counts = {"mutants": 0, "killed": 0, "survived": 0, "equivalent": 0, "annotation_only": 0, "marker_only": 0,
              "skipped": 0,
              "pending": 0, "incompetent": 0}
    # The repository's copy: the tree's may hold a mutant right now.
    module_source = (REPO / session["module"]).read_text()
    survivors, used = [], set()
    rerun = set((root / "rerun_first").read_text().split()) if (root / "rerun_first").exists() else set()
    for line in dump.splitlines():
        item, result = json.loads(line)
        mutation = item["mutations"][0]
        counts["mutants"] += 1
        if result is None and item["job_id"] in rerun:
            # A survivor whose re-run against newer tests has not happened
            # yet: counted as surviving until it is killed (unless equivalent).
            result = {"worker_outcome": "normal", "test_outcome": "survived", "awaiting_rerun": True,
                      "diff": _mutant_diff(module_source, mutation)}
        if result is None:
            counts["pending"] += 1
            continue
        if result["worker_outcome"] == "skipped":
            counts["skipped"] += 1
            continue
        outcome = result["test_outcome"]
        if outcome == "killed":
            counts["killed"] += 1
            continue
        if outcome == "incompetent":  # the mutant cannot even run: as good as killed
            counts["incompetent"] += 1
            continue
        source = _line(REPO, mutation["module_path"], mutation["start_pos"][0])
        operator = mutation["operator_name"]
        diff = [d for d in (result.get("diff") or "").splitlines() if d.startswith(("-", "+")) and not d.startswith(("---", "+++"))]
        kind = _classify(module_source, mutation["start_pos"][0], diff)
        if kind is not None:
            counts[f"{kind}_only"] += 1
            continue
        match = next(
            (i for i, e in enumerate(equivalent)
             if e["module"] == session["module"] and e["operator"] == operator and e["line"].strip() == source),
            None,
        )
        if match is not None:
            counts["equivalent"] += 1
            used.add(match)
            continue
        counts["survived"] += 1
        survivors.append({"line": mutation["start_pos"][0], "operator": operator, "source": source, "diff": diff,
                          "awaiting_rerun": bool(result.get("awaiting_rerun"))})
    decided = counts["killed"] + counts["incompetent"] + counts["survived"]
    low, high = _wilson(counts["killed"] + counts["incompetent"], decided)
    return {
        "score_95ci": [low, high] if counts["pending"] else None,
        "module": session["module"],
        "tests": session["tests"],
        **counts,
        "score": (counts["killed"] + counts["incompetent"]) / decided if decided else None,
        "baseline_s": float((root / "baseline_s").read_text()) if (root / "baseline_s").exists() else None,
        "exec_s": float((root / "exec_s").read_text()) if (root / "exec_s").exists() else None,
        "survivors": sorted(survivors, key=lambda s: s["line"]),
        "equivalent_used": sorted(used),
    }


def save_state(sessions: list[dict], workdir: Path) -> None:
    for session in sessions:
        root, saved = workdir / session["name"], SAVED / session["name"]
        if (root / "session.sqlite").exists():
            saved.mkdir(parents=True, exist_ok=True)
            # sqlite's backup API: a consistent copy even while a session writes.
            with sqlite3.connect(root / "session.sqlite") as src, sqlite3.connect(saved / "session.sqlite") as dst:
                src.backup(dst)
            for name in STATE_FILES[1:]:
                if (root / name).exists():
                    shutil.copy2(root / name, saved / name)


def write_report(sessions: list[dict], workdir: Path) -> dict:
    save_state(sessions, workdir)
    equivalent = _load_equivalent()
    reports = {s["name"]: r for s in sessions if (r := session_report(s, workdir, equivalent)) is not None}
    out = {"operators": list(ALLOWED), "sessions": reports}
    results = REPO / "results"
    (results / "mutation.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "| session | module | mutants | skipped | equivalent | killed | survived | pending | score | run time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in reports.items():
        score = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}%"
        if r["score_95ci"]:  # a random sample so far: its 95% interval
            score += f" ({100 * r['score_95ci'][0]:.0f}-{100 * r['score_95ci'][1]:.0f}%)"
        lines.append(
            f"| {name} | `{r['module']}` | {r['mutants']} | {r['skipped']} | {r['equivalent'] + r['annotation_only'] + r['marker_only']} | "
            f"{r['killed'] + r['incompetent']} | {r['survived']} | {r['pending']} | {score} | {r['exec_s'] or 0:.0f} |"
        )
    for name, r in reports.items():
        if r["survivors"]:
            lines += ["", f"Surviving mutants of `{r['module']}` ({name}):", ""]
            for s in r["survivors"]:
                change = " / ".join(s["diff"]) if s["diff"] else s["source"]
                note = " (survived the older tests; not yet re-run against the new ones)" if s.get("awaiting_rerun") else ""
                lines.append(f"- line {s['line']}, {s['operator'].split('/')[-1]}: `{change}`{note}")
    (results / "mutation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="", help="comma-separated session names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="sessions run at once (each on its own tree copy)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "mutation"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop each session after this many seconds (resumable; the mutants done are a random sample)")
    parser.add_argument("--execute", default=None, help=argparse.SUPPRESS)  # internal: one session's executor
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.execute:
        execute(Path(args.execute), Path(args.config), args.budget_s)
        return 0
    sessions = tomllib.loads((REPO / "mutation" / "sessions.toml").read_text())["session"]
    if args.sessions:
        wanted = args.sessions.split(",")
        unknown = set(wanted) - {s["name"] for s in sessions}
        if unknown:
            parser.error(f"unknown sessions {sorted(unknown)}; mutation/sessions.toml has {[s['name'] for s in sessions]}")
        sessions = [s for s in sessions if s["name"] in wanted]
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_session, s, workdir, args.budget_s): s["name"] for s in sessions}
            for future in concurrent.futures.as_completed(futures):
                print(f"session {future.result()} done", flush=True)
    write_report(tomllib.loads((REPO / "mutation" / "sessions.toml").read_text())["session"], workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
