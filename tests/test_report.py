"""rndpo.report on fabricated run folders: every table and figure, numbers parsed back, partial runs,
and the `rndpo report` command."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from rndpo.cli import main
from rndpo.errors import RndpoError
from rndpo.io import append_jsonl, write_json, write_yaml
from rndpo.report import ORACLE_LABEL, format_results_table, load_run, read_results, results_table, write_report
from rndpo.stats import select_beta

STEPS = list(range(0, 101, 10))  # 11 evaluations: sustained = mean of the last 2
GAINS = {"dpo": (0.12, 0.06), "rn-dpo": (0.15, 0.01), "oracle": (0.25, 0.0), "pseudo-label": (0.05, 0.02)}
JUDGE_SCALE = {"oracle+gaussian:0.1": 1.0, "agreement": 0.5}
# validation offset per (method, β): dpo prefers β=0.1 on val, rn-dpo prefers β=1 on val although
# β=0.1 is better on test (so a selection that peeked at test would differ)
VAL_OFFSET = {("dpo", 0.1): 0.02, ("dpo", 1.0): 0.0, ("rn-dpo", 0.1): 0.0, ("rn-dpo", 1.0): 0.03}
BETA_SCALE = {0.1: 1.0, 1.0: 0.8}


def fake_curve(method: str, judge: str, beta: float | None, seed: int) -> tuple[list[int], list[float]]:
    start = 0.60 + 0.01 * seed
    if method == "base":
        return [0], [start]
    gain, decay = GAINS[method]
    gain *= JUDGE_SCALE[judge] if method not in ("oracle",) else 1.0
    gain *= BETA_SCALE.get(beta, 1.0)
    steps = np.array(STEPS, dtype=float)
    values = start + gain * (1 - np.exp(-steps / 20)) - decay * steps / 100
    return STEPS, [float(v) for v in values]


def summary(values: list[float]) -> dict[str, float]:
    values_a = np.asarray(values)
    peak = float(values_a.max())
    return {"peak": peak, "final": float(values_a[-1]), "sustained": float(values_a[-max(1, len(values_a) // 4):].mean()),
            "drop": peak - float(values_a[-1]), "auc": float(values_a.mean())}


def fabricate_run(
    root: Path,
    *,
    judges=("oracle+gaussian:0.1", "agreement"),
    minings=("top-vs-rest", "all-pairs"),
    seeds=(0, 1, 2),
    methods=("base", "dpo", "rn-dpo", "pseudo-label", "oracle"),
    betas=(0.1, 1.0),
    results_csv=True,
    selected_column=True,
    stages=True,
    galleries=2,
) -> list[dict]:
    """A run folder as the runner writes it; returns the result rows (with `selected`)."""
    write_yaml(root / "config.yaml", {"name": "fake", "seeds": list(seeds)})
    rows = []
    for judge in judges:
        for mining in minings:
            for method in methods:
                method_betas = betas if method in ("dpo", "rn-dpo") else (None,)
                for beta in method_betas:
                    for seed in seeds:
                        cell_id = f"c{len(rows):03d}"
                        steps, test = fake_curve(method, judge, beta, seed)
                        val = [v + VAL_OFFSET.get((method, beta), 0.01) for v in test]
                        cell = root / "cells" / cell_id
                        write_yaml(cell / "config.yaml", {"dataset": "synth", "judge": judge, "mining": mining,
                                                          "method": method, "beta": beta, "seed": seed})
                        records = [{"step": step, "val/dice": v, "test/dice": t, "train/loss": None, "time_s": 0.1 * step}
                                   for step, t, v in zip(steps, test, val)]
                        (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
                        test_summary, val_summary = summary(test), summary(val)
                        row = {"cell_id": cell_id, "dataset": "synth", "judge": judge,
                               "judge_accuracy": 0.9 if judge.startswith("oracle") else 0.7, "mining": mining,
                               "method": method, "beta": beta if beta is not None else float("nan"), "lr": 1e-4,
                               "seed": seed, **test_summary, "val_peak": val_summary["peak"],
                               "val_sustained": val_summary["sustained"], "val_final": val_summary["final"],
                               "steps": steps[-1], "wall_s": 1.0}
                        rows.append(row)
    rows = select_beta(rows)
    for row in rows:
        write_json(root / "cells" / row["cell_id"] / "done.json", row)
    if results_csv:
        columns = [c for c in rows[0] if selected_column or c != "selected"]
        with open(root / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    if stages:
        rng = np.random.default_rng(0)
        for j, judge in enumerate(judges):
            write_json(root / "stages" / f"scores-{j:04x}" / "audit.json",
                       {"judge": judge, "spearman": 0.8 - 0.3 * j, "pairwise_accuracy": 0.9 - 0.2 * j, "regret": 0.01 + 0.05 * j})
            for m, mining in enumerate(minings):
                stage = root / "stages" / f"pairs-{j}{m}"
                right = rng.lognormal(5.0, 1.0, size=200).astype(int) + 1
                wrong = rng.lognormal(3.5 + j, 0.8, size=60).astype(int) + 1
                write_json(stage / "pairs_audit.json", {"judge": judge, "mining": mining, "right_region": right.tolist(),
                                                        "wrong_region": wrong.tolist(), "truly_better_fraction": 200 / 260})
                if j * len(minings) + m < galleries:
                    write_gallery(stage / "gallery.npz", rng)
    return rows


def write_gallery(path: Path, rng: np.random.Generator, n: int = 4, size: int = 48) -> None:
    yy, xx = np.mgrid[:size, :size]
    truth, chosen, rejected, images = [], [], [], []
    for i in range(n):
        cy, cx = 24 + rng.integers(-6, 6), 24 + rng.integers(-6, 6)
        disk = lambda r, dy=0, dx=0: ((yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 <= r * r).astype(np.uint8)  # noqa: E731
        truth.append(disk(10))
        chosen.append(disk(9, 1, 0) if i % 3 else disk(6, 5, 5))  # every third pair: the judge chose the worse mask
        rejected.append(disk(6, 5, 5) if i % 3 else disk(9, 1, 0))
        images.append(disk(10) * 0.6 + rng.normal(0.2, 0.1, size=(size, size)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=np.array(images, dtype=np.float32), truth=np.array(truth), chosen=np.array(chosen),
             rejected=np.array(rejected), case_ids=np.array([f"case{i:02d}" for i in range(n)]))


def parse_md_table(markdown: str, heading_start: str) -> dict[str, list[str]]:
    """Rows (keyed by first cell) of the first table after the heading that starts with heading_start."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_start))
    table = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            table[cells[0]] = cells
    return table


