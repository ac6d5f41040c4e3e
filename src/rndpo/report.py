"""Tables, figures and a self-contained HTML report of a run folder.

:func:`write_report` reads what a run folder holds (see "Run folder and result files" in the team
contracts: ``results.csv``, ``cells/*/metrics.jsonl`` and ``done.json``, ``stages/*/audit.json``,
``stages/*/pairs_audit.json``, ``stages/*/gallery.npz``) and writes::

    RUN/report/index.html       one file: every table, every figure embedded as a base64 PNG
    RUN/report/*.png            the figures (learning curves, β grids, |D| histograms, galleries)
    RUN/report/beta_grid.csv    every β, mean ± std over seeds (val and test)
    RUN/results.md              the same tables in Markdown, with links to report/*.png
    RUN/results_agg.csv         the main table: per regime and method, the β chosen on val, mean/std/n
    RUN/comparisons.csv         paired (by seed) bootstrap differences, see :func:`rndpo.stats.comparisons`,
                                and for final Dice over seeds × test cases (:func:`rndpo.stats.case_comparisons`)

It works on whatever has finished: missing cells, one seed, no gallery or no audit are listed
under "Missing" in the report instead of failing. Figures use matplotlib's Agg canvas directly (no
pyplot, no global backend change) and are kept under ~150 KB each. Every file is written
atomically (:func:`rndpo.io.atomic_path`).

Conventions: a *regime* is one ``(dataset, judge, mining)``; numbers are test Dice curve summaries
(``peak``, ``sustained``, ``final``, ``drop``) of the β chosen per seed on validation sustained Dice
(:func:`rndpo.stats.select_beta`), mean ± sample std over seeds. ``oracle`` uses the pool's ground
truth, which a real user does not have: it is labeled as an upper bound everywhere.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rndpo.errors import RndpoError
from rndpo.io import atomic_path, read_json, read_jsonl
from rndpo.stats import (
    TEST_METRICS,
    aggregate,
    case_comparisons,
    comparisons,
    method_sort_key,
    select_beta,
    selected_rows,
    to_bool,
    to_float,
)

__all__ = [
    "ORACLE_LABEL",
    "RunContents",
    "method_label",
    "check_run_dir",
    "read_results",
    "load_run",
    "results_table",
    "format_results_table",
    "write_report",
]

#: How the oracle baseline is named in every table (it trains on the pool's ground truth).
ORACLE_LABEL = "oracle (upper bound, uses pool ground truth)"
_SHORT_LABELS = {"oracle": "oracle (upper bound)"}
_LABELS = {"oracle": ORACLE_LABEL}

_REGIME = ("dataset", "judge", "mining")
_REQUIRED = ("dataset", "judge", "mining", "method", "seed")
_STR_COLUMNS = {"cell_id", "dataset", "judge", "mining", "method"}
_INT_COLUMNS = {"seed", "steps"}
#: Columns aggregated into results_agg.csv (when present).
_AGG_METRICS = TEST_METRICS + ("auc", "val_peak", "val_sustained", "val_final", "judge_accuracy", "wall_s")
_MAX_PNG_BYTES = 150_000
_GALLERY_ROWS = 6
_FIGURE_PREFIXES = ("curves_", "beta_", "region_hist", "gallery_")


def method_label(method: str, short: bool = False) -> str:
    """Display name of a method: ``oracle`` → ``"oracle (upper bound, uses pool ground truth)"``
    (``short=True``: ``"oracle (upper bound)"``, for plot legends); other names unchanged."""
    return (_SHORT_LABELS if short else _LABELS).get(method, method)


# =============================================================================== reading


@dataclass
class RunContents:
    """Everything :func:`write_report` reads from a run folder (absent parts are empty)."""

    run_dir: Path
    rows: list[dict]
    """One typed row per finished cell (results.csv, plus done.json of cells not in it), with ``selected``."""
    curves: dict[str, list[dict]]
    """cell_id → metrics.jsonl records (only cells that have the file)."""
    audits: list[dict]
    """stages/*/audit.json flattened to one dict per judge: ``stage``, ``judge`` (label) and numeric fields."""
    pairs_audits: list[dict]
    """stages/*/pairs_audit.json, each with a ``stage`` key added."""
    galleries: list[tuple[str, dict[str, np.ndarray], dict]]
    """(stage name, gallery.npz arrays, that stage's pairs audit or {})."""
    notes: list[str] = field(default_factory=list)
    """What is missing or was recomputed, in words (shown under "Missing" in the report)."""
    per_case: dict[str, dict[str, float]] = field(default_factory=dict)
    """cell_id → {case_id: final test Dice} (``cells/*/test_per_case.csv``, where present)."""


def check_run_dir(run_dir: str | Path) -> Path:
    """Return ``run_dir`` as a Path if it looks like a run folder, else raise.

    A run folder is a directory holding at least one of ``results.csv``, ``cells/``, ``config.yaml``
    or ``stages/``.

    Raises:
        RndpoError: the folder does not exist, is a file, or holds none of the above.
    """
    path = Path(run_dir)
    if not path.exists():
        raise RndpoError(f"run folder not found: {path}")
    if not path.is_dir():
        raise RndpoError(f"not a run folder (a file, not a directory): {path}")
    if not any((path / name).exists() for name in ("results.csv", "cells", "config.yaml", "stages")):
        raise RndpoError(f"not an rndpo run folder: {path} has no results.csv, cells/, config.yaml or stages/")
    return path


def _typed(row: Mapping[str, Any]) -> dict:
    """A results row with typed values: names as str, seed/steps as int, selected as bool|None, rest float."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key is None:  # csv.DictReader: surplus fields of a malformed line
            continue
        if key in _STR_COLUMNS:
            out[key] = "" if value is None else str(value)
        elif key == "selected":
            out[key] = to_bool(value)
        elif key in _INT_COLUMNS:
            number = to_float(value)
            out[key] = int(number) if number == number and float(number).is_integer() else value
        elif isinstance(value, str) and value.strip() and to_float(value) != to_float(value):
            out[key] = value  # a non-numeric extra column stays text
        else:
            out[key] = to_float(value)
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in _REQUIRED if c not in columns]
        if missing:
            raise RndpoError(f"{path}: results.csv lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
        return [_typed(row) for row in reader]


def _load_rows(run_dir: Path, notes: list[str]) -> list[dict]:
    rows: list[dict] = []
    csv_path = run_dir / "results.csv"
    if csv_path.is_file():
        rows = _read_csv(csv_path)
    known = {row.get("cell_id") for row in rows}
    from_done = 0
    cells_dir = run_dir / "cells"
    unfinished = []
    if cells_dir.is_dir():
        for cell in sorted(p for p in cells_dir.iterdir() if p.is_dir()):
            if cell.name in known:
                continue
            done = cell / "done.json"
            if not done.is_file():
                unfinished.append(cell.name)
                continue
            try:
                record = read_json(done)
            except (OSError, ValueError) as error:
                notes.append(f"cell {cell.name}: done.json unreadable ({error}); left out")
                continue
            record = _typed({"cell_id": cell.name, **record})
            missing = [c for c in _REQUIRED if c not in record]
            if missing:
                notes.append(f"cell {cell.name}: done.json lacks {', '.join(missing)}; left out")
                continue
            rows.append(record)
            from_done += 1
    if not csv_path.is_file():
        notes.append(f"no results.csv: rows read from {from_done} cells/*/done.json" if from_done else "no results.csv and no finished cell (cells/*/done.json) yet")
    elif from_done:
        notes.append(f"{from_done} finished cell(s) not yet in results.csv were read from their done.json")
    if unfinished:
        shown = ", ".join(unfinished[:12]) + (f", … ({len(unfinished)} in all)" if len(unfinished) > 12 else "")
        notes.append(f"unfinished cells (no done.json), not in the tables: {shown}")
    if rows and (from_done or any(row.get("selected") is None for row in rows)):
        rows = select_beta(rows)
        notes.append("β selection recomputed from val_sustained (results.csv has no complete `selected` column)")
    return rows


def read_results(run_dir: str | Path) -> list[dict]:
    """Typed result rows of a run folder: ``results.csv`` plus ``done.json`` of finished cells not in it.

    Returns:
        One dict per finished cell (names as str, ``seed`` int, ``selected`` bool, metrics float with
        NaN for missing), with ``selected`` recomputed by :func:`rndpo.stats.select_beta` when the
        column is missing or incomplete.

    Raises:
        RndpoError: not a run folder, or results.csv lacks a required column.
    """
    return _load_rows(check_run_dir(run_dir), [])


def load_run(run_dir: str | Path) -> RunContents:
    """Read everything the report uses from a run folder; unreadable or absent parts become notes.

    Raises:
        RndpoError: not a run folder, or results.csv lacks a required column.
    """
    run_dir = check_run_dir(run_dir)
    notes: list[str] = []
    rows = _load_rows(run_dir, notes)
    curves: dict[str, list[dict]] = {}
    cells_dir = run_dir / "cells"
    for row in rows:
        cell_id = row.get("cell_id")
        if not cell_id:
            continue
        path = cells_dir / str(cell_id) / "metrics.jsonl"
        if not path.is_file():
            notes.append(f"cell {cell_id}: no metrics.jsonl (no learning curve)")
            continue
        try:
            curves[str(cell_id)] = read_jsonl(path)
        except (OSError, ValueError) as error:
            notes.append(f"cell {cell_id}: metrics.jsonl unreadable ({error})")
    per_case = _load_per_case(cells_dir, rows, notes)
    audits, pairs_audits, galleries = [], [], []
    stages = run_dir / "stages"
    stage_dirs = sorted(p for p in stages.iterdir() if p.is_dir()) if stages.is_dir() else []
    for stage in stage_dirs:
        for name, sink in (("audit.json", audits), ("pairs_audit.json", pairs_audits)):
            path = stage / name
            if path.is_file():
                try:
                    data = read_json(path)
                    if not isinstance(data, dict):
                        raise ValueError("not a JSON object")
                    if name == "audit.json":
                        sink.extend(_normalise_audits(stage.name, data))
                    else:
                        sink.append({**data, "stage": stage.name})
                except (OSError, ValueError) as error:
                    notes.append(f"{stage.name}/{name} unreadable ({error})")
    pairs_by_stage = {audit["stage"]: audit for audit in pairs_audits}
    for stage in stage_dirs:
        path = stage / "gallery.npz"
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            missing = [k for k in ("image", "truth", "chosen", "rejected") if k not in arrays]
            if missing:
                raise ValueError(f"lacks {', '.join(missing)}")
            galleries.append((stage.name, arrays, pairs_by_stage.get(stage.name, {})))
        except (OSError, ValueError) as error:
            notes.append(f"{stage.name}/gallery.npz unreadable ({error})")
    if not audits:
        notes.append("no judge audit (stages/scores-*/audit.json)")
    if not pairs_audits:
        notes.append("no pairs audit (stages/pairs-*/pairs_audit.json): no |D| histograms")
    if not galleries:
        notes.append("no gallery (stages/pairs-*/gallery.npz)")
    return RunContents(run_dir, rows, curves, audits, pairs_audits, galleries, notes, per_case)


def _load_per_case(cells_dir: Path, rows: list[dict], notes: list[str]) -> dict[str, dict[str, float]]:
    """Final per-case test Dice of the selected cells (the ones comparisons use)."""
    from rndpo.experiment import PER_CASE_FILE, read_per_case

    out: dict[str, dict[str, float]] = {}
    missing = 0
    for row in selected_rows(rows) if rows else []:
        cell_id = str(row.get("cell_id") or "")
        path = cells_dir / cell_id / PER_CASE_FILE
        if not cell_id or cell_id in out:
            continue
        if not path.is_file():
            missing += 1
            continue
        try:
            out[cell_id] = read_per_case(path)
        except (OSError, ValueError, KeyError) as error:
            notes.append(f"cell {cell_id}: {PER_CASE_FILE} unreadable ({error})")
    if missing:
        notes.append(f"{missing} selected cell(s) without {PER_CASE_FILE}: their comparisons have no per-case CI "
                     "(`rndpo run` on the same config writes it from the final weights)")
    return out


# =============================================================================== tables


def _regime_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return tuple(str(row.get(k, "")) for k in _REGIME)  # type: ignore[return-value]


def _regime_title(regime: Sequence[str]) -> str:
    return " · ".join(regime)


def _slug(regime: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(regime)).strip("-") or "regime"


def _fmt(value: Any, digits: int = 3) -> str:
    number = to_float(value)
    return "—" if not math.isfinite(number) else f"{number:.{digits}f}"


def _fmt_mean_std(mean: Any, std: Any, digits: int = 3) -> str:
    if not math.isfinite(to_float(mean)):
        return "—"
    if not math.isfinite(to_float(std)):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _beta_summary(betas: Iterable[Any]) -> str:
    counts = Counter(to_float(b) for b in betas)
    counts = Counter({b: c for b, c in counts.items() if math.isfinite(b)})
    if not counts:
        return ""
    if len(counts) == 1:
        return f"{next(iter(counts)):g}"
    return ", ".join(f"{beta:g}×{count}" for beta, count in sorted(counts.items()))


def _seed_summary(seeds: Iterable[Any]) -> str:
    values = sorted({s for s in seeds if s is not None and s == s}, key=lambda s: (str(type(s)), s))
    return " ".join(str(s) for s in values)


def results_table(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The main table: per regime and method, the β chosen on val, mean/std/n over seeds.

    Args:
        rows: result rows of all cells (every β); selection is applied with
            :func:`rndpo.stats.selected_rows`.

    Returns:
        Dicts sorted by regime then method order (``base`` first, ``oracle`` last): ``dataset, judge,
        mining, method, label`` (oracle labeled as upper bound), ``beta`` (chosen β, ``"0.1×2, 1×1"``
        when seeds differ, ``""`` without β), ``seeds``, ``n`` and ``<metric>_mean/_std/_n`` for
        peak, sustained, final, drop, auc, val_peak, val_sustained, val_final, judge_accuracy, wall_s.
    """
    chosen = selected_rows(rows)
    if not chosen:
        return []
    table = aggregate(chosen, by=_REGIME + ("method",), metrics=_AGG_METRICS)
    groups: dict[tuple, list[dict]] = {}
    for row in chosen:
        groups.setdefault(_regime_key(row) + (str(row["method"]),), []).append(row)
    out = []
    for record in table:
        key = _regime_key(record) + (str(record["method"]),)
        members = groups[key]
        out.append(
            {
                **{k: str(record[k]) for k in _REGIME},
                "method": str(record["method"]),
                "label": method_label(str(record["method"])),
                "beta": _beta_summary(m.get("beta") for m in members),
                "seeds": _seed_summary(m.get("seed") for m in members),
                **{k: v for k, v in record.items() if k not in _REGIME and k != "method"},
            }
        )
    out.sort(key=lambda r: (_regime_key(r), method_sort_key(r["method"])))
    return out


_MAIN_HEADERS = ["method", "β", "peak", "sustained", "final", "drop", "n"]


def _main_cells(record: Mapping[str, Any]) -> list[str]:
    return [
        record["label"],
        record["beta"] or "—",
        *(_fmt_mean_std(record[f"{m}_mean"], record[f"{m}_std"]) for m in TEST_METRICS),
        str(record["n"]),
    ]


def _by_regime(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], list]:
    out: dict[tuple[str, str, str], list] = {}
    for record in records:
        out.setdefault(_regime_key(record), []).append(record)
    return out


