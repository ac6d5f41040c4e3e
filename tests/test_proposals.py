"""Proposal generators: shapes, exact TTA inversion, thresholds, morphology, dedupe, bank output, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rndpo.bank import ProposalBank
from rndpo.config import ModelConfig, ProposalConfig
from rndpo.errors import DataError, RndpoError
from rndpo.models import build_model
from rndpo.proposals import (
    ball,
    dedupe_masks,
    generate_proposals,
    generator_names,
    morph_labels,
    propose,
    tta_forward,
    tta_inverse,
)

TTA_ALL = ("hflip", "vflip", "rot90", "rot180", "rot270")


class Pointwise(nn.Module):
    """A per-pixel model (1x1 convolution): equivariant to every flip and rotation."""

    def __init__(self, out_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, out_channels, 1)
        with torch.no_grad():  # fixed weights: a wide spread of probabilities over the test images
            self.conv.weight.copy_(torch.tensor([1.5, 0.0, -1.0][:out_channels]).reshape(-1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([-1.0, 0.0, -0.5][:out_channels]))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(x))


class Shrinking(nn.Module):
    """Outputs half the input resolution: a model that does not fit the images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, ::2, ::2]


def _images(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    images[:, :, 8:20, 10:26] += 2.0  # an asymmetric bright blob
    return images


@pytest.fixture(scope="module")
def unet_binary() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(channels=(4, 8), dropout=0.2), spatial_dims=2, in_channels=1, num_classes=2)


@pytest.fixture(scope="module")
def unet_multi() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(channels=(4, 8), dropout=0.2), spatial_dims=2, in_channels=1, num_classes=3)


def test_tta_forward_inverse_roundtrip():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    for name in TTA_ALL:
        assert torch.equal(tta_inverse(tta_forward(x, name), name), x)
        assert not torch.equal(tta_forward(x, name), x)
    with pytest.raises(ValueError, match="rot45"):
        tta_forward(x, "rot45")


def test_tta_is_exact_for_an_equivariant_model_and_dedupe_counts():
    images = _images()
    cfg = ProposalConfig(mc_dropout=0, tta=TTA_ALL, thresholds=(), morphology=(), include_base=True)
    result = propose(Pointwise(), images, cfg)
    # every TTA prediction of a per-pixel model equals the base prediction: all removed as duplicates
    assert result.num_proposals.tolist() == [1] * len(images)
    assert result.stats.duplicates == len(TTA_ALL) * len(images)
    assert result.stats.duplicates_by_generator == {"tta": len(TTA_ALL) * len(images)}
    assert result.name_sets[0] == ["base"]


@pytest.mark.parametrize("fixture", ["unet_binary", "unet_multi"])
def test_every_generator_shape_dtype_and_names(request, fixture):
    model = request.getfixturevalue(fixture)
    images = _images(n=5)
    cfg = ProposalConfig(mc_dropout=2, tta=("hflip", "rot90"), thresholds=(0.3, 0.7),
                         morphology=("erode:1", "dilate:1", "open:1", "close:1"), batch_size=2)
    snapshot = build_model(ModelConfig(channels=(4, 8), dropout=0.2), spatial_dims=2, in_channels=1,
                           num_classes=2 if fixture == "unet_binary" else 3)
    cfg = cfg.model_copy(update={"checkpoints": True})
    result = propose(model, images, cfg, snapshots=[snapshot])
    names = generator_names(cfg, 1)
    assert result.k_max == len(names) == 1 + 2 + 2 + 2 + 1 + 4
    assert len(result) == 5
    num_classes = 2 if fixture == "unet_binary" else 3
    assert result.num_classes == num_classes
    for i in range(5):
        masks = result.masks(i)
        assert masks.dtype == np.uint8 and masks.shape[1:] == (32, 32)
        assert masks.max() < num_classes
        assert 1 <= len(masks) <= len(names)
        assert result.generator_names(i)[0] == "base"
        assert set(result.generator_names(i)) <= set(names)
        assert len({m.tobytes() for m in masks}) == len(masks)  # no duplicates left
    assert result.stats.proposals + result.stats.duplicates == 5 * len(names)


def test_thresholds_binary_and_multiclass():
    images = _images(n=2)
    model = Pointwise(out_channels=1)
    cfg = ProposalConfig(mc_dropout=0, tta=(), thresholds=(0.2, 0.8), morphology=(), include_base=True)
    result = propose(model, images, cfg)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(images)))[:, 0].numpy()
    for i in range(2):
        by_name = dict(zip(result.generator_names(i), result.masks(i)))
        np.testing.assert_array_equal(by_name["threshold:0.2"], (p[i] > 0.2).astype(np.uint8))
        np.testing.assert_array_equal(by_name["threshold:0.8"], (p[i] > 0.8).astype(np.uint8))
    # multi-class: foreground where 1 - p(background) > t, labelled with the best foreground class
    model = Pointwise(out_channels=3)
    result = propose(model, images, cfg)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(images)), dim=1).numpy()
    expected = np.where(1 - probs[:, 0] > 0.2, probs[:, 1:].argmax(axis=1) + 1, 0)
    np.testing.assert_array_equal(dict(zip(result.generator_names(0), result.masks(0)))["threshold:0.2"], expected[0])
    low = dict(zip(result.generator_names(0), result.masks(0)))["threshold:0.2"]
    high = dict(zip(result.generator_names(0), result.masks(0))).get("threshold:0.8", np.zeros_like(low))
    assert (low > 0).sum() >= (high > 0).sum()


