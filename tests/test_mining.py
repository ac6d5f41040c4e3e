"""Pair mining: strategies against brute force, filters and their counts, flip noise, |D|, reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rndpo.bank import ProposalBank
from rndpo.config import MiningConfig
from rndpo.mining import COUNT_KEYS, Pairs, attach_reference, mine, mine_pairs
from rndpo.objectives import mask_logratio


def _pool(seed=0, n=12, k=5, spatial=(6, 7), num_classes=2, empty_frac=0.3):
    """Random scores (rounded so that ties occur), NaN in empty slots, and masks (N, K, *spatial)."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n, k)), 1)
    valid = rng.random((n, k)) > empty_frac
    scores[~valid] = np.nan
    masks = rng.integers(0, num_classes, size=(n, k, *spatial), dtype=np.uint8)
    # some identical proposals (|D| = 0) and near-identical ones (small |D|)
    masks[::3, 1] = masks[::3, 0]
    masks[1::3, 2] = masks[1::3, 0]
    masks[1::3, 2, 0, :2] ^= 1
    return scores, valid, masks


def _brute_force(scores, masks, strategy, min_margin=0.0, min_region=1):
    """Set of (case, chosen, rejected, region, margin) by direct enumeration."""
    out = set()
    for i, row in enumerate(scores):
        slots = [j for j in range(len(row)) if not math.isnan(row[j])]
        if len(slots) < 2:
            continue
        top = max(slots, key=lambda j: (row[j], -j))  # first maximum
        bottom = min(slots, key=lambda j: (row[j], -j))  # last minimum
        if strategy == "top-vs-rest":
            candidates = [(top, j) for j in slots if j != top]
        elif strategy == "top-vs-bottom":
            candidates = [(top, bottom)]
        else:
            candidates = list(itertools.combinations(slots, 2))
        for a, b in candidates:
            margin = abs(row[a] - row[b])
            if margin == 0 or margin < min_margin:
                continue
            chosen, rejected = (a, b) if row[a] > row[b] else (b, a)
            region = int((masks[i, a] != masks[i, b]).sum())
            if region == 0 or region < min_region:
                continue
            out.add((i, chosen, rejected, region, round(margin, 9)))
    return out


def _as_set(pairs: Pairs):
    return {(int(c), int(w), int(l), int(r), round(float(m), 9)) for c, w, l, r, m in
            zip(pairs.case_index, pairs.chosen, pairs.rejected, pairs.region, pairs.margin)}


@pytest.mark.parametrize("strategy", ["top-vs-rest", "top-vs-bottom", "all-pairs"])
@pytest.mark.parametrize("min_margin, min_region", [(0.0, 1), (0.25, 1), (0.0, 6), (0.15, 4)])
def test_strategies_match_brute_force(strategy, min_margin, min_region):
    for seed in range(3):
        scores, _, masks = _pool(seed)
        cfg = MiningConfig(strategy=strategy, min_margin=min_margin, min_region=min_region)
        pairs = mine_pairs(scores, masks, cfg)
        assert _as_set(pairs) == _brute_force(scores, masks, strategy, min_margin, min_region)
        assert len(_as_set(pairs)) == len(pairs)  # no duplicates
        counts = pairs.counts
        assert list(counts) == list(COUNT_KEYS)
        assert counts["candidates"] == sum(counts[k] for k in ("ties", "below_margin", "empty_region",
                                                                "below_region", "kept"))
        assert counts["kept"] == len(pairs) and counts["flipped"] == 0 and not pairs.flipped.any()
        assert np.isnan(pairs.ref_logratio).all() and not pairs.has_reference
        assert (np.diff(pairs.case_index) >= 0).all()  # grouped by image