def format_results_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Plain-text main table (one block per regime) for the CLI to print after a run.

    Args:
        rows: result rows (every β), e.g. from :func:`read_results`.

    Returns:
        Aligned text: per regime a heading and the columns method, β, peak, sustained, final, drop
        (test Dice, mean ± std over seeds of the β chosen on val) and n (seeds). ``"(no finished
        cells)"`` when there is nothing to show.
    """
    table = results_table(rows)
    if not table:
        return "(no finished cells)"
    blocks = []
    for regime, records in _by_regime(table).items():
        lines = [_MAIN_HEADERS] + [_main_cells(r) for r in records]
        widths = [max(len(line[i]) for line in lines) for i in range(len(_MAIN_HEADERS))]
        text = [_regime_title(regime) + "  (test Dice; β chosen on val; mean ± std over seeds)"]
        for index, line in enumerate(lines):
            text.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
            if index == 0:
                text.append("  ".join("-" * w for w in widths))
        blocks.append("\n".join(text))
    return "\n\n".join(blocks)


def _comparison_tables(comps: list[dict]) -> dict[tuple, tuple[list[str], list[list[str]]]]:
    """Per regime: rows = comparisons, columns = metrics, cells "Δ [lo, hi] p=…" (* when CI excludes 0)."""
    out: dict[tuple, tuple[list[str], list[list[str]]]] = {}
    for regime, records in _by_regime(comps).items():
        metrics = list(dict.fromkeys(r["metric"] for r in records))
        per_comparison: dict[str, dict[str, dict]] = {}
        for record in records:
            per_comparison.setdefault(record["comparison"], {})[record["metric"]] = record
        headers = ["comparison", *metrics, "n"]
        body = []
        for name, by_metric in per_comparison.items():
            any_record = next(iter(by_metric.values()))
            label = name.replace(any_record["method_a"], method_label(any_record["method_a"], short=True), 1) if any_record["method_a"] == "oracle" else name
            body.append([label, *(_fmt_comparison(by_metric.get(m)) for m in metrics), str(any_record["n"])])
        out[regime] = (headers, body)
    return out


def _fmt_comparison(record: Mapping[str, Any] | None) -> str:
    if record is None or not math.isfinite(to_float(record["mean_diff"])):
        return "—"
    diff = f"{record['mean_diff']:+.3f}"
    lo, hi = to_float(record["lo"]), to_float(record["hi"])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{diff} (n=1, no CI)"
    star = "*" if lo > 0 or hi < 0 else ""
    p_value = to_float(record["p_value_two_sided"])
    p_text = "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"
    return f"{diff} [{lo:+.3f}, {hi:+.3f}] {p_text}{star}"


#: Judge-audit columns shown first, when present (the runner's ``spearman``/``regret`` or the
#: :func:`rndpo.judges.audit_judge` names); other numeric fields follow.
_AUDIT_COLUMNS = ("spearman", "spearman_within", "spearman_pooled", "pairwise_accuracy", "regret", "top1_regret",
                  "top1_dice", "best_dice", "mean_dice", "top1_hit_rate", "judge_tie_rate")


def _judge_name(judge: Any) -> str:
    """A judge label from a string or a judge summary dict (``{"judge": label, ...}`` / ``{"label": ...}``)."""
    if isinstance(judge, Mapping):
        judge = judge.get("label", judge.get("judge", "?"))
    return "?" if judge is None else str(judge)


def _normalise_audits(stage: str, data: Mapping[str, Any]) -> list[dict]:
    """One flat audit per judge: ``{"stage", "judge", <numeric fields>}`` (a ``{"judges": {label: audit}}``
    file gives one per label; a ``judge`` given as a dict is reduced to its label)."""
    if isinstance(data.get("judges"), Mapping):
        return [a for label, audit in data["judges"].items() if isinstance(audit, Mapping)
                for a in _normalise_audits(stage, {**audit, "judge": audit.get("judge", label)})]
    flat: dict[str, Any] = {"stage": stage, "judge": _judge_name(data.get("judge"))}
    for key, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    pairs = data.get("pairs")
    if isinstance(pairs, Mapping) and isinstance(pairs.get("fraction_correct"), (int, float)):
        flat["pairs_correct"] = pairs["fraction_correct"]
    return [flat]


def _audit_table(audits: list[dict]) -> tuple[list[str], list[list[str]]]:
    present = [c for c in _AUDIT_COLUMNS if any(c in a for a in audits)]
    extra = sorted({k for a in audits for k in a if k not in {"stage", "judge", *present}})
    columns = present + extra
    headers = ["judge", *columns, "stage"]

    def cell(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return _fmt(value)

    body = [[a["judge"], *(cell(a.get(k)) for k in columns), a["stage"]] for a in audits]
    return headers, body


def _pairs_table(pairs_audits: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["judge", "mining", "pairs", "truly better", "median |D| right", "median |D| wrong", "stage"]
    body = []
    for audit in pairs_audits:
        right = np.asarray(audit.get("right_region") or [], dtype=np.float64)
        wrong = np.asarray(audit.get("wrong_region") or [], dtype=np.float64)
        body.append(
            [
                _judge_name(audit.get("judge")),
                str(audit.get("mining", "?")),
                str(right.size + wrong.size),
                _fmt(audit.get("truly_better_fraction")),
                _fmt(np.median(right), 0) if right.size else "—",
                _fmt(np.median(wrong), 0) if wrong.size else "—",
                audit["stage"],
            ]
        )
    return headers, body


def _coverage_notes(rows: list[dict]) -> list[str]:
    """Seeds missing per (regime, method), relative to all seeds seen in the run."""
    all_seeds = {r.get("seed") for r in rows}
    notes = []
    seeds: dict[tuple, set] = {}
    regimes: dict[tuple, set] = {}
    for row in rows:
        seeds.setdefault(_regime_key(row) + (str(row["method"]),), set()).add(row.get("seed"))
        regimes.setdefault(_regime_key(row), set()).add(str(row["method"]))
    for key, present in sorted(seeds.items(), key=lambda kv: (kv[0][:3], method_sort_key(kv[0][3]))):
        if len(present) < len(all_seeds):
            lacking = _seed_summary(all_seeds - present)
            notes.append(f"{_regime_title(key[:3])}: {key[3]} has {len(present)} of {len(all_seeds)} seeds (missing seed {lacking})")
    if len(all_seeds) == 1 and rows:
        notes.append("a single seed: no standard deviations and no bootstrap intervals")
    for regime, methods in sorted(regimes.items()):
        if "base" not in methods:
            notes.append(f"{_regime_title(regime)}: no base rows, so no method − base comparisons")
    return notes


# =============================================================================== figures

#: (region-normalised colour, summed colour) per objective family: a dark and a light shade of one hue.
_FAMILY_COLORS = {
    "dpo": ("#08519c", "#6baed6"),
    "ipo": ("#d94801", "#fdae6b"),
    "rdpo": ("#006d2c", "#74c476"),
    "hinge": ("#54278f", "#9e9ac8"),
}
_BASELINE_STYLES = {
    "base": ("#7f7f7f", "-."),
    "pseudo-label": ("#8c564b", "-"),
    "entropy-min": ("#e377c2", "-"),
    "mean-teacher": ("#bcbd22", "-"),
    "oracle": ("#000000", ":"),
}


def _style(method: str) -> tuple[str, str]:
    """(color, linestyle): RN objectives solid and dark, summed objectives dashed in a light shade of the same hue."""
    family = method[3:] if method.startswith("rn-") else method
    if family in _FAMILY_COLORS:
        dark, light = _FAMILY_COLORS[family]
        return (dark, "-") if method.startswith("rn-") else (light, "--")
    if method in _BASELINE_STYLES:
        return _BASELINE_STYLES[method]
    palette = ["#17becf", "#d62728", "#aec7e8", "#98df8a"]
    return palette[sum(map(ord, method)) % len(palette)], "-"


def _margins(figure, left: float, right: float, bottom: float, top: float, wspace: float = 0.3, hspace: float = 0.5) -> None:
    """Fixed margins in inches (faster and steadier than tight_layout, which measures every tick label)."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                           wspace=wspace, hspace=hspace)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png_bytes(figure, max_bytes: int = _MAX_PNG_BYTES) -> bytes:
    """Render to PNG at dpi 100, lowering the dpi until the file is under ``max_bytes``."""
    data = b""
    for dpi in (100, 85, 72, 60, 50, 40):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        data = buffer.getvalue()
        if len(data) <= max_bytes:
            break
    return data


