"""Segmentation metrics (Dice, IoU, HD95 through MONAI) and summaries of learning curves.

Conventions (per case and per foreground class; then averaged over the foreground classes 1..C-1,
so a binary case has one value per metric):

============================  ======  ======  =====================================
case                          Dice    IoU     HD95 (pixels)
============================  ======  ======  =====================================
prediction and truth empty    1       1       0
exactly one of them empty     0       0       image diagonal ``sqrt(sum(side**2))``
both non-empty                MONAI   MONAI   MONAI, 95th percentile of surface distances
============================  ======  ======  =====================================

MONAI itself returns Dice 1 / IoU 1 for two empty masks (``ignore_empty=False``) but NaN for HD95
whenever one of the masks is empty; the HD95 values for empty masks above are set here, so every
metric is finite and a missed lesion costs the largest distance the image allows. HD95 is in
pixel (voxel) units, spacing 1, symmetric (``directed=False``). In the multi-class case a class
absent from both prediction and truth counts as a perfect match (Dice 1, HD95 0), like the binary case.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "segmentation_metrics",
    "dice_per_case",
    "iou_per_case",
    "hd95_per_case",
    "empty_distance",
    "evaluate",
    "evaluate_labels",
    "curve_summary",
]


def empty_distance(spatial_shape: Sequence[int]) -> float:
    """HD95 assigned when exactly one mask is empty: the image diagonal ``sqrt(sum(side**2))`` in pixels."""
    return float(math.sqrt(sum(float(s) ** 2 for s in spatial_shape)))


def _as_label_tensor(labels: Any, name: str) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(labels).__name__}")
    if labels.is_floating_point():
        raise TypeError(f"{name} must hold integer labels, got dtype {labels.dtype}")
    return labels.long()


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, *spatial) int → (N, C, *spatial) float one-hot."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes)  # (N, *spatial, C)
    return one_hot.movedim(-1, 1).float()


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    *,
    hd95: bool = True,
    chunk_size: int = 64,
) -> dict[str, np.ndarray]:
    """Per-case Dice, IoU and HD95 of the foreground classes, through ``monai.metrics``.

    Args:
        pred: predicted label map ``(N, *spatial)`` (integers in ``[0, num_classes)``).
        target: ground-truth label map, same shape.
        num_classes: classes including background (binary: 2).
        hd95: also compute HD95 (the slowest of the three); else the ``hd95`` entry is NaN.
        chunk_size: cases per MONAI call (bounds the memory of the one-hot tensors).

    Returns:
        ``{"dice": (N,), "iou": (N,), "hd95": (N,)}`` float64 arrays (mean over foreground classes),
        plus ``"dice_per_class"``, ``"iou_per_class"``, ``"hd95_per_class"`` of shape ``(N, C-1)``.
        Conventions for empty masks: see the module docstring.

    Raises:
        ValueError: shapes differ, ``num_classes < 2`` or a label outside ``[0, num_classes)``.
    """
    from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_iou

    pred_t = _as_label_tensor(pred, "pred")
    target_t = _as_label_tensor(target, "target")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    if pred_t.shape != target_t.shape:
        raise ValueError(f"pred shape {tuple(pred_t.shape)} != target shape {tuple(target_t.shape)}")
    if pred_t.ndim < 2:
        raise ValueError(f"pred must be (N, *spatial), got shape {tuple(pred_t.shape)}")
    for name, labels in (("pred", pred_t), ("target", target_t)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must be in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
            )
    n_cases, n_fg = pred_t.shape[0], num_classes - 1
    spatial = tuple(pred_t.shape[1:])
    dice = np.zeros((n_cases, n_fg))
    iou = np.zeros((n_cases, n_fg))
    dist = np.full((n_cases, n_fg), np.nan)
    diagonal = empty_distance(spatial)
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    for start in range(0, n_cases, chunk_size):
        stop = min(start + chunk_size, n_cases)
        pred_oh = _one_hot(pred_t[start:stop], num_classes)
        target_oh = _one_hot(target_t[start:stop], num_classes)
        dice[start:stop] = dice_metric(pred_oh, target_oh).cpu().double().numpy()
        dice_metric.reset()
        iou[start:stop] = compute_iou(pred_oh, target_oh, include_background=False, ignore_empty=False).double().numpy()
        if hd95:
            pred_any = pred_oh[:, 1:].flatten(2).amax(-1).bool().numpy()  # (n, C-1)
            target_any = target_oh[:, 1:].flatten(2).amax(-1).bool().numpy()
            with warnings.catch_warnings():  # MONAI warns (and returns NaN) for empty masks: handled below
                warnings.simplefilter("ignore")
                values = compute_hausdorff_distance(
                    pred_oh, target_oh, include_background=False, percentile=95, directed=False
                )
            values = values.cpu().double().numpy()
            values = np.where(pred_any & target_any, values, np.where(pred_any | target_any, diagonal, 0.0))
            dist[start:stop] = values
    return {
        "dice": dice.mean(axis=1),
        "iou": iou.mean(axis=1),
        "hd95": dist.mean(axis=1),
        "dice_per_class": dice,
        "iou_per_class": iou,
        "hd95_per_class": dist,
    }


def dice_per_case(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice per case ``(N,)``, mean over foreground classes; see :func:`segmentation_metrics`."""
    return segmentation_metrics(pred, target, num_classes, hd95=False)["dice"]