def test_random_pairs_are_distinct_valid_and_oriented():
    scores, valid, masks = _pool(4, n=40, k=6)
    cfg = MiningConfig(strategy="random-pairs", pairs_per_image=4)
    pairs = mine_pairs(scores, masks, cfg)
    allowed = _brute_force(scores, masks, "all-pairs")
    assert _as_set(pairs) <= allowed and len(_as_set(pairs)) == len(pairs)
    num_valid = valid.sum(1)
    expected_candidates = sum(min(4, v * (v - 1) // 2) for v in num_valid if v >= 2)
    assert pairs.counts["candidates"] == expected_candidates
    # seeded: same seed → same pairs; another seed → (almost surely) other pairs
    again = mine_pairs(scores, masks, cfg)
    assert _as_set(again) == _as_set(pairs)
    other = mine_pairs(scores, masks, cfg, rng=123)
    assert _as_set(other) != _as_set(pairs)
    # asking for more pairs than exist gives all pairs
    everything = mine_pairs(scores, masks, MiningConfig(strategy="random-pairs", pairs_per_image=100))
    assert _as_set(everything) == allowed


def test_filters_and_counts_by_hand():
    masks = np.zeros((1, 4, 4, 4), dtype=np.uint8)
    masks[0, 1, 0, 0] = 1  # |D(0,1)| = 1
    masks[0, 2, :2, :] = 1  # |D(0,2)| = 8
    # slot 3 identical to slot 0: |D(0,3)| = 0
    scores = np.array([[0.9, 0.5, 0.85, 0.2]])
    cfg = MiningConfig(strategy="top-vs-rest", min_margin=0.1, min_region=2)
    pairs = mine_pairs(scores, masks, cfg)
    assert pairs.counts == {"images": 1, "images_lt2": 0, "candidates": 3, "ties": 0, "below_margin": 1,
                            "empty_region": 1, "below_region": 1, "kept": 0, "flipped": 0}
    scores = np.array([[0.9, 0.5, 0.9, 0.2]])
    pairs = mine_pairs(scores, masks, MiningConfig(strategy="top-vs-rest"))
    assert pairs.counts["ties"] == 1 and pairs.counts["empty_region"] == 1 and pairs.counts["kept"] == 1
    assert (pairs.chosen[0], pairs.rejected[0], pairs.region[0]) == (0, 1, 1)


def test_constant_scores_give_only_ties():
    scores = np.full((5, 4), 0.7)
    scores[2, 3] = np.nan
    masks = np.random.default_rng(0).integers(0, 2, size=(5, 4, 8, 8), dtype=np.uint8)
    for strategy in ("top-vs-rest", "top-vs-bottom", "random-pairs", "all-pairs"):
        pairs = mine_pairs(scores, masks, MiningConfig(strategy=strategy))
        assert len(pairs) == 0
        assert pairs.counts["ties"] == pairs.counts["candidates"] > 0
        assert pairs.counts["kept"] == 0


def test_flip_rate_statistical_and_zero():
    rng = np.random.default_rng(5)
    n, k = 2000, 4
    scores = rng.random((n, k))
    masks = rng.integers(0, 2, size=(n, k, 4, 4), dtype=np.uint8)
    cfg = MiningConfig(strategy="all-pairs")
    clean = mine_pairs(scores, masks, cfg)
    for p in (0.0, 0.2):
        pairs = mine_pairs(scores, masks, cfg, flip_prob=p, rng=7)
        assert len(pairs) == len(clean)
        rate = pairs.flipped.mean()
        if p == 0:
            assert not pairs.flipped.any()
        else:
            assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / len(pairs)), rate
        # a flipped pair is oriented against the judge; the margin stays the judge's gap
        judge_prefers_chosen = scores[pairs.case_index, pairs.chosen] > scores[pairs.case_index, pairs.rejected]
        np.testing.assert_array_equal(judge_prefers_chosen, ~pairs.flipped)
        np.testing.assert_array_equal(pairs.region, clean.region)
        np.testing.assert_allclose(pairs.margin, clean.margin)
        assert pairs.counts["flipped"] == int(pairs.flipped.sum())
    np.testing.assert_array_equal(mine_pairs(scores, masks, cfg, flip_prob=0.3, rng=1).flipped,
                                  mine_pairs(scores, masks, cfg, flip_prob=0.3, rng=1).flipped)


def test_bad_inputs_raise_clear_errors():
    masks = np.zeros((3, 4, 4, 4), dtype=np.uint8)
    good = np.random.default_rng(0).random((3, 4))
    with pytest.raises(ValueError, match="K ≥ 2"):
        mine_pairs(good[:, :1], masks[:, :1])
    with pytest.raises(ValueError, match="empty"):
        mine_pairs(np.zeros((0, 4)), masks[:0])
    bad = good.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="inf.*image 1, slot 2"):
        mine_pairs(bad, masks)
    with pytest.raises(ValueError, match="2-D float"):
        mine_pairs(np.zeros((3, 4), dtype=np.int64), masks)
    with pytest.raises(ValueError, match="flip_prob"):
        mine_pairs(good, masks, flip_prob=1.5)
    bad = good.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN .*image 0, slot 1"):
        mine_pairs(bad, masks, valid=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="empty proposal slots"):
        mine_pairs(good, masks, valid=np.eye(3, 4, dtype=bool) | np.eye(3, 4, 1, dtype=bool))


