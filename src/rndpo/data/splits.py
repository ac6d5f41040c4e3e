"""Grouped, seeded labeled / pool / val / test splits, saved as ``splits.json``.

Splitting works on groups (patients, examinations), never on single cases, so no group lands in
two splits. Groups are shuffled with ``numpy.random.default_rng(seed)``; the test split takes groups
in that order until it holds ``round(test * N)`` cases, then val takes ``round(val * N)``, then the
labeled split takes its budget from the rest (``labeled`` < 1: a fraction of the remaining cases;
≥ 1: a count), and the pool is what is left. A group that would overshoot a target is skipped in
favour of the next one that fits, so targets are met exactly when group sizes allow (a non-zero
target always gets at least one group).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rndpo.config import SplitConfig
from rndpo.data.dataset import SegDataset
from rndpo.errors import DataError
from rndpo.io import write_json

__all__ = ["Splits", "make_splits", "dataset_groups", "SPLIT_NAMES"]

SPLIT_NAMES = ("labeled", "pool", "val", "test")


@dataclass
class Splits:
    """Case ids per split. ``labeled``: supervised base training; ``pool``: unlabeled images for
    proposals and preference pairs; ``val``: labeled validation (judge audits, model selection);
    ``test``: evaluation only."""

    labeled: list[str]
    pool: list[str]
    val: list[str]
    test: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    """The SplitConfig (as JSON) plus the group column used."""

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name in SPLIT_NAMES:
            ids = [str(c) for c in getattr(self, name)]
            setattr(self, name, ids)
            for case in ids:
                if case in seen:
                    raise DataError(f"case {case} is in both the {seen[case]} and the {name} split")
                seen[case] = name

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLIT_NAMES}

    def all_ids(self) -> list[str]:
        return [c for name in SPLIT_NAMES for c in getattr(self, name)]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "counts": self.counts, **{name: list(getattr(self, name)) for name in SPLIT_NAMES}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``splits.json`` (config, counts, the four id lists) atomically; returns the path."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Splits":
        """Read a ``splits.json`` written by :meth:`save`. Raises DataError when it is malformed."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"splits file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"splits file {path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise DataError(f"splits file {path} must hold a JSON object")
        missing = [name for name in SPLIT_NAMES if not isinstance(data.get(name), list)]
        if missing:
            raise DataError(f"splits file {path} lacks the list(s) {', '.join(missing)}")
        return cls(**{name: data[name] for name in SPLIT_NAMES}, config=data.get("config") or {})

    def subsets(self, dataset: SegDataset) -> dict[str, SegDataset]:
        """``{"labeled": ..., "pool": ..., "val": ..., "test": ...}`` as data sets (``dataset.select``)."""
        self.check(dataset)
        return {name: dataset.select(getattr(self, name)) for name in SPLIT_NAMES}

    def check(self, dataset: SegDataset) -> None:
        """Raise DataError when a split names a case that ``dataset`` does not have."""
        known = set(dataset.case_ids)
        for name in SPLIT_NAMES:
            unknown = [c for c in getattr(self, name) if c not in known]
            if unknown:
                raise DataError(f"{name} split names case(s) not in the data set: {', '.join(unknown[:5])}")


def dataset_groups(dataset: SegDataset, group_column: str | None) -> tuple[list[str], str | None]:
    """Group key per case: ``dataset.groups`` when ``group_column`` is None, else that metadata column.

    Raises:
        DataError: the column is not in the data set's metadata (the message lists the columns there).
    """
    if group_column is None:
        return list(dataset.groups), dataset.meta.get("group_column")
    metadata = dataset.meta.get("metadata") or {}
    if group_column not in metadata:
        available = ", ".join(sorted(metadata)) or "none (no metadata.csv)"
        raise DataError(f"group column {group_column!r} is not in the metadata; available columns: {available}")
    values = metadata[group_column]
    return [v if str(v) != "" else f"case:{c}" for v, c in zip(values, dataset.case_ids)], group_column


def _take(order: list[str], sizes: dict[str, int], target: int) -> list[str]:
    """Groups from ``order`` whose sizes sum to ``target`` (skip those that overshoot)."""
    chosen, count = [], 0
    if target <= 0:
        return chosen
    for group in order:
        if count + sizes[group] <= target:
            chosen.append(group)
            count += sizes[group]
            if count == target:
                break
    if not chosen and order:
        chosen.append(order[0])
    return chosen


def make_splits(dataset: SegDataset, cfg: SplitConfig | None = None) -> Splits:
    """Split ``dataset`` into labeled / pool / val / test case ids, grouped and seeded.

    Args:
        dataset: the data set (its ``groups`` or ``meta["metadata"][cfg.group_column]`` group the cases).
        cfg: fractions, label budget, group column and seed.

    Returns:
        :class:`Splits` whose lists are disjoint, cover every case, keep each group in one split and
        are sorted in data set order.

    Raises:
        DataError: unknown group column, a label budget larger than the cases left, or a data set too
            small to give every non-empty split a case.
    """
    cfg = cfg or SplitConfig()
    groups, column = dataset_groups(dataset, cfg.group_column)
    n = len(dataset)
    if n == 0:
        raise DataError("cannot split an empty data set")
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    unique = sorted(sizes)
    rng = np.random.default_rng(cfg.seed)
    order = [unique[i] for i in rng.permutation(len(unique))]

    test_groups = _take(order, sizes, int(round(cfg.test * n)))
    rest = [g for g in order if g not in set(test_groups)]
    val_groups = _take(rest, sizes, int(round(cfg.val * n)))
    rest = [g for g in rest if g not in set(val_groups)]
    n_rest = sum(sizes[g] for g in rest)
    if n_rest == 0:
        raise DataError(f"no cases left for the labeled split after test and val ({n} cases, {len(unique)} groups)")
    if cfg.labeled < 1:
        budget = max(1, int(round(cfg.labeled * n_rest)))
    else:
        budget = int(cfg.labeled)
        if budget > n_rest:
            raise DataError(f"label budget of {budget} cases exceeds the {n_rest} cases left after test and val")
    labeled_groups = _take(rest, sizes, budget)
    assignment = {g: "test" for g in test_groups}
    assignment.update({g: "val" for g in val_groups})
    assignment.update({g: "labeled" for g in labeled_groups})
    lists: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for case, group in zip(dataset.case_ids, groups):
        lists[assignment.get(group, "pool")].append(case)
    config = dict(cfg.model_dump(mode="json"), group_column_used=column, n_groups=len(unique))
    return Splits(**lists, config=config)