def _curve_series(cell_ids: Sequence[str], curves: Mapping[str, list[dict]], key: str = "test/dice"):
    """Mean, min and max of ``key`` over cells, per step (steps = union over cells)."""
    per_step: dict[float, list[float]] = {}
    for cell_id in cell_ids:
        for record in curves.get(cell_id, []):
            step, value = to_float(record.get("step")), to_float(record.get(key))
            if math.isfinite(step) and math.isfinite(value):
                per_step.setdefault(step, []).append(value)
    steps = np.array(sorted(per_step), dtype=np.float64)
    values = [np.asarray(per_step[s]) for s in steps]
    mean = np.array([v.mean() for v in values])
    low = np.array([v.min() for v in values])
    high = np.array([v.max() for v in values])
    return steps, mean, low, high


def _plot_regime_curves(ax, rows: list[dict], curves: Mapping[str, list[dict]], legend: bool = True) -> list[str]:
    """Test Dice vs step, one line per method (chosen β), mean over seeds, band = min–max.

    Returns the methods drawn. A single-evaluation curve (``base``) is drawn as a horizontal line.
    """
    by_method: dict[str, list[str]] = {}
    for row in rows:
        if row.get("cell_id") and str(row["cell_id"]) in curves:
            by_method.setdefault(str(row["method"]), []).append(str(row["cell_id"]))
    series = {m: _curve_series(ids, curves) for m, ids in by_method.items()}
    series = {m: s for m, s in series.items() if s[0].size}
    long_steps = [s[0] for s in series.values() if s[0].size > 1]
    x_range = (min(s[0] for s in long_steps), max(s[-1] for s in long_steps)) if long_steps else (0.0, 1.0)
    drawn = []
    for method in sorted(series, key=method_sort_key):
        steps, mean, low, high = series[method]
        color, linestyle = _style(method)
        label = f"{method_label(method, short=True)} (n={len(by_method[method])})"
        if steps.size == 1:
            xs = np.array(x_range)
            mean, low, high = np.repeat(mean, 2), np.repeat(low, 2), np.repeat(high, 2)
        else:
            xs = steps
        ax.plot(xs, mean, color=color, linestyle=linestyle, linewidth=1.6, label=label)
        ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
        drawn.append(method)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test Dice")
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes)
    elif legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return drawn


