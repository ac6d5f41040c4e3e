"""Aggregation over seeds, β selection on validation, and paired bootstrap comparisons.

Pure functions on lists of result rows (one ``dict`` per cell, the columns of ``results.csv``:
``dataset, judge, mining, method, beta, lr, seed, peak, final, sustained, drop, auc, val_peak,
val_sustained, val_final, selected, ...``) and on arrays. Values may be numbers or the strings a
CSV reader returns (``""`` and ``None`` read as missing, i.e. NaN); nothing here reads files.

Statistical conventions:

- A *regime* is one ``(dataset, judge, mining)``; a *cell* is one row.
- Seeds are the unit of replication. Cells of the same ``(dataset, judge, mining, seed)`` share the
  base model, the proposals and the pairs, so two methods are compared **paired by seed**.
- For methods with a β grid, one β per ``(dataset, judge, mining, method, seed)`` is chosen on the
  validation split (:func:`select_beta`, best ``val_sustained``); test columns are never read for
  that choice, and only the chosen rows enter the tables and comparisons.
- Differences are ``a − b`` (e.g. RN-DPO − DPO). For ``drop`` (peak − final) lower is better, so a
  negative difference favours ``a``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rndpo.config import BASELINES, OBJECTIVES

__all__ = [
    "TEST_METRICS",
    "METHOD_ORDER",
    "RN_PAIRS",
    "to_float",
    "to_bool",
    "method_sort_key",
    "aggregate",
    "paired_bootstrap",
    "select_beta",
    "selected_rows",
    "comparisons",
    "hierarchical_bootstrap",
    "case_comparisons",
    "CASE_METRIC",
]

#: Test-curve summaries compared between methods (``drop``: lower is better).
TEST_METRICS: tuple[str, ...] = ("peak", "sustained", "final", "drop")

#: Presentation order of methods: ``base`` first, then the objectives (each summed form before its
#: region-normalised form), then the other baselines, ``oracle`` (the upper bound) last.
METHOD_ORDER: tuple[str, ...] = ("base",) + tuple(OBJECTIVES) + tuple(m for m in BASELINES if m != "base")

#: (region-normalised, summed) objective pairs compared head to head.
RN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (name, name[3:]) for name in OBJECTIVES if name.startswith("rn-") and name[3:] in OBJECTIVES
)

_SELECTION_KEYS: tuple[str, ...] = ("dataset", "judge", "mining", "method", "seed")
_REGIME_KEYS: tuple[str, ...] = ("dataset", "judge", "mining")


def to_float(value: Any) -> float:
    """A cell value as a float: numbers as they are, ``None`` / ``""`` / unparsable strings → NaN."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return math.nan