def _write_bank(path, masks, scores, num_classes):
    n, k = scores.shape
    generator_ids = np.where(np.isnan(scores), -1, 0).astype(np.int16)
    with ProposalBank.create(path, case_ids=[f"c{i}" for i in range(n)], spatial_shape=masks.shape[2:],
                             num_classes=num_classes, k_max=k, generators=["g"], dedupe=False) as writer:
        writer.add(np.arange(n), masks, generator_ids)
    return ProposalBank.open(path)


def test_bank_regions_match_brute_force_and_mask_arrays(tmp_path):
    # valid slots must come first in a bank (it compacts them), so use a prefix pattern
    scores, _, masks = _pool(8, n=15, k=5, spatial=(5, 11), empty_frac=0.0)
    for i in range(0, 15, 4):
        scores[i, 3:] = np.nan
    bank = _write_bank(tmp_path / "b", masks, scores, 2)
    for strategy in ("all-pairs", "top-vs-rest"):
        from_bank = mine_pairs(scores, bank, MiningConfig(strategy=strategy))
        from_masks = mine_pairs(scores, masks, MiningConfig(strategy=strategy))
        assert _as_set(from_bank) == _as_set(from_masks) == _brute_force(scores, masks, strategy)
    # the bank's valid slots are checked against the scores
    wrong = scores.copy()
    wrong[0, 4] = 0.5
    with pytest.raises(ValueError, match="empty proposal slots"):
        mine_pairs(wrong, bank)


def test_pairs_save_load_group(tmp_path):
    scores, _, masks = _pool(9)
    pairs = mine_pairs(scores, masks, MiningConfig(strategy="all-pairs"), flip_prob=0.3)
    path = pairs.save(tmp_path / "pairs.npz")
    loaded = Pairs.load(path)
    for name, column in pairs.columns().items():
        np.testing.assert_array_equal(getattr(loaded, name), column)
        assert getattr(loaded, name).dtype == column.dtype
    assert loaded.counts == pairs.counts and loaded.meta == pairs.meta
    groups = loaded.group_by_image()
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(len(pairs)))
    for case, rows in groups.items():
        assert (loaded.case_index[rows] == case).all()
    assert len(loaded.subset(groups[next(iter(groups))])) == len(groups[next(iter(groups))])


@pytest.mark.parametrize("num_classes, spatial", [(2, (12, 10)), (3, (12, 10)), (2, (4, 6, 5))])
def test_reference_logratio_matches_recomputation(tmp_path, num_classes, spatial):
    torch.manual_seed(0)
    rng = np.random.default_rng(10)
    n, k = 6, 4
    channels = 1 if num_classes == 2 else num_classes
    conv = torch.nn.Conv2d if len(spatial) == 2 else torch.nn.Conv3d
    model = torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, channels, 1))
    images = rng.standard_normal((n, 1, *spatial)).astype(np.float32)
    masks = rng.integers(0, num_classes, size=(n, k, *spatial), dtype=np.uint8)
    scores = rng.random((n, k))
    scores[1, 2:] = np.nan
    bank = _write_bank(tmp_path / "b", masks, scores, num_classes)
    pairs = mine(bank, scores, images, model, MiningConfig(strategy="all-pairs"), flip_prob=0.5, batch_size=4)
    assert len(pairs) and pairs.has_reference and pairs.flipped.any()
    with torch.no_grad():
        logits = model(torch.from_numpy(images))
    chosen = torch.from_numpy(masks[pairs.case_index, pairs.chosen]).long()
    rejected = torch.from_numpy(masks[pairs.case_index, pairs.rejected]).long()
    logratio, region = mask_logratio(logits[torch.from_numpy(pairs.case_index)], chosen, rejected)
    np.testing.assert_allclose(pairs.ref_logratio, logratio.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(pairs.region, region.numpy())
    np.testing.assert_allclose(pairs.ref_chosen_logp - pairs.ref_rejected_logp, pairs.ref_logratio,
                               rtol=1e-4, atol=1e-3)
    assert (pairs.ref_chosen_logp <= 0).all() and (pairs.ref_rejected_logp <= 0).all()
    # a plain callable works too and gives the same numbers
    again = attach_reference(pairs, bank, lambda x: model(x), images, batch_size=2, pair_chunk=3)
    np.testing.assert_allclose(again.ref_logratio, pairs.ref_logratio, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again.ref_chosen_logp, pairs.ref_chosen_logp, rtol=1e-5, atol=1e-5)


def test_attach_reference_rejects_mismatched_images(tmp_path):
    scores, _, masks = _pool(11, n=4, k=3, empty_frac=0.0)
    bank = _write_bank(tmp_path / "b", masks, scores, 2)
    pairs = mine_pairs(scores, bank)
    model = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="images have shape"):
        attach_reference(pairs, bank, model, np.zeros((3, 1, 6, 7), np.float32))
    with pytest.raises(ValueError, match="logits have shape"):
        attach_reference(pairs, bank, torch.nn.Conv2d(1, 2, 1), np.zeros((4, 1, 6, 7), np.float32))
    pairs.region[0] += 1  # pairs that do not belong to this bank
    with pytest.raises(ValueError, match="another bank"):
        attach_reference(pairs, bank, model, np.zeros((4, 1, 6, 7), np.float32))