def _figure_curves(regime: Sequence[str], rows: list[dict], curves: Mapping[str, list[dict]]):
    figure = _new_figure(7.5, 3.6)
    ax = figure.add_subplot(1, 1, 1)
    _plot_regime_curves(ax, rows, curves)
    ax.set_title(_regime_title(regime) + "\nmean over seeds, band = min–max, β chosen on val", fontsize=9)
    _margins(figure, 0.7, 2.2, 0.5, 0.5)
    return figure


def _figure_curve_grid(regimes: dict[tuple, list[dict]], curves: Mapping[str, list[dict]]):
    count = len(regimes)
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    figure = _new_figure(3.6 * ncols, 2.7 * nrows + 0.5)
    handles: dict[str, Any] = {}
    for index, (regime, rows) in enumerate(regimes.items()):
        ax = figure.add_subplot(nrows, ncols, index + 1)
        _plot_regime_curves(ax, rows, curves, legend=False)
        ax.set_title(_regime_title(regime), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(7)
        ax.yaxis.label.set_size(7)
        for line in ax.get_lines():
            handles.setdefault(line.get_label().rsplit(" (n=", 1)[0], line)
    height = figure.get_size_inches()[1]
    figure.suptitle("test Dice vs step, all regimes (mean over seeds, band = min–max, β chosen on val)", fontsize=9,
                    y=1 - 0.08 / height, va="top")
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / height),
                      ncol=min(6, len(handles)), fontsize=7, frameon=False)
    _margins(figure, 0.55, 0.15, 0.45, 0.85, wspace=0.3, hspace=0.55)
    return figure


