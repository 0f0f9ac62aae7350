"""Tables and plots of the Hinton study (distill_jax.proj.hinton.full) from its results JSON.

Kept apart from the training code so a report can be redrawn from
``results/hinton_full.json`` alone:

  python -c "import json, distill_jax.proj.hinton.report as r; \
    s = json.load(open('results/hinton_full.json')); print(r.markdown(s)); r.plots(s, 'results')"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from distill_jax.proj import stats

DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _pm(stat: Mapping[str, Any], digits: int = 1) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _seeds(summary) -> str:
    return ", ".join(str(s) for s in summary["seeds"])


def markdown(summary: Mapping[str, Any]) -> str:
    """Every table of the study, ours beside the paper's, as markdown."""
    paper = summary["paper"]
    datasets = list(summary["datasets"])
    lines = [f"Seeds {_seeds(summary)}; each entry is the mean ± std (over seeds) of the test errors "
             "out of 10,000; the paper reports single runs on MNIST.", ""]

    # Main table.
    head = "| model | " + " | ".join(f"{DATASET_TITLES.get(d, d)} (ours)" for d in datasets) + " | Hinton et al. MNIST |"
    lines += ["### The main table", "", head, "|---|" + "---:|" * (len(datasets) + 1)]

    def main_row(label, get, paper_value):
        cells = []
        for d in datasets:
            stat = get(summary["datasets"][d])
            cells.append("n/a" if stat is None else _pm(stat))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper_value} |")

    main_row(teacher_label(summary["config"].get("teacher", {})), lambda r: r["teacher"]["test_errors"],
             paper["teacher"])
    main_row("student 2x800, hard labels", lambda r: _student(r, 800, "hard"), paper["hard_800"])
    main_row("student 2x800, soft targets T=20 (+0.1 x hard)", lambda r: _student(r, 800, "T20"),
             paper["distilled_800_T20"])
    patient = {d: r["patient"] for d, r in summary["datasets"].items() if r.get("patient")}
    if patient:
        p = next(iter(patient.values()))
        main_row(f"student 2x{p['width']}, patient and consistent: T={p['temperature']:g} (+0.1 x hard), teacher in "
                 f"the loop on the student's {p['jitter']}-px jitter, {p['epochs']} epochs",
                 lambda r: r["patient"]["test_errors"] if r.get("patient") else None, "")
    lines.append("")
    epochs = [f"{DATASET_TITLES.get(d, d)}: teacher {r['teacher']['epochs']} epochs "
              f"({r['teacher']['wall_time_s']:.0f} s for {len(summary['seeds'])} teachers), students "
              f"{_first_width(r)['epochs']} epochs"
              + (f", patient students {r['patient']['epochs']} epochs ({r['patient']['wall_time_s']:.0f} s for "
                 f"{len(r['patient']['per_seed'])})" if r.get("patient") else "")
              for d, r in summary["datasets"].items()]
    lines += ["Epochs and wall time on the 2-core CPU: " + "; ".join(epochs) + ".", ""]

    for d, r in summary["datasets"].items():
        lines += _per_seed(d, r)

    # Temperature x width.
    for d, r in summary["datasets"].items():
        temps = sorted({k for block in r["students"].values() for k in block["rows"] if k != "hard"},
                       key=lambda k: float(k[1:]))
        lines += [f"### Temperature vs capacity, {DATASET_TITLES.get(d, d)}", "",
                  "| hidden width | hard labels | " + " | ".join(f"T={k[1:]}" for k in temps)
                  + " | best T − hard labels (paired, 95% CI) | T level with the best (paired 95% CI spans 0) "
                  "| population (students) | wall time (s) |",
                  "|---|" + "---:|" * (len(temps) + 2) + "---|---:|---:|"]
        for width, block in r["students"].items():
            rows = block["rows"]
            have = [k for k in temps if k in rows]
            best = min(have, key=lambda k: rows[k]["test_errors"]["mean"])
            cells = []
            for k in ["hard"] + temps:
                if k not in rows:
                    cells.append("")
                    continue
                cell = _pm(rows[k]["test_errors"])
                cells.append(f"**{cell}**" if k == best else cell)
            vs_hard = _paired(rows[best], rows["hard"])
            level = [k[1:] for k in have if k != best and _paired(rows[k], rows[best])["low"] <= 0]
            lines.append(f"| 2x{width} | " + " | ".join(cells) + f" | T={best[1:]}: {_ci(vs_hard)} | "
                         + (", ".join(level) or "none") + f" | {block['members']} | {block['wall_time_s']:.0f} |")
        n = len(summary["seeds"])
        lines += ["", f"Bold: the best temperature of the row (lowest mean test errors; a description, not a choice "
                  f"made on test). Intervals: Student-t over the {n} paired seeds (each seed's students share "
                  "their initialization and teacher). Paper (MNIST): with >= 300 units per layer all T > 8 gave "
                  "similar results; with 30 units, T in [2.5, 4] worked best.", ""]

    lines += _transfer_tables(summary)
    lines += [f"Wall time of this invocation: {summary['session_wall_time_s']:.0f} s (stages finished "
              "by an earlier invocation are reused, not retrained).", ""]
    return "\n".join(lines)


