"""Publish study runs into docs/: raw CSVs, small figures and the Markdown tables RESULTS.md quotes.

    python scripts/publish_study.py runs/study-busbra runs/study-hc18 runs/study-busbra-long runs/study-hc18-long

For each run folder: ``rndpo report`` is (re)written, then
- ``docs/results/<dataset>.csv`` (results.csv: every cell, every β), ``<dataset>_agg.csv`` (mean ± std over
  seeds), ``<dataset>_comparisons.csv`` (paired bootstrap CIs), ``<dataset>_audit.csv`` (judge audits);
- ``docs/figures/<dataset>_curves.png`` (test Dice curves of every regime), ``<dataset>_region_hist.png``
  (|D| of right vs wrong pairs), ``<dataset>_beta_<regime>.png`` for two regimes;
- ``docs/results/<dataset>_tables.md``: every table (test Dice per metric, β chosen, judge audits, compute
  time, mining and method differences with CIs), generated, never typed by hand;
- the tables of ``docs/RESULTS.md``: each between ``<!-- BEGIN <dataset>:<table> -->`` and ``<!-- END … -->``
  markers, replaced by the generated table (the text around them is written by hand, from these numbers).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from rndpo.config import OBJECTIVES
from rndpo.experiment import PER_CASE_FILE, read_per_case
from rndpo.report import read_results, write_report
from rndpo.stats import hierarchical_bootstrap, paired_bootstrap, selected_rows, to_float

DOCS = Path(__file__).resolve().parents[1] / "docs"
METHODS = ["base", "pseudo-label", "entropy-min", "mean-teacher", "dpo", "rn-dpo", "rdpo", "rn-rdpo", "oracle"]
JUDGES = ["oracle", "oracle+gaussian:0.1", "oracle+gaussian:0.2", "agreement", "entropy", "learned-qc"]


def fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def ci_text(record: dict | None) -> str:
    """"+0.012 [+0.003, +0.020]*" from a bootstrap result or a comparisons.csv row (* = CI excludes 0)."""
    diff = to_float(record["mean_diff"]) if record is not None else float("nan")
    if not np.isfinite(diff):
        return "—"
    lo, hi = to_float(record["lo"]), to_float(record["hi"])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{diff:+.3f}"
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"


def metric_table(rows: list[dict], metric: str) -> str:
    """Test ``metric`` per (judge, mining) × method: mean ± std over seeds of the β chosen on val."""
    selected = selected_rows(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in selected)]
    minings = sorted({r["mining"] for r in selected})
    header = ["judge (pairwise acc.)", "mining"] + methods
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for judge in JUDGES:
        for mining in minings:
            cell = defaultdict(list)
            accuracy = []
            for r in selected:
                if r["judge"] == judge and r["mining"] == mining:
                    cell[r["method"]].append(float(r[metric]))
                    if r.get("judge_accuracy") not in (None, ""):
                        accuracy.append(float(r["judge_accuracy"]))
            if not cell:
                continue
            label = f"{judge} ({np.mean(accuracy):.2f})" if accuracy else judge
            out.append("| " + " | ".join([label, mining] + [fmt(cell.get(m, [])) for m in methods]) + " |")
    return "\n".join(out) + "\n"


def beta_table(rows: list[dict]) -> str:
    """The β chosen on val, per (objective, judge, mining), one value per seed."""
    betas = defaultdict(list)
    for r in sorted(selected_rows(rows), key=lambda r: int(r["seed"])):
        if r.get("beta") not in (None, "") and float(r["beta"]) == float(r["beta"]):  # objectives only
            betas[(r["method"], r["judge"], r["mining"])].append(float(r["beta"]))
    out = ["| method | judge | mining | β (seeds in order) |", "|---|---|---|---|"]
    for (method, judge, mining), values in sorted(betas.items()):
        out.append(f"| {method} | {judge} | {mining} | {', '.join(f'{b:g}' for b in values)} |")
    return "\n".join(out) + "\n"


def comparison_table(comps: list[dict], kind: str | None = None) -> str:
    """RN − summed and method − base (or only ``kind``), per regime: final Dice with the two-level
    (seeds × cases) CI, and the seed-level differences of sustained / peak / drop."""

    index = {(r["judge"], r["mining"], r["comparison"], r["metric"]): r for r in comps}
    regimes = sorted({(r["judge"], r["mining"]) for r in comps}, key=lambda jm: (JUDGES.index(jm[0]) if jm[0] in JUDGES else 99, jm[1]))
    if kind is not None:
        comps = [r for r in comps if r["kind"] == kind]
    out = []

    def order(name: str) -> tuple:
        method = name.split(" − ")[0]
        return (name.endswith("− base"), METHODS.index(method) if method in METHODS else 99)

    names = sorted({r["comparison"] for r in comps}, key=order)
    header = ["judge", "mining", "comparison", "final (cases)", "sustained", "peak", "drop"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for judge, mining in regimes:
        for name in names:
            records = [index.get((judge, mining, name, m)) for m in ("final (cases)", "sustained", "peak", "drop")]
            if all(r is None for r in records):
                continue
            out.append("| " + " | ".join([judge, mining, name] + [ci_text(r) for r in records]) + " |")
    return "\n".join(out) + "\n"


def mining_table(run: Path, rows: list[dict], a: str = "top-vs-rest", b: str = "random-pairs") -> str:
    """Question 1: ``a − b`` mining per (judge, objective), paired by seed (and by test case for final Dice)."""
    chosen = selected_rows(rows)
    by = {(r["judge"], r["mining"], r["method"], int(r["seed"])): r for r in chosen}
    out = ["| judge | method | peak | final (cases) | seeds |", "|---|---|---|---|---|"]

    methods = [m for m in METHODS if m in OBJECTIVES and any(k[2] == m and k[1] == a for k in by) and any(k[2] == m and k[1] == b for k in by)]
    for judge in JUDGES:
        for method in methods:
            seeds = sorted(s for (j, m, meth, s) in by if j == judge and m == a and meth == method
                           and (judge, b, method, s) in by)
            if not seeds:
                continue
            peaks_a = [float(by[(judge, a, method, s)]["peak"]) for s in seeds]
            peaks_b = [float(by[(judge, b, method, s)]["peak"]) for s in seeds]
            cases_a, cases_b = [], []
            for s in seeds:
                files = [run / "cells" / by[(judge, m, method, s)]["cell_id"] / PER_CASE_FILE for m in (a, b)]
                if all(f.is_file() for f in files):
                    first, second = (read_per_case(f) for f in files)
                    shared = sorted(set(first) & set(second))
                    cases_a.append(np.array([first[c] for c in shared]))
                    cases_b.append(np.array([second[c] for c in shared]))
            final = hierarchical_bootstrap(cases_a, cases_b) if cases_a else {"mean_diff": float("nan")}
            out.append(f"| {judge} | {method} | {ci_text(paired_bootstrap(peaks_a, peaks_b))} | {ci_text(final)} | "
                       f"{' '.join(map(str, seeds))} |")
    return "\n".join(out) + "\n"


def audit_table(run: Path) -> str:
    """Judge audits on val (mean over seeds) and the fraction of mined pool pairs that are truly right."""
    scores = defaultdict(lambda: defaultdict(list))
    for record in audits(run):
        for key in ("spearman", "pairwise_accuracy", "top1_regret"):
            if record.get(key) is not None:
                scores[record["judge"]][key].append(float(record[key]))
    right = defaultdict(list)
    for path in run.glob("stages/pairs-*/pairs_audit.json"):
        data = json.loads(path.read_text())
        right[(data["judge"], data["mining"])].append(float(data["truly_better_fraction"]))
    minings = sorted({m for _, m in right})
    header = ["judge", "seeds", "ρ", "pairwise acc.", "top-1 regret"] + [f"truly better ({m})" for m in minings]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for judge in [j for j in JUDGES if j in scores]:
        values = scores[judge]
        cells = [judge, str(len(values["pairwise_accuracy"]))]
        cells += [f"{np.mean(values[k]):.2f}" if k != "top1_regret" else f"{np.mean(values[k]):.3f}"
                  for k in ("spearman", "pairwise_accuracy", "top1_regret")]
        cells += [f"{np.mean(right[(judge, m)]):.2f}" if right.get((judge, m)) else "—" for m in minings]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def costs(run: Path, rows: list[dict]) -> str:
    """Compute time per seed, from the stage summaries (``seconds``) and the cells' ``wall_s``."""
    per_seed: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    shared = (run / "stages").is_symlink()  # stages reused from another run (`--stages`): not paid here
    for done in [] if shared else run.glob("stages/*/done.json"):
        parts = yaml.safe_load((done.parent / "config.yaml").read_text())["parts"]
        seed = parts[1]["seed"]  # the seeded split
        kind = done.parent.name.split("-")[0]
        per_seed[seed][kind] += float(json.loads(done.read_text()).get("seconds") or 0.0)
    cells = {r["cell_id"]: r for r in rows}
    for row in cells.values():
        per_seed[int(row["seed"])]["cells"] += float(row["wall_s"] or 0.0)
        per_seed[int(row["seed"])]["n_cells"] += 1
    out = ["| seed | base | bank | scores (all judges) | pairs | cells (n) | total (min) |", "|---|---|---|---|---|---|---|"]
    for seed in sorted(per_seed):
        c = per_seed[seed]
        total = sum(c[k] for k in ("base", "bank", "scores", "pairs", "cells"))
        out.append(f"| {seed} | {c['base']:.0f} | {c['bank']:.0f} | {c['scores']:.0f} | {c['pairs']:.0f} | "
                   f"{c['cells']:.0f} ({int(c['n_cells'])}) | {total / 60:.1f} |")
    if shared:
        out.append("\nStages were reused from the main run (`--stages`) and cost nothing here.")
    return "\n".join(out) + "\n"