def _figure_beta(regime: Sequence[str], rows: list[dict]):
    """Sustained and peak Dice vs β per objective, test (solid) and val (dashed), mean ± std over seeds."""
    grid = [r for r in rows if math.isfinite(to_float(r.get("beta")))]
    if not grid:
        return None
    methods = sorted({str(r["method"]) for r in grid}, key=method_sort_key)
    base = [r for r in rows if r["method"] == "base"]
    figure = _new_figure(9.0, 3.3)
    for panel, metric in enumerate(("sustained", "peak")):
        ax = figure.add_subplot(1, 2, panel + 1)
        for method in methods:
            members = [r for r in grid if r["method"] == method]
            agg = aggregate(members, by=("beta",), metrics=(metric, f"val_{metric}"))
            agg.sort(key=lambda a: to_float(a["beta"]))
            betas = np.array([to_float(a["beta"]) for a in agg])
            color, _ = _style(method)
            for column, linestyle, marker in ((metric, "-", "o"), (f"val_{metric}", "--", "x")):
                mean = np.array([a[f"{column}_mean"] for a in agg])
                std = np.nan_to_num(np.array([a[f"{column}_std"] for a in agg]))
                if not np.isfinite(mean).any():
                    continue
                ax.errorbar(betas, mean, yerr=std, color=color, linestyle=linestyle, marker=marker, markersize=4,
                            linewidth=1.3, capsize=2, label=f"{method} ({'test' if column == metric else 'val'})")
            chosen = Counter(to_float(r["beta"]) for r in members if r.get("selected"))
            if chosen:
                beta_star = max(chosen, key=lambda b: (chosen[b], -b))
                at = [a for a in agg if to_float(a["beta"]) == beta_star]
                if at and math.isfinite(at[0][f"{metric}_mean"]):
                    ax.plot([beta_star], [at[0][f"{metric}_mean"]], marker="*", markersize=11, color=color,
                            markeredgecolor="black", markeredgewidth=0.5, linestyle="none")
        base_values = [to_float(r.get(metric)) for r in base if math.isfinite(to_float(r.get(metric)))]
        if base_values:
            ax.axhline(float(np.mean(base_values)), color="#7f7f7f", linestyle="-.", linewidth=1, label="base (test)")
        all_betas = sorted({to_float(r["beta"]) for r in grid})
        if len(all_betas) > 1 and all_betas[0] > 0:
            ax.set_xscale("log")
            ax.minorticks_off()
        if len(all_betas) <= 8:
            ax.set_xticks(all_betas)
            ax.set_xticklabels([f"{b:g}" for b in all_betas])
        ax.set_xlabel("β")
        ax.set_ylabel(f"{metric} Dice")
        ax.set_title(f"{metric} vs β", fontsize=9)
        ax.grid(True, alpha=0.3)
        if panel == 1:
            handles, labels = ax.get_legend_handles_labels()
            figure.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    figure.suptitle(_regime_title(regime) + "   (solid = test, dashed = val, ★ = β chosen on val)", fontsize=9)
    _margins(figure, 0.75, 1.75, 0.5, 0.5, wspace=0.3)
    return figure