def test_morphology_binary_and_per_class():
    mask = np.zeros((1, 24, 24), np.uint8)
    mask[0, 6:18, 6:18] = 1
    eroded = morph_labels(mask, "erode", 2, 2)
    dilated = morph_labels(mask, "dilate", 2, 2)
    assert eroded.sum() < mask.sum() < dilated.sum()
    assert ((eroded > 0) <= (mask > 0)).all() and ((mask > 0) <= (dilated > 0)).all()
    assert morph_labels(mask, "open", 1, 2).sum() <= mask.sum() <= morph_labels(mask, "close", 1, 2).sum()
    # a mask touching the border does not shrink from the border
    full = np.ones((1, 10, 10), np.uint8)
    assert morph_labels(full, "erode", 2, 2).all()
    # two touching classes: dilation grows each into the background but never takes the other's pixels
    labels = np.zeros((1, 24, 24), np.uint8)
    labels[0, 6:18, 4:12] = 1
    labels[0, 6:18, 12:20] = 2
    grown = morph_labels(labels, "dilate", 2, 3)
    assert ((labels == 1) <= (grown == 1)).all() and ((labels == 2) <= (grown == 2)).all()
    assert (grown == 1).sum() > (labels == 1).sum()
    shrunk = morph_labels(labels, "erode", 2, 3)
    assert set(np.unique(shrunk)) == {0, 1, 2} and (shrunk > 0).sum() < (labels > 0).sum()
    assert ball(1, 2).sum() == 5 and ball(1, 3).sum() == 7


def test_dedupe_masks_keeps_first():
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    b[0, 0] = 1
    kept, names, removed = dedupe_masks(np.stack([a, b, a, b, a]), ["x", "y", "z", "w", "v"])
    assert names == ["x", "y"] and removed == ["z", "w", "v"] and len(kept) == 2


def test_mc_dropout_is_seeded(unet_binary):
    images = _images(n=3)
    cfg = ProposalConfig(mc_dropout=3, tta=(), thresholds=(), morphology=(), include_base=False, seed=5)
    first = propose(unet_binary, images, cfg)
    second = propose(unet_binary, images, cfg)
    for i in range(3):
        np.testing.assert_array_equal(first.masks(i), second.masks(i))
    assert unet_binary.training  # modes restored (fixture models start in training mode)


def test_generate_proposals_writes_a_bank(tmp_path, unet_multi):
    images = _images(n=5)
    cfg = ProposalConfig(mc_dropout=2, batch_size=2)
    case_ids = [f"case{i}" for i in range(5)]
    bank = generate_proposals(unet_multi, images, cfg, bank_path=tmp_path / "bank", case_ids=case_ids,
                              progress=False, meta={"split": "pool"})
    reopened = ProposalBank.open(tmp_path / "bank")
    memory = propose(unet_multi, images, cfg)
    assert reopened.case_ids == case_ids and reopened.num_classes == 3 and reopened.k_max == memory.k_max
    for i in range(5):
        np.testing.assert_array_equal(reopened.masks(i), memory.masks(i))
        assert reopened.generator_names(i) == memory.generator_names(i)
    stats = bank.meta["proposal_stats"]
    assert stats["images"] == 5 and stats["proposals"] == int(reopened.num_proposals.sum())
    assert stats["proposals"] + stats["duplicates"] == 5 * memory.k_max
    assert bank.meta["split"] == "pool" and bank.meta["proposal_config"]["mc_dropout"] == 2


def test_errors(tmp_path, unet_binary):
    images = _images(n=2)
    with pytest.raises(RndpoError, match="empty pool"):
        propose(unet_binary, images[:0], ProposalConfig())
    with pytest.raises(RndpoError, match="K = 1"):
        propose(unet_binary, images, ProposalConfig(mc_dropout=0, tta=(), thresholds=(), morphology=()))
    with pytest.raises(DataError, match="does not match"):
        propose(Shrinking(), images, ProposalConfig(mc_dropout=0))
    with pytest.raises(RndpoError, match="no dropout"):
        propose(Pointwise(), images, ProposalConfig(mc_dropout=2))
    with pytest.raises(RndpoError, match="snapshot"):
        propose(unet_binary, images, ProposalConfig(checkpoints=True))
    with pytest.raises(RndpoError, match="case_ids"):
        generate_proposals(unet_binary, images, ProposalConfig(), bank_path=tmp_path / "b", case_ids=["a"], progress=False)
    with pytest.raises(ValueError, match="erode:2"):
        ProposalConfig(morphology=("shrink:2",))