def _transfer_tables(summary) -> list[str]:
    paper = summary["paper"]
    having = {d: r for d, r in summary["datasets"].items() if r.get("transfer")}
    if not having:
        return []
    datasets = list(having)
    lines = []
    po, p78 = paper["omit_3"], paper["only_7_8"]
    lines += ["### Transfer set without any 3s (2x800 student, T=20)", "",
              "| | " + " | ".join(f"{DATASET_TITLES.get(d, d)} (ours)" for d in datasets) + " | Hinton et al. MNIST |",
              "|---|" + "---:|" * (len(datasets) + 1)]
    rows = [("test errors, before the shift", "errors_before", po["errors_before"]),
            ("errors on the test examples of class 3", "errors_on_class_before", po["errors_on_class_before"]),
            ("bias shift of class 3 (chosen on validation)", "shift", po["shift"]),
            ("test errors, after the shift", "errors_after", po["errors_after"]),
            ("errors on class 3, after the shift", "errors_on_class_after", po["errors_on_class_after"])]
    for label, key, paper_value in rows:
        cells = [_pm(r["transfer"]["omit_3"][key], 2 if key == "shift" else 1) for r in having.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper_value} |")
    counts = ", ".join(f"{DATASET_TITLES.get(d, d)} {r['transfer']['omit_3']['class_count']}"
                       for d, r in having.items())
    lines += ["", f"Test examples of class 3: {counts} (paper: {po['class_count']}).", ""]

    lines += ["### Transfer set of only 7s and 8s (2x800 student, T=20)", "",
              "| | " + " | ".join(f"{DATASET_TITLES.get(d, d)} (ours)" for d in datasets) + " | Hinton et al. MNIST |",
              "|---|" + "---:|" * (len(datasets) + 1)]
    rows = [("test error rate (%), before the shift", "error_rate_before", p78["error_rate_before"]),
            ("bias shift of 7 and 8 (down; chosen on validation)", "shift", p78["shift"]),
            ("test error rate (%), after the shift", "error_rate_after", p78["error_rate_after"])]
    for label, key, paper_value in rows:
        cells = [_pm(r["transfer"]["only_7_8"][key], 2) for r in having.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper_value} |")
    transfer_info = "; ".join(
        f"{DATASET_TITLES.get(d, d)}: no-3s set {r['transfer']['omit_3']['num_train']} examples, "
        f"{r['transfer']['omit_3']['epochs']} epochs ({r['transfer']['omit_3']['wall_time_s']:.0f} s); "
        f"7s-and-8s set {r['transfer']['only_7_8']['num_train']} examples, {r['transfer']['only_7_8']['epochs']} "
        f"epochs ({r['transfer']['only_7_8']['wall_time_s']:.0f} s)"
        for d, r in having.items())
    lines += ["", f"{transfer_info}. For Fashion-MNIST, class 3 is 'dress', 7 'sneaker' and 8 'bag'.", ""]
    return lines


def _ci(stat: Mapping[str, Any]) -> str:
    return f"{stat['mean']:+.1f} [{stat['low']:+.1f}, {stat['high']:+.1f}]"