def _figure_region_hist(pairs_audits: list[dict]):
    count = len(pairs_audits)
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    figure = _new_figure(3.6 * ncols, 2.6 * nrows)
    for index, audit in enumerate(pairs_audits):
        ax = figure.add_subplot(nrows, ncols, index + 1)
        right = np.asarray(audit.get("right_region") or [], dtype=np.float64)
        wrong = np.asarray(audit.get("wrong_region") or [], dtype=np.float64)
        both = np.concatenate([right, wrong])
        both = both[np.isfinite(both)]
        if both.size:
            low, high = max(1.0, both.min()), max(2.0, both.max())
            bins = np.logspace(math.log10(low), math.log10(high * 1.0001), 25)
            for values, color, name in ((right, "#2ca02c", "right"), (wrong, "#d62728", "wrong")):
                if values.size:
                    ax.hist(np.clip(values, low, None), bins=bins, histtype="step", linewidth=1.5, color=color,
                            label=f"{name} (n={values.size}, median {np.median(values):.0f})")
            ax.set_xscale("log")
            ax.legend(fontsize=6.5, loc="best", framealpha=0.85)
        else:
            ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
        fraction = to_float(audit.get("truly_better_fraction"))
        suffix = f" — {fraction:.0%} truly better" if math.isfinite(fraction) else ""
        ax.set_title(f"{_judge_name(audit.get('judge'))} / {audit.get('mining', '?')}{suffix}", fontsize=8)
        ax.set_xlabel("|D| (pixels, log)", fontsize=7)
        ax.set_ylabel("pairs", fontsize=7)
        ax.tick_params(labelsize=7)
    figure.suptitle("disagreement region |D| of pairs whose chosen mask is truly better (right) or not (wrong)", fontsize=9)
    _margins(figure, 0.5, 0.15, 0.45, 0.55, wspace=0.3, hspace=0.6)
    return figure


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean foreground Dice over the classes present in either mask (1.0 when both are empty)."""
    classes = [c for c in np.union1d(np.unique(pred), np.unique(truth)) if c != 0]
    if not classes:
        return 1.0
    scores = []
    for c in classes:
        p, t = pred == c, truth == c
        scores.append(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores))


def _as_2d(array: np.ndarray, is_image: bool) -> np.ndarray:
    """One gallery entry as (H, W): an image (C, H, W) → channel 0; a 3-D volume → its middle slice."""
    if is_image and array.ndim == 3 and array.shape[0] <= 4:
        array = array[0]
    while array.ndim > 2:
        array = array[array.shape[0] // 2]
    return array


def _figure_gallery(stage: str, arrays: Mapping[str, np.ndarray], audit: Mapping[str, Any]):
    from matplotlib.colors import ListedColormap

    n = min(_GALLERY_ROWS, len(arrays["image"]))
    if n == 0:
        return None
    figure = _new_figure(7.5, 1.6 * n + 0.5)
    mask_cmap = ListedColormap(["#00000000", "#ffd700", "#00bfff", "#ff69b4", "#7fff00", "#ff4500"])
    d_cmap = ListedColormap(["#00000000", "#2ca02c", "#d62728", "#ffd700"])
    case_ids = arrays.get("case_ids")
    for row in range(n):
        image = _as_2d(np.asarray(arrays["image"][row], dtype=np.float64), True)
        truth = _as_2d(np.asarray(arrays["truth"][row]), False).astype(np.int64)
        chosen = _as_2d(np.asarray(arrays["chosen"][row]), False).astype(np.int64)
        rejected = _as_2d(np.asarray(arrays["rejected"][row]), False).astype(np.int64)
        span = np.ptp(image) if image.size else 0.0
        image = (image - image.min()) / span if span > 0 else np.zeros_like(image)
        dice_chosen, dice_rejected = _dice(chosen, truth), _dice(rejected, truth)
        region = chosen != rejected
        # D coloured by which mask agrees with the truth there: green = chosen, red = rejected, yellow = neither
        d_map = np.zeros(region.shape, dtype=np.int64)
        d_map[region & (chosen == truth)] = 1
        d_map[region & (rejected == truth)] = 2
        d_map[region & (chosen != truth) & (rejected != truth)] = 3
        right = dice_chosen > dice_rejected
        verdict = "judge right" if right else ("tie" if dice_chosen == dice_rejected else "judge WRONG")
        case = f"{case_ids[row]}" if case_ids is not None and row < len(case_ids) else f"#{row}"
        panels = (
            ("image " + case, None, None),
            ("ground truth", truth, mask_cmap),
            (f"chosen (Dice {dice_chosen:.2f})", chosen, mask_cmap),
            (f"rejected (Dice {dice_rejected:.2f})", rejected, mask_cmap),
            (f"|D|={int(region.sum())}: {verdict}", d_map, d_cmap),
        )
        for col, (title, overlay, cmap) in enumerate(panels):
            ax = figure.add_subplot(n, 5, row * 5 + col + 1)
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if overlay is not None:
                ax.imshow(overlay, cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=0.55, interpolation="nearest")
            ax.set_title(title, fontsize=6.5, color=("#d62728" if col == 4 and verdict == "judge WRONG" else "black"))
            ax.set_xticks([])
            ax.set_yticks([])
    judge = _judge_name(audit.get("judge"))
    mining = audit.get("mining", "")
    figure.suptitle(f"gallery {stage}: judge {judge} {mining}  (D: green = chosen right, red = rejected right)", fontsize=8)
    height = 1.6 * n + 0.5
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / height, wspace=0.05, hspace=0.3)
    return figure


# =============================================================================== writing


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        tmp.chmod(0o644)  # the temporary file is created 0600; a report is meant to be read by others


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def _write_csv(path: Path, records: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_value(v) for k, v in record.items()})
    _write_text(path, buffer.getvalue())


def _html_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _md_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(r) for r in body)])


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
h3{font-size:1.0em;margin-top:1.5em}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.note{color:#555;font-size:0.9em}.missing li{color:#8a4b00}
"""