def iou_per_case(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """IoU (Jaccard) per case ``(N,)``, mean over foreground classes; see :func:`segmentation_metrics`."""
    return segmentation_metrics(pred, target, num_classes, hd95=False)["iou"]


def hd95_per_case(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """HD95 per case ``(N,)`` in pixels, mean over foreground classes; see :func:`segmentation_metrics`."""
    return segmentation_metrics(pred, target, num_classes, hd95=True)["hd95"]


def evaluate_labels(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    case_ids: Sequence[str] | None = None,
    *,
    hd95: bool = True,
) -> dict[str, Any]:
    """Summary of predicted label maps against the truth (the pure part of :func:`evaluate`).

    Returns:
        ``{"dice", "iou", "hd95"}`` means over cases, ``"dice_std"``, ``"n_cases"``, ``"num_classes"``,
        ``"per_class"`` (mean per foreground class, lists of length C-1) and ``"per_case"``: one
        ``{"case_id", "dice", "iou", "hd95"}`` dict per case, in order.
    """
    values = segmentation_metrics(pred, target, num_classes, hd95=hd95)
    n_cases = len(values["dice"])
    if case_ids is None:
        case_ids = [str(i) for i in range(n_cases)]
    if len(case_ids) != n_cases:
        raise ValueError(f"case_ids has {len(case_ids)} entries for {n_cases} cases")

    def mean(array: np.ndarray) -> float:
        return float(array.mean()) if array.size else float("nan")

    return {
        "dice": mean(values["dice"]),
        "iou": mean(values["iou"]),
        "hd95": mean(values["hd95"]),
        "dice_std": float(values["dice"].std()) if n_cases else float("nan"),
        "n_cases": n_cases,
        "num_classes": int(num_classes),
        "per_class": {
            name: [mean(values[f"{name}_per_class"][:, c]) for c in range(num_classes - 1)]
            for name in ("dice", "iou", "hd95")
        },
        "per_case": [
            {
                "case_id": str(case_id),
                "dice": float(values["dice"][i]),
                "iou": float(values["iou"][i]),
                "hd95": float(values["hd95"][i]),
            }
            for i, case_id in enumerate(case_ids)
        ],
    }


def evaluate(model: torch.nn.Module, dataset: Any, batch_size: int = 32, *, hd95: bool = True) -> dict[str, Any]:
    """Predict ``dataset`` with ``model`` (eval mode, no dropout) and score it against its masks.

    Args:
        model: a network from :func:`rndpo.models.build_model`.
        dataset: a :class:`rndpo.data.SegDataset` (``images``, ``masks``, ``case_ids``, ``num_classes``).
        batch_size: images per forward pass.
        hd95: also compute HD95.

    Returns:
        The dict of :func:`evaluate_labels` (means, std, per class, per case).

    Raises:
        ValueError: the dataset has no masks.
    """
    from rndpo.models import logits_to_labels, predict_logits

    if getattr(dataset, "masks", None) is None:
        raise ValueError("evaluate needs a dataset with masks (dataset.masks is None)")
    logits = predict_logits(model, dataset.images, batch_size=batch_size)
    labels = logits_to_labels(logits)
    return evaluate_labels(labels, dataset.masks, dataset.num_classes, list(dataset.case_ids), hd95=hd95)


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def curve_summary(steps: Sequence[float], values: Sequence[float] | None = None) -> dict[str, float]:
    """Summary of a learning curve (e.g. test Dice at each evaluation of a fine-tuning run).

    Args:
        steps: steps of the evaluations, strictly increasing. Called with one sequence only, that
            sequence is taken as the values, at steps ``0, 1, ..., n-1``.
        values: metric at each step (higher is better), finite.

    Returns:
        ``peak`` (max), ``peak_step``, ``final`` (last value), ``sustained`` (mean of the last quarter
        of evaluations: the last ``max(1, n // 4)`` values), ``drop`` (peak − final), ``auc`` (trapezoid
        area under the curve divided by the step range, i.e. the curve's mean height; the single
        value when ``n == 1``) and ``n`` (evaluations).

    Raises:
        ValueError: empty curve, lengths differ, steps not strictly increasing, or a non-finite value.
    """
    if values is None:
        values, steps = steps, list(range(len(steps)))
    steps_a = np.asarray(steps, dtype=np.float64)
    values_a = np.asarray(values, dtype=np.float64)
    if values_a.ndim != 1 or steps_a.ndim != 1:
        raise ValueError("steps and values must be one-dimensional")
    if values_a.size == 0:
        raise ValueError("curve_summary needs at least one evaluation, got none")
    if steps_a.size != values_a.size:
        raise ValueError(f"steps has {steps_a.size} entries, values has {values_a.size}")
    if not np.all(np.isfinite(values_a)):
        raise ValueError(f"values must be finite, got {values_a.tolist()}")
    if np.any(np.diff(steps_a) <= 0):
        raise ValueError(f"steps must be strictly increasing, got {steps_a.tolist()}")
    n = values_a.size
    peak_index = int(np.argmax(values_a))
    sustained = float(values_a[-max(1, n // 4):].mean())
    if n == 1:
        auc = float(values_a[0])
    else:
        area = float(np.sum((values_a[1:] + values_a[:-1]) / 2.0 * np.diff(steps_a)))
        auc = area / float(steps_a[-1] - steps_a[0])
    return {
        "peak": float(values_a[peak_index]),
        "peak_step": _plain_number(steps_a[peak_index]),
        "final": float(values_a[-1]),
        "sustained": sustained,
        "drop": float(values_a[peak_index] - values_a[-1]),
        "auc": auc,
        "n": n,
    }
