"""Metric conventions and known answers (rndpo.metrics)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rndpo.metrics import (
    curve_summary,
    dice_per_case,
    empty_distance,
    evaluate,
    evaluate_labels,
    hd95_per_case,
    iou_per_case,
    segmentation_metrics,
)


def square(size: int, top: int, left: int, side: int, dims: int = 2) -> np.ndarray:
    mask = np.zeros((size,) * dims, dtype=np.uint8)
    mask[(slice(top, top + side),) + (slice(left, left + side),) * (dims - 1)] = 1
    return mask


def test_two_offset_squares_known_answers():
    pred = square(32, 5, 5, 10)[None]
    target = square(32, 8, 5, 10)[None]  # shifted down by 3 px: overlap 7 x 10
    values = segmentation_metrics(pred, target, num_classes=2)
    assert values["dice"][0] == pytest.approx(2 * 70 / 200)
    assert values["iou"][0] == pytest.approx(70 / 130)
    assert values["hd95"][0] == pytest.approx(3.0)


def test_empty_mask_conventions():
    empty = np.zeros((1, 32, 32), dtype=np.uint8)
    full = square(32, 4, 4, 6)[None]
    both = segmentation_metrics(empty, empty, 2)
    assert (both["dice"][0], both["iou"][0], both["hd95"][0]) == (1.0, 1.0, 0.0)
    diagonal = math.sqrt(32**2 + 32**2)
    assert empty_distance((32, 32)) == pytest.approx(diagonal)
    for pred, target in ((full, empty), (empty, full)):
        one = segmentation_metrics(pred, target, 2)
        assert one["dice"][0] == 0.0 and one["iou"][0] == 0.0
        assert one["hd95"][0] == pytest.approx(diagonal)
        assert np.isfinite(one["hd95"][0])


def test_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    pred = (rng.random((6, 24, 24)) > 0.6).astype(np.uint8)
    target = (rng.random((6, 24, 24)) > 0.5).astype(np.uint8)
    inter = (pred & target).sum(axis=(1, 2))
    union = (pred | target).sum(axis=(1, 2))
    expected_dice = 2 * inter / (pred.sum(axis=(1, 2)) + target.sum(axis=(1, 2)))
    np.testing.assert_allclose(dice_per_case(pred, target, 2), expected_dice, rtol=1e-6)
    np.testing.assert_allclose(iou_per_case(torch.from_numpy(pred), torch.from_numpy(target), 2), inter / union, rtol=1e-6)


def test_multiclass_mean_over_foreground_classes():
    target = np.zeros((1, 32, 32), dtype=np.int64)
    target[0, 2:12, 2:12] = 1
    target[0, 20:30, 20:30] = 2
    pred = target.copy()
    pred[0, 20:30, 20:25] = 0  # class 2 half missed: Dice 2*50/150
    values = segmentation_metrics(pred, target, num_classes=3)
    np.testing.assert_allclose(values["dice_per_class"][0], [1.0, 100 / 150])
    assert values["dice"][0] == pytest.approx((1.0 + 100 / 150) / 2)
    np.testing.assert_allclose(values["iou_per_class"][0], [1.0, 0.5])
    assert values["hd95_per_class"][0, 0] == 0.0
    # a class absent from both prediction and truth counts as a perfect match
    target3 = target.copy()
    target3[target3 == 2] = 0
    values3 = segmentation_metrics(target3, target3, num_classes=4)
    np.testing.assert_allclose(values3["dice_per_class"][0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(values3["hd95_per_class"][0], [0.0, 0.0, 0.0])


def test_3d_offset_cubes_hd95():
    pred = square(20, 4, 4, 8, dims=3)[None]
    target = square(20, 6, 4, 8, dims=3)[None]
    assert hd95_per_case(pred, target, 2)[0] == pytest.approx(2.0)
    assert dice_per_case(pred, target, 2)[0] == pytest.approx(2 * 6 / 16)


def test_validation_errors():
    a = np.zeros((2, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(a, np.zeros((2, 8, 9), dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="target labels"):
        segmentation_metrics(a, a + 2, 2)
    with pytest.raises(ValueError, match="num_classes"):
        segmentation_metrics(a, a, 1)
    with pytest.raises(TypeError, match="integer"):
        segmentation_metrics(a.astype(np.float32), a, 2)


class _ThresholdModel(torch.nn.Module):
    """Logit = 10 * (image - 0.5): predicts exactly the image when the image is a 0/1 mask."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * (images - 0.5)


def test_evaluate_and_evaluate_labels():
    masks = np.stack([square(32, 5, 5, 10), square(32, 8, 5, 10), np.zeros((32, 32), np.uint8)])
    images = np.stack([square(32, 5, 5, 10), square(32, 5, 5, 10), np.zeros((32, 32), np.uint8)])[:, None].astype(np.float32)
    dataset = SimpleNamespace(images=images, masks=masks, case_ids=["a", "b", "c"], num_classes=2)
    result = evaluate(_ThresholdModel(), dataset, batch_size=2)
    assert result["n_cases"] == 3
    assert [c["case_id"] for c in result["per_case"]] == ["a", "b", "c"]
    np.testing.assert_allclose([c["dice"] for c in result["per_case"]], [1.0, 0.7, 1.0])
    np.testing.assert_allclose([c["hd95"] for c in result["per_case"]], [0.0, 3.0, 0.0])
    assert result["dice"] == pytest.approx(2.7 / 3)
    assert result["per_class"]["dice"] == [pytest.approx(2.7 / 3)]
    with pytest.raises(ValueError, match="case_ids"):
        evaluate_labels(masks, masks, 2, ["a"])
    with pytest.raises(ValueError, match="masks"):
        evaluate(_ThresholdModel(), SimpleNamespace(images=images, masks=None, case_ids=[], num_classes=2))


def test_curve_summary_known_answers():
    summary = curve_summary([0, 10, 20, 30], [0.5, 0.8, 0.7, 0.6])
    assert summary["peak"] == 0.8 and summary["peak_step"] == 10
    assert summary["final"] == 0.6
    assert summary["drop"] == pytest.approx(0.2)
    assert summary["sustained"] == pytest.approx(0.6)  # last quarter of 4 evaluations = the last one
    assert summary["auc"] == pytest.approx((6.5 + 7.5 + 6.5) / 30)
    eight = curve_summary(list(range(0, 80, 10)), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.7])
    assert eight["sustained"] == pytest.approx(0.8)  # mean of the last 2 of 8
    assert eight["drop"] == pytest.approx(0.2)
    # uneven steps: auc is the step-weighted mean height
    assert curve_summary([0, 1, 4], [0.0, 1.0, 1.0])["auc"] == pytest.approx((0.5 + 3.0) / 4)
    # one sequence only → values at steps 0..n-1
    assert curve_summary([0.2, 0.4])["auc"] == pytest.approx(0.3)
    single = curve_summary([5], [0.42])
    assert single == {"peak": 0.42, "peak_step": 5, "final": 0.42, "sustained": 0.42, "drop": 0.0, "auc": 0.42, "n": 1}


@pytest.mark.parametrize(
    "steps, values, match",
    [([], [], "at least one"), ([0, 1], [0.5], "entries"), ([0, 0], [0.1, 0.2], "increasing"), ([0, 1], [0.1, float("nan")], "finite")],
)
def test_curve_summary_errors(steps, values, match):
    with pytest.raises(ValueError, match=match):
        curve_summary(steps, values)
