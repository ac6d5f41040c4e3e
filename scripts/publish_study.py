"""Publish study runs into docs/: raw CSVs, small figures and the Markdown tables RESULTS.md quotes.

    python scripts/publish_study.py runs/study-busbra runs/study-hc18 runs/study-busbra-long runs/study-hc18-long

For each run folder: ``rndpo report`` is (re)written, then
- ``docs/results/<dataset>.csv`` (results.csv: every cell, every β), ``<dataset>_agg.csv`` (mean ± std over
  seeds), ``<dataset>_comparisons.csv`` (paired bootstrap CIs), ``<dataset>_audit.csv`` (judge audits);
- ``docs/figures/<dataset>_curves.png`` (test Dice curves of every regime), ``<dataset>_region_hist.png``
  (|D| of right vs wrong pairs), ``<dataset>_beta_<regime>.png`` for two regimes;
- ``docs/results/<dataset>_tables.md``: per regime the selected-β summary of every method (the tables of
  RESULTS.md), generated, never typed by hand.
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
from rndpo.stats import hierarchical_bootstrap, paired_bootstrap, selected_rows

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


def tables(rows: list[dict]) -> str:
    selected = [r for r in rows if r.get("selected") in (True, "True", "true", 1)]
    seeds = sorted({int(r["seed"]) for r in selected})
    out = [f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds where n > 1). β chosen per method and seed "
           "on the val split (sustained val Dice). Test Dice.\n"]
    for metric in ("peak", "sustained", "final", "drop"):
        out.append(f"\n**{metric}** (test Dice)\n")
        minings = sorted({r["mining"] for r in selected})
        header = ["judge (pairwise acc.)", "mining"] + METHODS
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
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
                out.append("| " + " | ".join([label, mining] + [fmt(cell.get(m, [])) for m in METHODS]) + " |")
    betas = defaultdict(list)
    for r in selected:
        if r.get("beta") not in (None, "") and float(r["beta"]) == float(r["beta"]):  # objectives only
            betas[(r["method"], r["judge"], r["mining"])].append(float(r["beta"]))
    out.append("\n**β chosen on val** (per seed)\n")
    out.append("| method | judge | mining | β |")
    out.append("|---|---|---|---|")
    for (method, judge, mining), values in sorted(betas.items()):
        out.append(f"| {method} | {judge} | {mining} | {', '.join(f'{b:g}' for b in values)} |")
    return "\n".join(out) + "\n"


def comparison_tables(comps: list[dict]) -> str:
    """RN − summed and method − base, per regime: final Dice with the two-level (seeds × cases) CI,
    and the seed-level differences of peak / sustained / drop."""

    def cell(record: dict | None) -> str:
        if record is None or record["mean_diff"] in ("", "nan"):
            return "—"
        diff, lo, hi = float(record["mean_diff"]), record["lo"], record["hi"]
        if lo in ("", "nan") or hi in ("", "nan"):
            return f"{diff:+.3f}"
        star = "*" if float(lo) > 0 or float(hi) < 0 else ""
        return f"{diff:+.3f} [{float(lo):+.3f}, {float(hi):+.3f}]{star}"

    index = {(r["judge"], r["mining"], r["comparison"], r["metric"]): r for r in comps}
    regimes = sorted({(r["judge"], r["mining"]) for r in comps}, key=lambda jm: (JUDGES.index(jm[0]) if jm[0] in JUDGES else 99, jm[1]))
    out = ["\n**Differences** (mean over seeds; 95 % CI in brackets, * = excludes 0). `final (cases)`: final test "
           "Dice, two-level bootstrap over seeds and test cases. peak / sustained / drop: bootstrap over the seeds "
           "only (3 values: descriptive).\n"]
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
            out.append("| " + " | ".join([judge, mining, name] + [cell(r) for r in records]) + " |")
    return "\n".join(out) + "\n"


def mining_table(run: Path, rows: list[dict], a: str = "top-vs-rest", b: str = "random-pairs") -> str:
    """Question 1: ``a − b`` mining per (judge, objective), paired by seed (and by test case for final Dice)."""
    chosen = selected_rows(rows)
    by = {(r["judge"], r["mining"], r["method"], int(r["seed"])): r for r in chosen}
    out = [f"\n**Mining: {a} − {b}** (same judge, objective and seed; β chosen on val for each). peak: bootstrap "
           "over seeds; final (cases): two-level bootstrap over seeds and test cases. 95 % CI, * = excludes 0.\n",
           "| judge | method | peak | final (cases) | seeds |", "|---|---|---|---|---|"]

    def fmt_ci(stats: dict) -> str:
        if not np.isfinite(stats["mean_diff"]):
            return "—"
        if not (np.isfinite(stats["lo"]) and np.isfinite(stats["hi"])):
            return f"{stats['mean_diff']:+.3f}"
        star = "*" if stats["lo"] > 0 or stats["hi"] < 0 else ""
        return f"{stats['mean_diff']:+.3f} [{stats['lo']:+.3f}, {stats['hi']:+.3f}]{star}"

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
            out.append(f"| {judge} | {method} | {fmt_ci(paired_bootstrap(peaks_a, peaks_b))} | {fmt_ci(final)} | "
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
    out = ["\n**Judge audits** (val split, mean over seeds; truly better = fraction of mined pool pairs whose "
           "chosen mask has the higher true Dice)\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
    note = " Stages were reused from the main run (`--stages`) and cost nothing here." if shared else ""
    out = [f"\n**Compute time per seed** (seconds; stage `seconds` and cell `wall_s` as recorded by `rndpo run`).{note}\n",
           "| seed | base | bank | scores (all judges) | pairs | cells (n) | total (min) |", "|---|---|---|---|---|---|---|"]
    for seed in sorted(per_seed):
        c = per_seed[seed]
        total = sum(c[k] for k in ("base", "bank", "scores", "pairs", "cells"))
        out.append(f"| {seed} | {c['base']:.0f} | {c['bank']:.0f} | {c['scores']:.0f} | {c['pairs']:.0f} | "
                   f"{c['cells']:.0f} ({int(c['n_cells'])}) | {total / 60:.1f} |")
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


def publish(run: Path) -> None:
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
    for name, target in (("curves_all.png", "curves"), ("region_hist.png", "region_hist")):
        if (report / name).exists():
            shutil.copy(report / name, figures / f"{dataset}_{target}.png")
    mining = "top-vs-rest" if any(r["mining"] == "top-vs-rest" for r in rows) else "random-pairs"
    for regime in (f"oracle-{mining}", f"oracle-gaussian-0.2-{mining}", f"agreement-{mining}"):
        for path in report.glob(f"beta_*-{regime}.png"):
            shutil.copy(path, figures / f"{dataset}_beta_{regime}.png")
    text = tables(rows) + audit_table(run) + costs(run, rows)
    if {"top-vs-rest", "random-pairs"} <= {r["mining"] for r in rows}:
        text += mining_table(run, rows)
    if (run / "comparisons.csv").exists():
        with open(run / "comparisons.csv", newline="") as handle:
            text += comparison_tables(list(csv.DictReader(handle)))
    (results / f"{dataset}_tables.md").write_text(text)
    print(f"{dataset}: {len(rows)} rows → {results}, figures → {figures}")


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        publish(Path(argument))