def audits(run: Path) -> list[dict]:
    records = []
    for path in sorted(run.glob("stages/scores-*/audit.json")):
        data = json.loads(path.read_text())
        parts = yaml.safe_load((path.parent / "config.yaml").read_text())["parts"]
        records.append({"judge": data["judge"], "seed": parts[-1].get("seed", ""),
                        "spearman": data.get("spearman"), "pairwise_accuracy": data.get("pairwise_accuracy"),
                        "top1_regret": data.get("regret"), "stage": path.parent.name})
    return records


def publish(run: Path) -> dict[str, str]:
    write_report(run)
    rows = read_results(run)
    # files are named by the experiment: study-busbra → busbra, study-busbra-long → busbra-long
    name = yaml.safe_load((run / "config.yaml").read_text()).get("name") or rows[0]["dataset"]
    dataset = name.removeprefix("study-")
    results, figures = DOCS / "results", DOCS / "figures"
    results.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "results.csv", results / f"{dataset}.csv")
    for name, target in (("results_agg.csv", "agg"), ("comparisons.csv", "comparisons")):
        if (run / name).exists():
            shutil.copy(run / name, results / f"{dataset}_{target}.csv")
    audit_rows = audits(run)
    if audit_rows:
        with open(results / f"{dataset}_audit.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(audit_rows[0]))
            writer.writeheader()
            writer.writerows(audit_rows)
    report = run / "report"
    shared = (run / "stages").is_symlink()  # the pairs (and their |D| histogram) belong to the main run
    for name, target in (("curves_all.png", "curves"), ("region_hist.png", "region_hist")):
        if (report / name).exists() and not (shared and target == "region_hist"):
            shutil.copy(report / name, figures / f"{dataset}_{target}.png")
    mining = "top-vs-rest" if any(r["mining"] == "top-vs-rest" for r in rows) else "random-pairs"
    for regime in (f"oracle-{mining}", f"oracle-gaussian-0.2-{mining}", f"agreement-{mining}"):
        for path in report.glob(f"beta_*-{regime}.png"):
            shutil.copy(path, figures / f"{dataset}_beta_{regime}.png")
    sections = {f"{dataset}:{metric}": metric_table(rows, metric) for metric in ("peak", "sustained", "final", "drop")}
    sections[f"{dataset}:beta"] = beta_table(rows)
    sections[f"{dataset}:audit"] = audit_table(run)
    sections[f"{dataset}:cost"] = costs(run, rows)
    if {"top-vs-rest", "random-pairs"} <= {r["mining"] for r in rows}:
        sections[f"{dataset}:mining"] = mining_table(run, rows)
    if (run / "comparisons.csv").exists():
        with open(run / "comparisons.csv", newline="") as handle:
            comps = list(csv.DictReader(handle))
        sections[f"{dataset}:rn"] = comparison_table(comps, kind="region-normalised vs summed")
        sections[f"{dataset}:differences"] = comparison_table(comps)
    seeds = sorted({int(r["seed"]) for r in rows})
    text = [f"# {dataset}: generated by scripts/publish_study.py from {run.name} (seeds {', '.join(map(str, seeds))})\n",
            "Test Dice of the β chosen per method and seed on val (sustained val Dice), mean ± std over seeds.",
            "Differences: mean over seeds, 95 % CI in brackets, * = CI excludes 0; `final (cases)` = two-level",
            "bootstrap over seeds and test cases, other columns = bootstrap over the seeds only (descriptive).\n"]
    for key, table in sections.items():
        text += [f"## {key.split(':', 1)[1]}\n", table]
    (results / f"{dataset}_tables.md").write_text("\n".join(text))
    print(f"{dataset}: {len(rows)} rows → {results}, figures → {figures}")
    return sections


def fill_markers(path: Path, sections: dict[str, str]) -> list[str]:
    """Replace the text between ``<!-- BEGIN key -->`` and ``<!-- END key -->`` in ``path`` by ``sections[key]``;
    returns the keys filled. Markers naming an unknown key are left as they are."""
    text = path.read_text()
    filled = []
    for key, table in sections.items():
        begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{begin}\n{table.strip()}\n{end}{tail}"
            filled.append(key)
    path.write_text(text)
    return filled


if __name__ == "__main__":
    sections: dict[str, str] = {}
    for argument in sys.argv[1:]:
        sections.update(publish(Path(argument)))
    filled = fill_markers(DOCS / "RESULTS.md", sections)
    print(f"RESULTS.md: {len(filled)} tables filled ({', '.join(filled)})")