@dataclass
class _Figure:
    name: str
    caption: str
    png: bytes

    def html(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        return f'<figure><img alt="{html.escape(self.caption)}" src="data:image/png;base64,{data}"><figcaption class="note">{html.escape(self.caption)}</figcaption></figure>'

    def markdown(self) -> str:
        return f"![{self.caption}](report/{self.name})"


def write_report(run_dir: str | Path) -> Path:
    """Write the report of a run folder (tables, figures, HTML, Markdown, CSV); return ``report/index.html``.

    Works on partial runs: absent cells, seeds, audits or galleries are listed under "Missing".

    Args:
        run_dir: the run folder (holding results.csv, cells/, stages/, config.yaml).

    Returns:
        Path of ``RUN/report/index.html``.

    Raises:
        RndpoError: not a run folder, or results.csv lacks a required column.
    """
    run = load_run(run_dir)
    run_dir = run.run_dir
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = run.rows
    notes = list(run.notes)
    if rows:
        notes += _coverage_notes(rows)

    table = results_table(rows)
    # stable sort: keeps the comparison order within a regime; the per-case CIs of final Dice come last
    comps = sorted(comparisons(rows) + case_comparisons(rows, run.per_case), key=_regime_key)
    chosen = selected_rows(rows) if rows else []
    regimes_all = _by_regime(sorted(rows, key=_regime_key))
    regimes_chosen = _by_regime(sorted(chosen, key=_regime_key))
    table_by_regime = _by_regime(table)
    comp_tables = _comparison_tables(comps)

    figures: list[_Figure] = []
    written: set[str] = set()

    def add_figure(figure, name: str, caption: str) -> _Figure | None:
        if figure is None:
            return None
        item = _Figure(name, caption, _png_bytes(figure))
        _write_bytes(report_dir / name, item.png)
        written.add(name)
        figures.append(item)
        return item

    curve_figs: dict[tuple, _Figure | None] = {}
    beta_figs: dict[tuple, _Figure | None] = {}
    for regime in regimes_all:
        regime_rows = regimes_chosen.get(regime, [])
        has_curves = any(str(r.get("cell_id")) in run.curves for r in regime_rows)
        curve_figs[regime] = add_figure(
            _figure_curves(regime, regime_rows, run.curves) if has_curves else None,
            f"curves_{_slug(regime)}.png",
            f"Test Dice vs fine-tuning step, {_regime_title(regime)}: one line per method (β chosen on val per seed), mean over seeds, band = min–max.",
        )
        if not has_curves:
            notes.append(f"{_regime_title(regime)}: no learning curves (metrics.jsonl) for the selected cells")
        beta_figs[regime] = add_figure(
            _figure_beta(regime, regimes_all[regime]),
            f"beta_{_slug(regime)}.png",
            f"β grid, {_regime_title(regime)}: sustained and peak Dice vs β per objective, test (solid) and val (dashed), mean ± std over seeds; ★ = β most often chosen on val.",
        )
    with_curves = {r: regimes_chosen.get(r, []) for r, fig in curve_figs.items() if fig is not None}
    grid_fig = add_figure(
        _figure_curve_grid(with_curves, run.curves) if len(with_curves) > 1 else None,
        "curves_all.png",
        "Test Dice vs step for every regime (mean over seeds, band = min–max).",
    )
    hist_fig = add_figure(
        _figure_region_hist(run.pairs_audits) if run.pairs_audits else None,
        "region_hist.png",
        "|D| (log scale) of mined pairs whose chosen mask is truly better (right) or not (wrong), per judge and mining.",
    )
    gallery_figs = []
    for stage, arrays, audit in run.galleries:
        fig = add_figure(
            _figure_gallery(stage, arrays, audit),
            f"gallery_{_slug([stage])}.png",
            f"Pairs of {stage} (judge {_judge_name(audit.get('judge'))}): image, ground truth, chosen, rejected, disagreement region D.",
        )
        if fig is not None:
            gallery_figs.append(fig)

    for stale in report_dir.glob("*.png"):
        if stale.name.startswith(_FIGURE_PREFIXES) and stale.name not in written:
            stale.unlink()

    # ---- CSV outputs
    _write_csv(run_dir / "results_agg.csv", table)
    _write_csv(run_dir / "comparisons.csv", comps)
    grid_rows = []
    if rows:
        grid_metrics = TEST_METRICS + ("val_peak", "val_sustained", "val_final", "selected")
        for record in aggregate(rows, by=_REGIME + ("method", "beta"), metrics=grid_metrics):
            mean, count = record.pop("selected_mean"), record.pop("selected_n")
            record.pop("selected_std")
            selected_count = int(round(mean * count)) if count else 0
            grid_rows.append({**record, "selected_count": selected_count})
        grid_rows.sort(key=lambda r: (_regime_key(r), method_sort_key(str(r["method"])), to_float(r["beta"])))
    _write_csv(report_dir / "beta_grid.csv", grid_rows)

    # ---- HTML and Markdown, section by section
    seeds = _seed_summary(r.get("seed") for r in rows)
    summary = (
        f"{len(rows)} finished cells, {len(regimes_all)} regimes (dataset · judge · mining), seeds: {seeds or 'none'}. "
        "Numbers are test Dice curve summaries (peak, sustained = mean of the last quarter of evaluations, final, "
        "drop = peak − final) of the β chosen per seed on validation sustained Dice; mean ± std over seeds, n = seeds. "
        f"{ORACLE_LABEL} is not a usable method: it trains on the pool's ground truth."
    )
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"rndpo report: {run_dir.name}"
    h: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(str(run_dir))} · generated {generated}</p>',
        f"<p>{html.escape(summary)}</p>",
    ]
    md: list[str] = [f"# {title}", "", f"Generated {generated} by `rndpo report`.", "", summary, ""]

    h.append("<h2>Missing</h2>")
    md += ["## Missing", ""]
    if notes:
        h.append('<ul class="missing">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
        md += [f"- {n}" for n in notes] + [""]
    else:
        h.append("<p>Nothing: every cell finished, with curves, audits and galleries.</p>")
        md += ["Nothing: every cell finished, with curves, audits and galleries.", ""]

    h.append("<h2>Results</h2>")
    md += ["## Results", ""]
    if not table:
        h.append("<p>No finished cells yet.</p>")
        md += ["No finished cells yet.", ""]
    for regime, records in table_by_regime.items():
        accuracy = [r["judge_accuracy_mean"] for r in records if math.isfinite(to_float(r.get("judge_accuracy_mean")))]
        heading = _regime_title(regime) + (f" (judge pairwise accuracy {np.mean(accuracy):.3f})" if accuracy else "")
        body = [_main_cells(r) for r in records]
        h += [f"<h3>{html.escape(heading)}</h3>", _html_table(_MAIN_HEADERS, body)]
        md += [f"### {heading}", "", _md_table(_MAIN_HEADERS, body), ""]
        for fig in (curve_figs.get(regime), beta_figs.get(regime)):
            if fig is not None:
                h.append(fig.html())
                md += [fig.markdown(), ""]
    if grid_fig is not None:
        h += ["<h2>Learning curves, all regimes</h2>", grid_fig.html()]
        md += ["## Learning curves, all regimes", "", grid_fig.markdown(), ""]

    explanation = (
        "Paired by seed (same base model, proposals and pairs), bootstrap over seeds (10,000 resamples): "
        "mean difference [95% percentile CI] and two-sided p; * = CI excludes 0. For drop, negative favours the first method. "
        "'final (cases)': final test Dice paired by seed and test case, two-level bootstrap (seeds, then cases "
        "within each seed), so its CI carries both training and test-set sampling variance; n = seeds."
    )
    h += ["<h2>Comparisons</h2>", f'<p class="note">{html.escape(explanation)}</p>']
    md += ["## Comparisons", "", explanation, ""]
    if not comp_tables:
        h.append("<p>No comparison possible (no pair of methods sharing seeds in a regime).</p>")
        md += ["No comparison possible (no pair of methods sharing seeds in a regime).", ""]
    for regime, (headers, body) in comp_tables.items():
        h += [f"<h3>{html.escape(_regime_title(regime))}</h3>", _html_table(headers, body)]
        md += [f"### {_regime_title(regime)}", "", _md_table(headers, body), ""]

    h.append("<h2>Judge audit</h2>")
    md += ["## Judge audit", ""]
    if run.audits:
        headers, body = _audit_table(run.audits)
        audit_note = "On the labeled validation split: Spearman correlation of judge score and true Dice, pairwise ordering accuracy, regret (true Dice lost by taking the judge's top proposal)."
        h += [f'<p class="note">{html.escape(audit_note)}</p>', _html_table(headers, body)]
        md += [audit_note, "", _md_table(headers, body), ""]
    else:
        h.append("<p>No judge audit in this run.</p>")
        md += ["No judge audit in this run.", ""]

    h.append("<h2>Pairs</h2>")
    md += ["## Pairs", ""]
    if run.pairs_audits:
        headers, body = _pairs_table(run.pairs_audits)
        h.append(_html_table(headers, body))
        md += [_md_table(headers, body), ""]
    if hist_fig is not None:
        h.append(hist_fig.html())
        md += [hist_fig.markdown(), ""]
    if not run.pairs_audits:
        h.append("<p>No pairs audit in this run.</p>")
        md += ["No pairs audit in this run.", ""]

    h.append("<h2>Gallery</h2>")
    md += ["## Gallery", ""]
    for fig in gallery_figs:
        h.append(fig.html())
        md += [fig.markdown(), ""]
    if not gallery_figs:
        h.append("<p>No gallery in this run.</p>")
        md += ["No gallery in this run.", ""]

    files_note = "Also written: results.md, results_agg.csv, comparisons.csv, report/beta_grid.csv and the PNG files beside this page."
    h += [f'<p class="note">{html.escape(files_note)}</p>', "</body></html>"]
    md += ["Also written: `results_agg.csv`, `comparisons.csv`, `report/beta_grid.csv`, `report/index.html`.", ""]

    index = report_dir / "index.html"
    _write_text(index, "\n".join(h) + "\n")
    _write_text(run_dir / "results.md", "\n".join(md))
    return index