def first_float(text: str) -> float:
    return float(re.match(r"[-+]?\d+\.\d+", text).group(0))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rows = fabricate_run(root)
    index = write_report(root)
    return root, rows, index


# --------------------------------------------------------------------------- full run


def test_index_is_self_contained_with_every_table_and_figure(full_run):
    root, rows, index = full_run
    assert index == root / "report" / "index.html"
    page = index.read_text()
    regimes = 2 * 2
    expected_figures = regimes + 1 + regimes + 1 + 2  # curves, grid, β grids, |D| histogram, 2 galleries
    assert page.count("data:image/png;base64,") >= expected_figures
    for section in ("<h2>Results</h2>", "<h2>Comparisons</h2>", "<h2>Judge audit</h2>", "<h2>Pairs</h2>", "<h2>Gallery</h2>"):
        assert section in page
    assert page.count("<table>") >= regimes + regimes + 1 + 1  # results, comparisons, audit, pairs
    assert "rn-dpo − dpo" in page and "rn-dpo − base" in page
    assert "<script" not in page and 'src="http' not in page and "<link" not in page
    pngs = sorted((root / "report").glob("*.png"))
    assert len(pngs) == expected_figures
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 150_000, png.name
    assert (root / "results_agg.csv").is_file() and (root / "comparisons.csv").is_file()
    assert (root / "report" / "beta_grid.csv").is_file()
    assert not list(root.rglob("*.tmp"))


def test_results_md_numbers_parse_back(full_run):
    root, rows, _ = full_run
    markdown = (root / "results.md").read_text()
    regime = "### synth · oracle+gaussian:0.1 · top-vs-rest"
    table = parse_md_table(markdown, regime)
    headers = ["method", "β", "peak", "sustained", "final", "drop", "n"]
    assert list(table)[0] == "method" and table["method"] == headers
    for method in ("rn-dpo", "dpo", "base"):
        chosen = [r for r in rows if r["method"] == method and r["judge"] == "oracle+gaussian:0.1"
                  and r["mining"] == "top-vs-rest" and r["selected"]]
        assert len(chosen) == 3
        for column in ("peak", "sustained", "final", "drop"):
            cell = table[method][headers.index(column)]
            assert first_float(cell) == pytest.approx(np.mean([r[column] for r in chosen]), abs=6e-4), (method, column)
            assert "±" in cell
        assert table[method][-1] == "3"
    # the β chosen on val: rn-dpo → 1 (although 0.1 is better on test), dpo → 0.1
    assert table["rn-dpo"][1] == "1" and table["dpo"][1] == "0.1" and table["base"][1] == "—"
    links = re.findall(r"\]\((report/[^)]+\.png)\)", markdown)
    assert links and all((root / link).is_file() for link in links)


def test_oracle_labeled_as_upper_bound_everywhere(full_run):
    root, rows, index = full_run
    markdown = (root / "results.md").read_text()
    table = parse_md_table(markdown, "### synth · agreement · all-pairs")
    assert ORACLE_LABEL in table and "oracle" not in table
    assert list(table)[-1] == ORACLE_LABEL  # the upper bound comes last
    page = index.read_text()
    assert page.count(f"<td>{ORACLE_LABEL}</td>") == 4  # one per regime
    assert "<td>oracle</td>" not in page
    text = format_results_table(rows)
    assert ORACLE_LABEL in text and not re.search(r"^oracle\s{2,}", text, re.M)
    with open(root / "results_agg.csv") as handle:
        agg = list(csv.DictReader(handle))
    assert {r["label"] for r in agg if r["method"] == "oracle"} == {ORACLE_LABEL}