def _cli_fixture(tmp_path, num_cases=10, size=32):
    """A tiny folder data set, splits.json, a small saved base model, a bank of the pool and scores."""
    from PIL import Image

    from rndpo.config import DataConfig, ModelConfig, SplitConfig
    from rndpo.data import load_dataset, make_splits
    from rndpo.models import build_model
    from rndpo.training.checkpoint import model_meta, save_model

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(num_cases):
        mask = ((yy - 16) ** 2 + (xx - rng.integers(8, 24)) ** 2 < rng.integers(20, 60)).astype(np.uint8)
        image = (rng.integers(0, 60, (size, size)) + 150 * mask).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"case{i:02d}.png")
        Image.fromarray(mask * 255).save(tmp_path / "data" / "masks" / f"case{i:02d}.png")
    dataset = load_dataset(DataConfig(path=str(tmp_path / "data"), size=size))
    splits = make_splits(dataset, SplitConfig(labeled=2, val=0.1, test=0.2))
    splits.save(tmp_path / "splits.json")
    model_cfg = ModelConfig(channels=(4, 8))
    torch.manual_seed(0)
    model = build_model(model_cfg, spatial_dims=2, in_channels=1, num_classes=2)
    save_model(tmp_path / "base.safetensors", model, model_meta(model_cfg, dataset))
    pool = dataset.select(splits.pool)
    k = 4
    masks = rng.integers(0, 2, size=(len(pool), k, size, size), dtype=np.uint8)
    with ProposalBank.create(tmp_path / "bank", case_ids=pool.case_ids, spatial_shape=(size, size), num_classes=2,
                             k_max=k, generators=["random"]) as writer:
        writer.add(np.arange(len(pool)), masks)
    from rndpo.bank import save_scores

    save_scores(tmp_path / "bank" / "scores", rng.random((len(pool), k)), {"judge": "random"})
    return dataset, splits, model, pool


def test_cli_mine(tmp_path, capsys):
    from rndpo.cli import main

    dataset, splits, model, pool = _cli_fixture(tmp_path)
    args = ["mine", "--bank", str(tmp_path / "bank"), "--scores", str(tmp_path / "bank" / "scores.npy"),
            "--model", str(tmp_path / "base.safetensors"), "--data", str(tmp_path / "data"),
            "--splits", str(tmp_path / "splits.json"), "--strategy", "all-pairs", "--flip-prob", "0.25",
            "--out", str(tmp_path / "mined")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "candidates" in printed and "kept" in printed
    pairs = Pairs.load(tmp_path / "mined" / "pairs.npz")
    assert len(pairs) == pairs.counts["kept"] > 0 and pairs.has_reference
    assert pairs.meta["strategy"] == "all-pairs" and pairs.meta["flip_prob"] == 0.25
    # the stored reference equals a recomputation with the saved model on the pool images
    bank = ProposalBank.open(tmp_path / "bank")
    with torch.no_grad():
        model.eval()
        logits = model(torch.from_numpy(pool.images[pairs.case_index]))
    chosen = torch.stack([torch.from_numpy(bank.masks(c)[w]) for c, w in zip(pairs.case_index, pairs.chosen)])
    rejected = torch.stack([torch.from_numpy(bank.masks(c)[l]) for c, l in zip(pairs.case_index, pairs.rejected)])
    np.testing.assert_allclose(pairs.ref_logratio, mask_logratio(logits, chosen, rejected)[0].numpy(),
                               rtol=1e-4, atol=1e-4)
    # a bank holding a non-pool case is refused with one line naming it
    labeled = splits.labeled[0]
    with ProposalBank.create(tmp_path / "bad", case_ids=[labeled], spatial_shape=(32, 32), num_classes=2,
                             k_max=2, generators=["g"]) as writer:
        writer.add(0, np.zeros((2, 32, 32), np.uint8))
    assert main([*args[:1], "--bank", str(tmp_path / "bad"), *args[3:]]) == 1
    assert labeled in capsys.readouterr().err
