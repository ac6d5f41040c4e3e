"""The in-memory segmentation data set every stage works on: :class:`SegDataset`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from rndpo.errors import DataError

__all__ = ["SegDataset"]


@dataclass
class SegDataset:
    """Images and (optional) label maps at training size, with one id and one group per case.

    Attributes:
        images: ``(N, C_in, *spatial)`` float32, intensity-normalised (z-score per image and channel).
        masks: ``(N, *spatial)`` uint8 label maps with values in ``[0, num_classes)``; ``None`` for an
            unlabeled data set.
        case_ids: one unique id per case, in the order of ``images``.
        groups: grouping key per case (patient / examination); the case id itself when there is none.
            :func:`rndpo.data.make_splits` never puts one group in two splits.
        num_classes: number of classes including background (binary → 2).
        spatial_dims: 2 (images) or 3 (volumes).
        meta: description of the data: ``source``, ``format``, ``size``, ``resize_mode``,
            ``normalisation``, ``label_names`` (index → name), ``channel_names`` and the per-case
            entries below, which :meth:`subset` keeps aligned with ``case_ids``:

            - ``meta["cases"]``: dict of per-case lists: ``original_size`` (spatial shape before
              resizing, array order), ``image_files``, ``mask_file``, ``scale`` and ``pad`` (how the
              case was brought to training size, see :func:`rndpo.data.preprocess.to_training_size`).
            - ``meta["metadata"]``: dict column → per-case list of strings (``metadata.csv`` columns,
              e.g. ``patient_case``), used for grouping by :class:`rndpo.config.SplitConfig.group_column`.

    Raises:
        DataError: when the arrays, ids and groups do not fit together (shapes, lengths, duplicate ids).
    """

    images: np.ndarray
    masks: np.ndarray | None
    case_ids: list[str]
    groups: list[str]
    num_classes: int
    spatial_dims: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.case_ids = [str(c) for c in self.case_ids]
        self.groups = [str(g) for g in self.groups]
        if self.spatial_dims not in (2, 3):
            raise DataError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if not isinstance(self.images, np.ndarray) or self.images.ndim != 2 + self.spatial_dims:
            shape = getattr(self.images, "shape", None)
            raise DataError(f"images must be an array of shape (N, C, *spatial) with {self.spatial_dims} spatial dims, got shape {shape}")
        n = self.images.shape[0]
        if len(self.case_ids) != n:
            raise DataError(f"{len(self.case_ids)} case ids for {n} images")
        if len(self.groups) != n:
            raise DataError(f"{len(self.groups)} groups for {n} images")
        if len(set(self.case_ids)) != n:
            seen: set[str] = set()
            dupes = sorted({c for c in self.case_ids if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
            raise DataError(f"duplicate case ids: {', '.join(dupes[:5])}")
        if self.num_classes < 2:
            raise DataError(f"num_classes must be >= 2 (background included), got {self.num_classes}")
        if self.masks is not None:
            if self.masks.shape != (n, *self.images.shape[2:]):
                raise DataError(f"masks have shape {self.masks.shape}, expected {(n, *self.images.shape[2:])} to match images {self.images.shape}")
            if self.masks.size and int(self.masks.max()) >= self.num_classes:
                raise DataError(f"masks hold label {int(self.masks.max())}, outside [0, {self.num_classes}) (num_classes={self.num_classes})")

    # -- views ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        """Number of input channels ``C_in``."""
        return int(self.images.shape[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial shape at training size, e.g. ``(128, 128)``."""
        return tuple(int(s) for s in self.images.shape[2:])

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def index_of(self, case_ids: Iterable[str]) -> np.ndarray:
        """Positions of ``case_ids`` (in the given order). Raises DataError naming unknown ids."""
        lookup = {c: i for i, c in enumerate(self.case_ids)}
        wanted = [str(c) for c in case_ids]
        missing = [c for c in wanted if c not in lookup]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise DataError(f"case ids not in the data set: {', '.join(missing[:5])}{more}")
        return np.asarray([lookup[c] for c in wanted], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "SegDataset":
        """The cases at ``indices`` (int positions or a boolean mask), in that order, as a new data set.

        Arrays are copied (a subset never aliases its parent); ``meta`` per-case lists follow.
        """
        index = np.asarray(indices)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise DataError(f"boolean subset mask has shape {index.shape}, expected ({len(self)},)")
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False).reshape(-1)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise DataError(f"subset index out of range for a data set of {len(self)} cases")
        meta = dict(self.meta)
        for key in ("cases", "metadata"):
            if isinstance(self.meta.get(key), dict):
                meta[key] = {name: [values[i] for i in index] for name, values in self.meta[key].items()}
        return SegDataset(
            images=self.images[index],
            masks=None if self.masks is None else self.masks[index],
            case_ids=[self.case_ids[i] for i in index],
            groups=[self.groups[i] for i in index],
            num_classes=self.num_classes,
            spatial_dims=self.spatial_dims,
            meta=meta,
        )

    def select(self, case_ids: Iterable[str]) -> "SegDataset":
        """The cases named by ``case_ids`` (e.g. ``splits.labeled``), in that order."""
        return self.subset(self.index_of(case_ids))

    def summary(self) -> dict[str, Any]:
        """Counts and ranges for display (``rndpo data-info``)."""
        sizes = self.meta.get("cases", {}).get("original_size") or []
        if sizes:
            arr = np.asarray(sizes)
            size_min, size_max = tuple(int(v) for v in arr.min(axis=0)), tuple(int(v) for v in arr.max(axis=0))
        else:
            size_min = size_max = self.spatial_shape
        return {
            "source": self.meta.get("source"),
            "format": self.meta.get("format"),
            "cases": len(self),
            "channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
            "training_size": self.spatial_shape,
            "num_classes": self.num_classes,
            "label_names": self.meta.get("label_names"),
            "original_size_min": size_min,
            "original_size_max": size_max,
            "groups": len(set(self.groups)),
            "group_column": self.meta.get("group_column"),
            "labeled": self.masks is not None,
        }