def _paired(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    """Paired interval of two rows' per-seed test errors (``a - b``), after checking the seeds match."""
    if a["seeds"] != b["seeds"]:
        raise ValueError(f"rows of different seeds cannot be paired: {a.get('seeds')} vs {b.get('seeds')}.")
    return stats.paired_t_interval(a["test_errors"]["values"], b["test_errors"]["values"])


def _per_seed(d: str, r: Mapping[str, Any]) -> list[str]:
    """Every seed's teacher and students of the main width, and the paired differences that matter.

    The main width is the patient-teaching student's, else 800.
    """
    width = str(r["patient"]["width"]) if r.get("patient") else "800"
    block = r["students"].get(width)
    if block is None or "T20" not in block["rows"]:
        return []
    seeds = block["rows"]["hard"]["seeds"]
    teacher = {"seeds": [t["seed"] for t in r["teacher"]["per_seed"]], "test_errors": r["teacher"]["test_errors"]}
    hard, soft = block["rows"]["hard"], block["rows"]["T20"]
    cols = [("teacher", teacher), (f"2x{width} hard labels", hard), (f"2x{width} T=20", soft)]
    if r.get("patient"):
        patient = {"seeds": [p["seed"] for p in r["patient"]["per_seed"]], "test_errors": r["patient"]["test_errors"]}
        cols.append((f"2x{width} patient and consistent", patient))
    lines = [f"### Every seed, {DATASET_TITLES.get(d, d)} (test errors of 10,000)", "",
             "| seed | " + " | ".join(name for name, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for i, seed in enumerate(seeds):
        lines.append(f"| {seed} | " + " | ".join(f"{c['test_errors']['values'][i]:.0f}" for _, c in cols) + " |")
    lines += ["| mean ± std | " + " | ".join(_pm(c["test_errors"]) for _, c in cols) + " |", "",
              "Paired differences (mean over seeds, 95% Student-t interval):", "",
              f"- T=20 − hard labels: {_ci(_paired(soft, hard))} errors; T=20 better on "
              f"{sum(a < b for a, b in zip(soft['test_errors']['values'], hard['test_errors']['values']))} of "
              f"{len(seeds)} seeds",
              f"- T=20 − its teacher: {_ci(_paired(soft, teacher))} errors"]
    if r.get("patient"):
        lines += [f"- patient − T=20: {_ci(_paired(patient, soft))} errors",
                  f"- patient − its teacher: {_ci(_paired(patient, teacher))} errors"]
    return lines + [""]


def teacher_label(teacher: Mapping[str, Any]) -> str:
    """The main table's name of the teacher recipe, from the study config's ``teacher``."""
    model = teacher.get("model", {})
    jitter = f" + {teacher['jitter']}-px jitter" if teacher.get("jitter") else ""
    if model.get("name") == "cnn":
        features = "+".join(str(f) for f in model.get("features", ()))
        return f"teacher CNN (3x3 conv {features} channels, 2x2 max-pool, {model.get('dense')} dense), dropout{jitter}"
    hidden = model.get("hidden") or [1200, 1200]
    return f"teacher {len(hidden)}x{hidden[0]}, dropout + max-norm{jitter}"


def _first_width(r):
    return next(iter(r["students"].values()))


def _student(r, width, key):
    block = r["students"].get(str(width))
    return None if block is None else block["rows"][key]["test_errors"]


def _save(fig, title: str, path: Path) -> Path:
    """Titles, lays out, writes and closes ``fig``; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(summary: Mapping[str, Any], results_dir: str | Path) -> list[Path]:
    """Errors vs temperature per width, and the teacher's soft targets, one PNG each per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results_dir = Path(results_dir)
    written = []
    name = summary["study"]
    for d, r in summary["datasets"].items():
        title = DATASET_TITLES.get(d, d)
        widths = list(r["students"])
        fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.6), squeeze=False)
        for ax, width in zip(axes[0], widths):
            rows = r["students"][width]["rows"]
            temps = [k for k in rows if k != "hard"]
            ts = np.asarray([float(k[1:]) for k in temps])
            mean = np.asarray([rows[k]["test_errors"]["mean"] for k in temps])
            std = np.asarray([rows[k]["test_errors"]["std"] for k in temps])
            ax.errorbar(ts, mean, yerr=std, marker="o", capsize=3, label="soft targets (+0.1 hard)")
            hard = rows["hard"]["test_errors"]
            ax.axhline(hard["mean"], color="gray", linestyle="--", label="hard labels")
            ax.axhspan(hard["mean"] - hard["std"], hard["mean"] + hard["std"], color="gray", alpha=0.15)
            if d == "mnist" and width == "800":
                ax.scatter([20], [summary["paper"]["distilled_800_T20"]], marker="*", s=120, color="C3",
                           label="paper, T=20", zorder=5)
            ax.set_xscale("log")
            ax.set_xticks(ts)
            ax.set_xticklabels([f"{t:g}" for t in ts])
            ax.set_xlabel("temperature T")
            ax.set_title(f"2x{width} student")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test errors (of 10,000)")
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, f"{title}: test errors vs temperature per width (mean ± std over seeds)",
                             results_dir / f"{name}_temperature_{d}.png"))

        dk = r["dark_knowledge"]
        temps = list(dk["soft_targets"])
        fig, axes = plt.subplots(len(dk["labels"]), len(temps), figsize=(3.2 * len(temps), 1.9 * len(dk["labels"])),
                                 squeeze=False)
        for row, label in enumerate(dk["labels"]):
            for col, t in enumerate(temps):
                ax = axes[row][col]
                probs = np.asarray(dk["soft_targets"][t][row])
                colors = ["C3" if k == label else "C0" for k in range(len(probs))]
                ax.bar(range(len(probs)), probs, color=colors)
                ax.set_yscale("log")
                ax.set_ylim(1e-12, 1.5)
                ax.set_xticks(range(len(probs)))
                if row == 0:
                    ax.set_title(f"T = {t}")
                if col == 0:
                    ax.set_ylabel(f"test digit\nlabel {label}")
        written.append(_save(fig, f"{title}: the teacher's soft targets (red: true class; log scale)",
                             results_dir / f"{name}_dark_knowledge_{d}.png"))
    return written