def to_bool(value: Any) -> bool | None:
    """A cell value as a bool: ``True/"true"/"1"/"yes"`` → True, ``False/"false"/"0"/"no"`` → False,
    missing (``None``, ``""``, NaN) → None."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return None if value != value else bool(value)
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "y", "t"}:
        return True
    if text in {"false", "0", "no", "n", "f"}:
        return False
    return None


def method_sort_key(method: str) -> tuple[int, str]:
    """Sort key putting methods in :data:`METHOD_ORDER` (unknown methods after, alphabetically)."""
    try:
        return (METHOD_ORDER.index(method), method)
    except ValueError:
        return (len(METHOD_ORDER), method)


def _group_key(value: Any) -> Any:
    """Hashable, NaN-safe grouping key (NaN / None / "" all group together as None)."""
    if value is None:
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if stripped == "":
            return None
        number = to_float(stripped)
        return number if number == number else stripped
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
        return None if number != number else number
    return value


def aggregate(rows: Iterable[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Mean and standard deviation of ``metrics`` over the rows of each group (normally: over seeds).

    Args:
        rows: result rows (dicts); every row must have every key of ``by``; a missing or non-finite
            metric value is skipped for that metric only.
        by: grouping columns, e.g. ``("dataset", "judge", "mining", "method")``. NaN / empty values of
            a grouping column form one group.
        metrics: columns to summarise, e.g. ``("peak", "sustained")``.

    Returns:
        One dict per group, in order of first appearance: the ``by`` values (from the group's first
        row), ``n`` (rows in the group) and, per metric ``m``, ``m_mean``, ``m_std`` (sample standard
        deviation, ``ddof=1``; NaN when fewer than two finite values) and ``m_n`` (finite values).
        ``m_mean`` is NaN when the group has no finite value of ``m``.

    Raises:
        ValueError: ``by`` is empty or a row lacks a grouping column.
    """
    if not by:
        raise ValueError("aggregate needs at least one grouping column in `by`")
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for index, row in enumerate(rows):
        missing = [key for key in by if key not in row]
        if missing:
            raise ValueError(f"row {index} lacks grouping column(s) {missing}: {dict(row)}")
        groups.setdefault(tuple(_group_key(row[key]) for key in by), []).append(row)
    out = []
    for members in groups.values():
        record: dict[str, Any] = {key: members[0][key] for key in by}
        record["n"] = len(members)
        for metric in metrics:
            values = np.array([to_float(member.get(metric)) for member in members], dtype=np.float64)
            values = values[np.isfinite(values)]
            record[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            record[f"{metric}_std"] = float(values.std(ddof=1)) if values.size >= 2 else math.nan
            record[f"{metric}_n"] = int(values.size)
        out.append(record)
    return out


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of the mean difference ``mean(a − b)`` (pairs = seeds).

    The per-pair differences ``d = a − b`` are resampled with replacement ``n_boot`` times; the
    confidence interval is the percentile interval of the resampled means, and the two-sided
    p-value of "mean difference = 0" is ``min(1, 2·min(P*(mean ≤ 0), P*(mean ≥ 0)))`` over the
    bootstrap distribution, with the ``(count + 1) / (n_boot + 1)`` correction so it is never 0.
    With few pairs (the usual 3-5 seeds) the interval is narrow-biased: read it as descriptive.

    Args:
        a, b: metric per seed for the two methods, shape ``(n,)``, aligned (``a[i]`` and ``b[i]`` come
            from the same seed). Pairs where either value is not finite are dropped.
        n_boot: bootstrap resamples (> 0).
        ci: confidence level in (0, 1).
        seed: seed of the resampling generator (same inputs and seed → same output).

    Returns:
        ``{"mean_diff", "lo", "hi", "p_value_two_sided", "n"}``: ``n`` is the number of finite pairs.
        ``n == 1``: the difference, with NaN ``lo``/``hi``/p-value; ``n == 0``: all NaN.

    Raises:
        ValueError: ``a`` and ``b`` are not 1-D of the same length, ``n_boot < 1`` or ``ci`` outside (0, 1).
    """
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    if a_arr.ndim != 1 or b_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must be 1-D and of equal length (paired by seed), got {a_arr.shape} and {b_arr.shape}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    diffs = a_arr - b_arr
    diffs = diffs[np.isfinite(diffs)]
    n = int(diffs.size)
    result = {"mean_diff": math.nan, "lo": math.nan, "hi": math.nan, "p_value_two_sided": math.nan, "n": n}
    if n == 0:
        return result
    result["mean_diff"] = float(diffs.mean())
    if n == 1:
        return result
    rng = np.random.default_rng(seed)
    n_boot = int(n_boot)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 4_000_000 // n)  # bounds the (chunk, n) index array
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = diffs[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    result.update(_percentile_interval(means, ci))
    return result


def _selection_order(row: Mapping[str, Any]) -> tuple:
    """Sort key of the β choice: finite val_sustained first, highest first; ties → smaller β, smaller lr.

    Reads only validation columns and hyper-parameters, never a test column.
    """
    val = to_float(row.get("val_sustained"))
    beta = to_float(row.get("beta"))
    lr = to_float(row.get("lr"))
    finite = val == val and math.isfinite(val)
    return (
        0 if finite else 1,
        -val if finite else 0.0,
        beta if beta == beta else math.inf,
        lr if lr == lr else math.inf,
        str(row.get("cell_id", "")),
    )


def select_beta(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Mark, per ``(dataset, judge, mining, method, seed)``, the row chosen on validation.

    The chosen row has the highest ``val_sustained`` (sustained validation Dice); ties go to the
    smaller ``beta``, then the smaller ``lr``, then the smaller ``cell_id``. Rows with a missing
    ``val_sustained`` are chosen only when no row of the group has one. A group of one row (a
    baseline, ``base``) selects that row. Only ``dataset, judge, mining, method, seed, beta, lr,
    cell_id, val_sustained`` are read: the test columns play no part.

    Args:
        rows: result rows; each needs ``dataset, judge, mining, method, seed``.

    Returns:
        Copies of the rows, in the input order, each with ``selected`` set to ``True`` or ``False``.

    Raises:
        ValueError: a row lacks one of the grouping columns.
    """
    copies = [dict(row) for row in rows]
    best: dict[tuple, int] = {}
    for index, row in enumerate(copies):
        missing = [key for key in _SELECTION_KEYS if key not in row]
        if missing:
            raise ValueError(f"row {index} lacks column(s) {missing} needed to select beta: {row}")
        key = tuple(_group_key(row[k]) for k in _SELECTION_KEYS)
        if key not in best or _selection_order(row) < _selection_order(copies[best[key]]):
            best[key] = index
    chosen = set(best.values())
    for index, row in enumerate(copies):
        row["selected"] = index in chosen
    return copies


def _percentile_interval(means: np.ndarray, ci: float) -> dict[str, float]:
    """Percentile interval and two-sided p-value (with the +1 correction) of bootstrap means."""
    n_boot = means.size
    alpha = 1.0 - ci
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    below = (np.count_nonzero(means <= 0.0) + 1) / (n_boot + 1)
    above = (np.count_nonzero(means >= 0.0) + 1) / (n_boot + 1)
    return {"lo": float(lo), "hi": float(hi), "p_value_two_sided": float(min(1.0, 2.0 * min(below, above)))}


def selected_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The rows that enter tables and comparisons: one per ``(dataset, judge, mining, method, seed)``.

    Uses the ``selected`` column when every row has a readable value; otherwise (column missing
    or partly empty) recomputes it with :func:`select_beta`. A group in which no row is marked
    selected, or several are, falls back to :func:`select_beta` within that group.
    """
    rows = [dict(row) for row in rows]
    flags = [to_bool(row.get("selected")) for row in rows]
    if not rows or any(flag is None for flag in flags):
        return [row for row in select_beta(rows) if row["selected"]]
    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(tuple(_group_key(row.get(k)) for k in _SELECTION_KEYS), []).append(index)
    out = []
    for members in groups.values():
        marked = [i for i in members if flags[i]]
        if len(marked) == 1:
            out.append({**rows[marked[0]], "selected": True})
        else:
            candidates = [rows[i] for i in (marked or members)]
            out.extend(row for row in select_beta(candidates) if row["selected"])
    return out


def _comparison_plan(rows: Iterable[Mapping[str, Any]]):
    """Yield ``(regime, method_a, method_b, kind, rows_a_by_seed, rows_b_by_seed)`` for the selected rows."""
    regimes: dict[tuple, dict[str, dict[Any, dict]]] = {}
    for row in selected_rows(rows):
        key = tuple(row[k] for k in _REGIME_KEYS)
        per_method = regimes.setdefault(key, {})
        per_method.setdefault(str(row["method"]), {})[_group_key(row["seed"])] = row
    for regime, per_method in regimes.items():
        methods = sorted(per_method, key=method_sort_key)
        plan = [(a, b, "region-normalised vs summed") for a, b in RN_PAIRS if a in per_method and b in per_method]
        if "base" in per_method:
            plan += [(m, "base", "vs base") for m in methods if m != "base"]
        for method_a, method_b, kind in plan:
            yield regime, method_a, method_b, kind, per_method[method_a], per_method[method_b]


def comparisons(
    rows: Iterable[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = TEST_METRICS,
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Paired (by seed) differences between methods, per regime ``(dataset, judge, mining)``.

    Compared, when both sides are present in a regime: each region-normalised objective against its
    summed form (:data:`RN_PAIRS`: ``rn-dpo − dpo``, ``rn-ipo − ipo``, ``rn-rdpo − rdpo``,
    ``rn-hinge − hinge``), then every method against ``base`` (``method − base``). Only the rows
    chosen on validation enter (:func:`selected_rows`), and only seeds present for both methods.

    Args:
        rows: result rows (all β; selection is applied here).
        metrics: columns compared (default :data:`TEST_METRICS`).
        n_boot, ci, seed: passed to :func:`paired_bootstrap`.

    Returns:
        One dict per (regime, comparison, metric), regimes in order of first appearance:
        ``dataset, judge, mining, comparison ("rn-dpo − dpo"), kind ("region-normalised vs summed" |
        "vs base"), method_a, method_b, metric, n, seeds ("0 1 2"), mean_a, mean_b, mean_diff, lo, hi,
        p_value_two_sided``.
    """
    out = []
    for regime, method_a, method_b, kind, rows_a, rows_b in _comparison_plan(rows):
        seeds = sorted(set(rows_a) & set(rows_b), key=lambda s: (s is None, s))
        for metric in metrics:
            values_a = np.array([to_float(rows_a[s].get(metric)) for s in seeds])
            values_b = np.array([to_float(rows_b[s].get(metric)) for s in seeds])
            stats = paired_bootstrap(values_a, values_b, n_boot=n_boot, ci=ci, seed=seed)
            finite = np.isfinite(values_a) & np.isfinite(values_b)
            out.append(
                {
                    **dict(zip(_REGIME_KEYS, regime)),
                    "comparison": f"{method_a} − {method_b}",
                    "kind": kind,
                    "method_a": method_a,
                    "method_b": method_b,
                    "metric": metric,
                    "n": stats["n"],
                    "seeds": " ".join(_format_seed(s) for s, ok in zip(seeds, finite) if ok),
                    "mean_a": float(values_a[finite].mean()) if finite.any() else math.nan,
                    "mean_b": float(values_b[finite].mean()) if finite.any() else math.nan,
                    "mean_diff": stats["mean_diff"],
                    "lo": stats["lo"],
                    "hi": stats["hi"],
                    "p_value_two_sided": stats["p_value_two_sided"],
                }
            )
    return out


def hierarchical_bootstrap(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Two-level paired bootstrap of a mean difference: seeds, then test cases within each seed.

    The estimate is the mean over seeds of the per-seed mean case difference ``mean(a_s − b_s)``.
    Each resample draws ``S`` seeds with replacement and, independently for each drawn seed, its
    ``n_s`` cases with replacement; the interval is the percentile interval of the resampled
    estimates and the p-value is computed as in :func:`paired_bootstrap`. The interval therefore
    carries both the training variance (seeds) and the test-set sampling variance (cases), which a
    bootstrap over 3 seed means alone cannot resolve. With one seed it is the case bootstrap.

    Args:
        a, b: per seed, the metric of every test case for the two methods: ``a[s]`` and ``b[s]`` of
            shape ``(n_s,)``, aligned by case. Cases where either value is not finite are dropped;
            seeds left without cases are dropped.
        n_boot, ci, seed: as in :func:`paired_bootstrap`.

    Returns:
        ``{"mean_diff", "lo", "hi", "p_value_two_sided", "n", "n_cases"}``: ``n`` seeds, ``n_cases``
        cases in all. No seed: all NaN.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, a seed's arrays differ in shape or are not 1-D,
            ``n_boot < 1`` or ``ci`` outside (0, 1).
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must hold the same seeds, got {len(a)} and {len(b)}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    diffs = []
    for index, (seed_a, seed_b) in enumerate(zip(a, b)):
        arr_a, arr_b = np.asarray(seed_a, dtype=np.float64), np.asarray(seed_b, dtype=np.float64)
        if arr_a.ndim != 1 or arr_a.shape != arr_b.shape:
            raise ValueError(f"seed {index}: a and b must be 1-D and aligned by case, got {arr_a.shape} and {arr_b.shape}")
        d = arr_a - arr_b
        d = d[np.isfinite(d)]
        if d.size:
            diffs.append(d)
    n_seeds = len(diffs)
    result = {"mean_diff": math.nan, "lo": math.nan, "hi": math.nan, "p_value_two_sided": math.nan,
              "n": n_seeds, "n_cases": int(sum(d.size for d in diffs))}
    if n_seeds == 0:
        return result
    result["mean_diff"] = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    n_boot = int(n_boot)
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # the seed filling slot j of resample r
    slot_means = np.empty((n_boot, n_seeds), dtype=np.float64)
    for j in range(n_seeds):
        for s, d in enumerate(diffs):
            replicates = np.flatnonzero(drawn[:, j] == s)  # each gets its own resample of seed s's cases
            chunk = max(1, 4_000_000 // d.size)
            for start in range(0, replicates.size, chunk):
                part = replicates[start:start + chunk]
                slot_means[part, j] = d[rng.integers(0, d.size, size=(part.size, d.size))].mean(axis=1)
    means = slot_means.mean(axis=1)
    result.update(_percentile_interval(means, ci))
    return result


#: The ``metric`` name of :func:`case_comparisons` rows (final test Dice, CI over seeds and cases).
CASE_METRIC = "final (cases)"


def case_comparisons(
    rows: Iterable[Mapping[str, Any]],
    per_case: Mapping[str, Mapping[str, float]],
    *,
    n_boot: int = 10_000,
    ci: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """The comparisons of :func:`comparisons` on final test Dice, with :func:`hierarchical_bootstrap` CIs.

    Args:
        rows: result rows (all β; selection is applied here).
        per_case: ``cell_id → {case_id: final test Dice}`` (a run folder's ``cells/*/test_per_case.csv``).
            A seed enters a comparison when both of its selected cells have per-case values; cases
            are matched by ``case_id``.
        n_boot, ci, seed: passed to :func:`hierarchical_bootstrap`.

    Returns:
        Dicts with the keys of :func:`comparisons` (``metric`` = :data:`CASE_METRIC`, ``n`` = seeds)
        plus ``n_cases``; ``mean_a`` / ``mean_b`` are means over seeds of the per-seed case means.
        Comparisons without a seed having per-case values on both sides are left out.
    """
    out = []
    for regime, method_a, method_b, kind, rows_a, rows_b in _comparison_plan(rows):
        seeds, values_a, values_b = [], [], []
        for s in sorted(set(rows_a) & set(rows_b), key=lambda s: (s is None, s)):
            cases_a = per_case.get(str(rows_a[s].get("cell_id")))
            cases_b = per_case.get(str(rows_b[s].get("cell_id")))
            if not cases_a or not cases_b:
                continue
            shared = sorted(set(cases_a) & set(cases_b))
            if not shared:
                continue
            seeds.append(s)
            values_a.append(np.array([to_float(cases_a[c]) for c in shared]))
            values_b.append(np.array([to_float(cases_b[c]) for c in shared]))
        if not seeds:
            continue
        stats = hierarchical_bootstrap(values_a, values_b, n_boot=n_boot, ci=ci, seed=seed)
        out.append(
            {
                **dict(zip(_REGIME_KEYS, regime)),
                "comparison": f"{method_a} − {method_b}",
                "kind": kind,
                "method_a": method_a,
                "method_b": method_b,
                "metric": CASE_METRIC,
                "n": stats["n"],
                "seeds": " ".join(_format_seed(s) for s in seeds),
                "mean_a": float(np.mean([np.nanmean(v) for v in values_a])),
                "mean_b": float(np.mean([np.nanmean(v) for v in values_b])),
                "mean_diff": stats["mean_diff"],
                "lo": stats["lo"],
                "hi": stats["hi"],
                "p_value_two_sided": stats["p_value_two_sided"],
                "n_cases": stats["n_cases"],
            }
        )
    return out


def _format_seed(seed: Any) -> str:
    if isinstance(seed, float) and seed.is_integer():
        return str(int(seed))
    return str(seed)