def test_comparisons_csv_and_audit_tables(full_run):
    root, rows, index = full_run
    with open(root / "comparisons.csv") as handle:
        comps = list(csv.DictReader(handle))
    rn = [c for c in comps if c["comparison"] == "rn-dpo − dpo" and c["metric"] == "drop"]
    assert len(rn) == 4 and all(float(c["mean_diff"]) < 0 for c in rn)  # RN-DPO collapses less
    assert all(float(c["lo"]) <= float(c["mean_diff"]) <= float(c["hi"]) and c["n"] == "3" for c in rn)
    page = index.read_text()
    assert "pairwise_accuracy" in page and "<td>agreement</td>" in page and "0.700" in page  # audit row of agreement
    assert "truly better" in page


def test_format_results_table_text(full_run):
    _, rows, _ = full_run
    text = format_results_table(rows)
    assert "synth · agreement · top-vs-rest" in text
    line = next(l for l in text.splitlines() if l.startswith("rn-dpo "))
    assert "±" in line and line.rstrip().endswith("3")
    assert format_results_table([]) == "(no finished cells)"


def test_report_is_rewritable_and_reads_back(full_run):
    root, rows, _ = full_run
    assert len(read_results(root)) == len(rows)
    assert sum(r["selected"] for r in read_results(root)) == len(results_table(rows)) * 3


# --------------------------------------------------------------------------- partial runs


def test_partial_run_single_seed_no_stages_no_selected_column(tmp_path):
    rows = fabricate_run(tmp_path, judges=("agreement",), minings=("top-vs-rest",), seeds=(0,),
                         methods=("base", "dpo", "rn-dpo"), selected_column=False, stages=False)
    # one cell still running (no done.json, not in results.csv), one finished cell without its curve
    running = tmp_path / "cells" / "c999"
    append_jsonl(running / "metrics.jsonl", {"step": 0, "test/dice": 0.5, "val/dice": 0.5})
    (tmp_path / "cells" / rows[1]["cell_id"] / "metrics.jsonl").unlink()
    index = write_report(tmp_path)
    page = index.read_text()
    for phrase in ("no judge audit", "no gallery", "c999", "single seed", "selection recomputed", "no metrics.jsonl"):
        assert phrase in page, phrase
    assert page.count("data:image/png;base64,") >= 2  # a curve figure and a β figure
    table = parse_md_table((tmp_path / "results.md").read_text(), "### synth · agreement · top-vs-rest")
    expected = [r for r in rows if r["method"] == "rn-dpo" and r["selected"]][0]
    assert first_float(table["rn-dpo"][2]) == pytest.approx(expected["peak"], abs=6e-4)
    assert "±" not in table["rn-dpo"][2] and table["rn-dpo"][-1] == "1"
    assert "n=1, no CI" in page


def test_run_without_results_csv_reads_done_json_and_missing_seeds(tmp_path):
    rows = fabricate_run(tmp_path, judges=("agreement",), minings=("all-pairs",), seeds=(0, 1),
                         methods=("dpo", "rn-dpo"), results_csv=False, galleries=0)
    # seed 1 of dpo not finished yet
    for row in rows:
        if row["method"] == "dpo" and row["seed"] == 1:
            (tmp_path / "cells" / row["cell_id"] / "done.json").unlink()
    page = write_report(tmp_path).read_text()
    assert "no results.csv" in page and "dpo has 1 of 2 seeds" in page and "no base rows" in page
    assert "no gallery" in page
    assert "rn-dpo − dpo" in page
    assert len(load_run(tmp_path).rows) == len(rows) - 2


def test_empty_run_folder_still_writes_a_page(tmp_path):
    write_yaml(tmp_path / "config.yaml", {"name": "fresh"})
    page = write_report(tmp_path).read_text()
    assert "No finished cells yet" in page
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results_agg.csv").is_file()
    assert format_results_table(read_results(tmp_path)) == "(no finished cells)"


def test_results_csv_without_required_column_is_a_clean_error(tmp_path):
    (tmp_path / "results.csv").write_text("cell_id,method,peak\nc0,dpo,0.5\n")
    with pytest.raises(RndpoError, match="lacks column"):
        write_report(tmp_path)


# --------------------------------------------------------------------------- CLI


def test_cli_report_prints_path_and_table(tmp_path, capsys):
    fabricate_run(tmp_path, judges=("agreement",), minings=("top-vs-rest",), seeds=(0, 1),
                  methods=("base", "rn-dpo", "oracle"), betas=(0.1,), stages=False)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "report" / "index.html") in out
    assert "rn-dpo" in out and ORACLE_LABEL in out


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "file"])
def test_cli_report_bad_folder_one_line_error(tmp_path, capsys, kind):
    target = tmp_path / "x"
    if kind == "empty-dir":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif kind == "file":
        target.write_text("not a folder")
    assert main(["report", str(target)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and str(target) in err
    assert not (target / "report").exists() if kind != "file" else True
