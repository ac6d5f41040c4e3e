"""Judges (oracle + noise, agreement, entropy, learned-qc, ensemble), their checks, and the audit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import nn

from rndpo.bank import ProposalBank
from rndpo.config import DataConfig, JudgeConfig, MiningConfig, ModelConfig, ProposalConfig, SyntheticConfig
from rndpo.data import load_dataset, make_synthetic
from rndpo.errors import DataError, RndpoError
from rndpo.judges import (
    JudgeError,
    agreement_scores,
    audit_judge,
    check_scores,
    corrupt_mask,
    dice_matrix,
    ensemble_scores,
    judge_flip_prob,
    load_qc_model,
    pair_outcomes,
    plot_region_histogram,
    proposal_dice,
    qc_scores,
    run_judge,
    score,
    train_qc_model,
)
from rndpo.mining import mine_pairs
from rndpo.models import build_model
from rndpo.proposals import Proposals, generate_proposals

SIZE = 32


def _square(size: int = SIZE, lo: int = 8, hi: int = 24) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 1
    return mask


def _corrupted_set(n: int = 16, k: int = 6, seed: int = 0) -> tuple[Proposals, np.ndarray]:
    """In-memory proposals: random corruptions of a square ground truth."""
    rng = np.random.default_rng(seed)
    truth = np.stack([_square(lo=6 + i % 4, hi=22 + i % 5) for i in range(n)])
    sets = []
    for i in range(n):
        masks = np.stack([corrupt_mask(truth[i], rng)[0] for _ in range(k)])
        sets.append(masks)
    proposals = Proposals(sets, [["corrupt"] * k] * n, num_classes=2, k_max=k, case_ids=[f"c{i}" for i in range(n)])
    return proposals, truth


def _write_bank(path: Path, sets: list[np.ndarray], num_classes: int = 2, k_max: int | None = None) -> ProposalBank:
    k_max = k_max or max(len(s) for s in sets)
    spatial = sets[0].shape[1:]
    with ProposalBank.create(path, case_ids=[f"c{i}" for i in range(len(sets))], spatial_shape=spatial,
                             num_classes=num_classes, k_max=k_max, generators=["g"], dedupe=False) as writer:
        for i, masks in enumerate(sets):
            writer.add(i, masks, np.zeros(len(masks), np.int16))
    return ProposalBank.open(path)


class Fixed(nn.Module):
    """A model whose logits are the first image channel times ``scale`` (no dropout)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.scale


# ---------------------------------------------------------------------------------------- Dice
def test_dice_matrix_against_brute_force():
    rng = np.random.default_rng(1)
    for num_classes in (2, 4):
        a = rng.integers(0, num_classes, (3, 9, 7)).astype(np.uint8)
        b = rng.integers(0, num_classes, (2, 9, 7)).astype(np.uint8)
        a[0] = 0
        b[0] = 0  # both empty: Dice 1
        got = dice_matrix(a, b, num_classes)
        for i in range(3):
            for j in range(2):
                per_class = []
                for c in range(1, num_classes):
                    x, y = a[i] == c, b[j] == c
                    if x.sum() + y.sum():
                        per_class.append(2 * (x & y).sum() / (x.sum() + y.sum()))
                expected = np.mean(per_class) if per_class else 1.0
                assert got[i, j] == pytest.approx(expected)
    assert got[0, 0] == 1.0


# ---------------------------------------------------------------------------------------- oracle
def test_oracle_without_noise_is_perfect(tmp_path):
    proposals, truth = _corrupted_set()
    bank = _write_bank(tmp_path / "bank", proposals.mask_sets)
    true_dice = proposal_dice(bank, truth)
    report = run_judge("oracle", bank, truth=truth)
    np.testing.assert_allclose(report.scores, true_dice)
    audit = audit_judge(report.scores, true_dice)
    assert audit["pairwise_accuracy"] == 1.0 and audit["top1_regret"] == 0.0
    assert audit["spearman_pooled"] == pytest.approx(1.0) and audit["spearman_within"] == pytest.approx(1.0)
    assert report.flip_prob == 0.0 and report.constant_images == []


def test_oracle_gaussian_noise_lowers_accuracy():
    proposals, truth = _corrupted_set(n=24, k=6)
    true_dice = proposal_dice(proposals, truth)

    def accuracy(sigma: float) -> float:
        return float(np.mean([
            audit_judge(run_judge(f"oracle+gaussian:{sigma}", proposals, truth=truth, rng=seed).scores, true_dice)["pairwise_accuracy"]
            for seed in range(5)
        ]))

    acc = {sigma: accuracy(sigma) for sigma in (0.0, 0.05, 0.3)}
    assert acc[0.0] == 1.0 > acc[0.05] > acc[0.3] > 0.4
    # seeded: the same rng gives the same scores
    first = run_judge("oracle+gaussian:0.1", proposals, truth=truth, rng=3).scores
    np.testing.assert_array_equal(first, run_judge("oracle+gaussian:0.1", proposals, truth=truth, rng=3).scores)


def test_size_bias_prefers_larger_masks():
    truth = _square()[None]
    masks = np.stack([_square(lo=10, hi=22), _square(lo=8, hi=24), _square(lo=4, hi=28)])  # small, exact, large
    proposals = Proposals([masks], [["m"] * 3], num_classes=2, k_max=3, case_ids=["c0"])
    plain = run_judge("oracle", proposals, truth=truth).scores[0]
    biased = run_judge("oracle+size-bias:2.0", proposals, truth=truth).scores[0]
    fractions = (masks > 0).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(biased - plain, 2.0 * fractions)
    assert int(np.argmax(plain)) == 1 and int(np.argmax(biased)) == 2


def test_flip_noise_leaves_scores_and_is_exposed_for_mining():
    proposals, truth = _corrupted_set(n=4)
    cfg = JudgeConfig.model_validate("oracle+flip:0.2")
    report = run_judge(cfg, proposals, truth=truth)
    np.testing.assert_allclose(report.scores, proposal_dice(proposals, truth))
    assert judge_flip_prob(cfg) == report.flip_prob == 0.2
    assert judge_flip_prob(JudgeConfig.model_validate("oracle+gaussian:0.2")) == 0.0


# ---------------------------------------------------------------------------------------- agreement / ensemble
@pytest.mark.parametrize("mode", ["mean-dice", "majority"])
def test_agreement_ranks_the_outlier_last(mode):
    base = _square()
    masks = np.stack([base, _square(lo=8, hi=23), _square(lo=9, hi=24), np.roll(base, 10, axis=1)])
    proposals = Proposals([masks], [["m"] * 4], num_classes=2, k_max=4, case_ids=["c0"])
    scores = agreement_scores(proposals, mode)[0]
    assert int(np.argmin(scores)) == 3 and (scores >= 0).all() and (scores <= 1).all()


def test_agreement_with_two_proposals_is_constant_and_reported():
    masks = np.stack([_square(lo=8, hi=24), _square(lo=10, hi=20)])
    proposals = Proposals([masks, masks[:1]], [["a", "b"], ["a"]], num_classes=2, k_max=2, case_ids=["c0", "c1"])
    report = run_judge("agreement", proposals)
    assert report.constant_images == [0] and report.single_images == [1]
    assert "every pair of those images is a tie" in report.warnings["constant_images"]["message"]
    with pytest.warns(UserWarning, match="identical scores"):
        scores = score("agreement", proposals)
    assert np.isnan(scores[1, 1]) and np.isfinite(scores[1, 0])
    # mining never turns the constant image into pairs
    pairs = mine_pairs(scores, np.stack([masks, np.stack([masks[0], masks[0]])]), MiningConfig(strategy="all-pairs"))
    assert len(pairs) == 0 and pairs.counts["ties"] == 1


def test_ensemble_is_the_mean_rank():
    first = np.array([[0.1, 0.5, 0.3, np.nan]])
    second = np.array([[3.0, 1.0, 2.0, np.nan]])
    ranks = ensemble_scores([first, second])
    np.testing.assert_allclose(ranks[0, :3], [0.5, 0.5, 0.5])
    assert np.isnan(ranks[0, 3])
    proposals, truth = _corrupted_set(n=6)
    report = run_judge("ensemble(oracle,agreement)", proposals, truth=truth)
    assert report.scores.shape == (6, 6) and len(report.info["members"]) == 2
    oracle_only = run_judge(JudgeConfig(name="ensemble", members=("oracle", "oracle+gaussian:0")), proposals, truth=truth)
    assert audit_judge(oracle_only.scores, proposal_dice(proposals, truth))["pairwise_accuracy"] == 1.0


# ---------------------------------------------------------------------------------------- entropy
def test_entropy_prefers_confident_regions():
    image = np.zeros((1, 1, SIZE, SIZE), np.float32)
    image[0, 0, :, :16] = 6.0  # left half: confidently foreground; right half: p = 0.5, maximal entropy
    confident = np.zeros((SIZE, SIZE), np.uint8)
    confident[4:28, 2:14] = 1
    uncertain = np.zeros((SIZE, SIZE), np.uint8)
    uncertain[4:28, 18:30] = 1
    empty = np.zeros((SIZE, SIZE), np.uint8)
    proposals = Proposals([np.stack([uncertain, confident, empty])], [["a", "b", "c"]], num_classes=2, k_max=3, case_ids=["c0"])
    for region in ("foreground", "boundary"):
        cfg = JudgeConfig(name="entropy", entropy_region=region)
        report = run_judge(cfg, proposals, images=image, model=Fixed())
        scores = report.scores[0]
        assert scores[1] > scores[0] and scores[2] == -1.0 and (scores >= -1).all() and (scores <= 0).all()
        assert "no dropout" in report.info["note"]


def test_entropy_with_mc_dropout_is_seeded_and_bounded():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(4, 8), dropout=0.3), spatial_dims=2, in_channels=1, num_classes=3)
    proposals, _ = _corrupted_set(n=3)
    images = np.random.default_rng(0).normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
    cfg = JudgeConfig(name="entropy", entropy_passes=3)
    first = run_judge(cfg, proposals, images=images, model=model).scores
    np.testing.assert_array_equal(first, run_judge(cfg, proposals, images=images, model=model).scores)
    assert np.isfinite(first).all() and (first >= -1).all() and (first <= 0).all()


# ---------------------------------------------------------------------------------------- learned QC
def _blob_data(n: int, seed: int):
    """Images whose bright region is the mask (so quality is visible from the image)."""
    data = make_synthetic(SyntheticConfig(n_images=n, size=SIZE, seed=seed))
    return data


def test_learned_qc_predicts_quality_of_held_out_corruptions(tmp_path):
    labeled, val, held_out = _blob_data(40, 0), _blob_data(12, 1), _blob_data(12, 2)
    cfg = JudgeConfig(name="learned-qc", qc_epochs=12, qc_patience=4, qc_size=SIZE, qc_corruptions=6)
    qc, history = train_qc_model(labeled, val, cfg=cfg, out_path=tmp_path / "qc.safetensors")
    assert history["best_epoch"] >= 0 and history["train_samples"] == 40 * 7
    rng = np.random.default_rng(9)
    sets = [np.stack([corrupt_mask(m, rng)[0] for _ in range(6)]) for m in held_out.masks]
    proposals = Proposals(sets, [["c"] * 6] * 12, num_classes=2, k_max=6, case_ids=held_out.case_ids)
    predicted = qc_scores(qc, proposals, held_out.images, qc_size=SIZE)
    true_dice = proposal_dice(proposals, held_out.masks)
    rho = stats.spearmanr(predicted.ravel(), true_dice.ravel())[0]
    assert rho > 0.3, rho
    # saved regressor: same predictions through the judge with cfg.qc_model
    loaded, meta = load_qc_model(tmp_path / "qc.safetensors")
    assert meta["qc_size"] == SIZE
    report = run_judge(cfg.model_copy(update={"qc_model": str(tmp_path / "qc.safetensors")}), proposals, images=held_out.images)
    np.testing.assert_allclose(report.scores, predicted, atol=1e-6)


def test_corrupt_mask_kinds_change_the_mask():
    rng = np.random.default_rng(0)
    truth = _square()
    kinds = set()
    for _ in range(40):
        out, description = corrupt_mask(truth, rng)
        assert out.shape == truth.shape and out.dtype == np.uint8
        kinds.update(part.split(":")[0] for part in description.split("+"))
    assert kinds == {"erode", "dilate", "shift", "holes", "blobs"}


# ---------------------------------------------------------------------------------------- no ground truth
def _write_folder(root: Path, data) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for case, image, mask in zip(data.case_ids, data.images, data.masks):
        pixels = np.clip((image[0] - image[0].min()) / (np.ptp(image[0]) + 1e-6) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{case}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{case}.png")


def test_non_oracle_judges_run_with_pool_masks_deleted(tmp_path):
    data = make_synthetic(SyntheticConfig(n_images=20, size=SIZE, seed=3))
    _write_folder(tmp_path / "labeled", data.subset(range(12)))
    _write_folder(tmp_path / "pool", data.subset(range(12, 20)))
    labeled = load_dataset(DataConfig(path=str(tmp_path / "labeled"), size=SIZE))
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(4, 8), dropout=0.2), spatial_dims=2, in_channels=1, num_classes=2)
    pool = load_dataset(DataConfig(path=str(tmp_path / "pool"), size=SIZE))
    bank = generate_proposals(model, pool.images, ProposalConfig(mc_dropout=2), bank_path=tmp_path / "bank",
                              case_ids=pool.case_ids, progress=False)
    shutil.rmtree(tmp_path / "pool" / "masks")  # the pool's ground truth is gone from disk
    pool = load_dataset(DataConfig(path=str(tmp_path / "pool"), size=SIZE))
    assert pool.masks is None
    labeled_data = (labeled.subset(range(8)), labeled.subset(range(8, 12)))
    for spec in ("agreement", "entropy", "ensemble(agreement,entropy)"):
        cfg = JudgeConfig.model_validate(spec).model_copy(update={"entropy_passes": 2})
        report = run_judge(cfg, bank, images=pool.images, model=model)
        assert report.scores.shape == (8, bank.k_max) and np.isfinite(report.scores[bank.valid]).all()
    cfg = JudgeConfig(name="learned-qc", qc_epochs=2, qc_size=SIZE, qc_corruptions=2)
    report = run_judge(cfg, bank, images=pool.images, model=model, labeled_data=labeled_data, qc_out=tmp_path / "qc")
    assert np.isfinite(report.scores[bank.valid]).all() and (tmp_path / "qc.safetensors").is_file()
    with pytest.raises(RndpoError, match="ground-truth"):
        run_judge("oracle", bank, truth=pool.masks)


# ---------------------------------------------------------------------------------------- errors
def test_bad_scores_and_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(JudgeError, match="judge learned-qc produced NaN"):
        check_scores(np.array([[0.1, np.nan]]), np.array([2]), "learned-qc")
    with pytest.raises(JudgeError, match="NaN/inf"):
        check_scores(np.array([[0.1, np.inf]]), np.array([2]), "entropy")
    constant, single = check_scores(np.array([[0.3, 0.3], [0.2, np.nan]]), np.array([2, 1]), "x")
    assert constant == [0] and single == [1]

    proposals, truth = _corrupted_set(n=2)
    single_slot = _write_bank(tmp_path / "k1", [m[:1] for m in proposals.mask_sets])
    with pytest.raises(RndpoError, match="K = 1"):
        run_judge("agreement", single_slot)
    empty = Proposals([], [], num_classes=2, k_max=4, case_ids=[])
    with pytest.raises(RndpoError, match="empty"):
        run_judge("agreement", empty)
    with pytest.raises(RndpoError, match="truth"):
        run_judge("oracle", proposals)
    with pytest.raises(DataError, match="ground truth has shape"):
        run_judge("oracle", proposals, truth=truth[:, :16])
    with pytest.raises(DataError, match="images have shape"):
        run_judge("entropy", proposals, images=np.zeros((2, 1, 16, 16), np.float32), model=Fixed())
    with pytest.raises(RndpoError, match="base model"):
        run_judge("entropy", proposals, images=np.zeros((2, 1, SIZE, SIZE), np.float32))

    class Downsample(nn.Module):
        def forward(self, x):
            return x[:, :1, ::2, ::2]

    with pytest.raises(DataError, match="does not match the image batch"):
        run_judge("entropy", proposals, images=np.zeros((2, 1, SIZE, SIZE), np.float32), model=Downsample())
    with pytest.raises(RndpoError, match="labeled data"):
        run_judge("learned-qc", proposals, images=np.zeros((2, 1, SIZE, SIZE), np.float32))


# ---------------------------------------------------------------------------------------- audit
def test_audit_known_answers_and_pairs(tmp_path):
    proposals, truth = _corrupted_set(n=10, k=5)
    bank = _write_bank(tmp_path / "bank", proposals.mask_sets)
    true_dice = proposal_dice(bank, truth)
    reverse = audit_judge(-true_dice, true_dice)
    assert reverse["pairwise_accuracy"] == 0.0 and reverse["spearman_pooled"] == pytest.approx(-1.0)
    assert reverse["top1_regret"] > 0 and reverse["top1_hit_rate"] < 1
    constant = audit_judge(np.where(np.isnan(true_dice), np.nan, 0.5), true_dice)
    assert constant["pairwise_accuracy"] == 0.5 and constant["judge_tie_rate"] == 1.0 and np.isnan(constant["spearman_pooled"])

    noisy = run_judge("oracle+gaussian:0.2", bank, truth=truth, rng=0).scores
    pairs = mine_pairs(noisy, bank, MiningConfig(strategy="all-pairs"))
    audit = audit_judge(noisy, true_dice, pairs)
    outcome = pair_outcomes(pairs, true_dice)
    right, wrong = int(outcome["right"].sum()), int(outcome["wrong"].sum())
    assert audit["pairs"]["count"] == len(pairs) and audit["pairs"]["fraction_correct"] == pytest.approx(right / (right + wrong))
    assert audit["pairs"]["effective_flip_rate"] == pytest.approx(1 - right / (right + wrong))
    assert audit["pairs"]["region_right"]["count"] == right and audit["pairs"]["region_wrong"]["count"] == wrong
    perfect = mine_pairs(true_dice, bank, MiningConfig(strategy="all-pairs"))
    assert audit_judge(true_dice, true_dice, perfect)["pairs"]["fraction_correct"] == 1.0
    png = plot_region_histogram({"oracle+gaussian:0.2": outcome, "oracle": pair_outcomes(perfect, true_dice)}, tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RndpoError, match="same"):
        audit_judge(noisy[:, :2], true_dice)


# ---------------------------------------------------------------------------------------- CLI
def test_cli_propose_judge_audit(tmp_path, capsys):
    from rndpo.bank import load_scores
    from rndpo.cli import main
    from rndpo.data import Splits
    from rndpo.io import read_json
    from rndpo.training.checkpoint import model_meta, save_model

    data = make_synthetic(SyntheticConfig(n_images=24, size=SIZE, seed=4))
    _write_folder(tmp_path / "data", data)
    dataset = load_dataset(DataConfig(path=str(tmp_path / "data"), size=SIZE))
    ids = dataset.case_ids
    Splits(labeled=ids[:8], pool=ids[8:16], val=ids[16:21], test=ids[21:]).save(tmp_path / "splits.json")
    model_cfg = ModelConfig(channels=(4, 8), dropout=0.2)
    torch.manual_seed(0)
    network = build_model(model_cfg, spatial_dims=2, in_channels=1, num_classes=2)
    save_model(tmp_path / "base" / "best.safetensors", network, model_meta(model_cfg, dataset))
    common = ["--data", str(tmp_path / "data"), "--splits", str(tmp_path / "splits.json")]

    assert main(["propose", "--model", str(tmp_path / "base"), *common, "--out", str(tmp_path / "bank"), "--mc-dropout", "2"]) == 0
    bank = ProposalBank.open(tmp_path / "bank")
    assert len(bank) == 8 and bank.meta["split"] == "pool" and "proposals per second" in capsys.readouterr().out
    for spec in ("agreement", "oracle+flip:0.1", "entropy"):
        args = ["judge", "--bank", str(tmp_path / "bank"), "--judge", spec, "--out", str(tmp_path / f"{spec}.npy"),
                "--entropy-passes", "2"]
        assert main(args) == 0, capsys.readouterr().err
        scores, meta = load_scores(tmp_path / f"{spec}.npy")
        assert scores.shape == (8, bank.k_max) and meta["judge_config"]["name"] == spec.split("+")[0]
        assert meta["judge"] == spec
    assert "--flip-prob 0.1" in capsys.readouterr().out
    assert main(["judge", "--bank", str(tmp_path / "bank"), "--judge", "oracle+gaussian:-1", "--out", str(tmp_path / "x")]) == 1
    assert "gaussian σ must be >= 0" in capsys.readouterr().err

    args = ["audit", "--model", str(tmp_path / "base"), *common, "--out", str(tmp_path / "audit"), "--judge", "oracle",
            "--judge", "agreement", "--judge", "learned-qc", "--qc-epochs", "1", "--mc-dropout", "2"]
    assert main(args) == 0, capsys.readouterr().err
    summary = read_json(tmp_path / "audit" / "audit.json")
    assert set(summary["judges"]) == {"oracle", "agreement", "learned-qc"}
    assert summary["judges"]["oracle"]["pairwise_accuracy"] == 1.0 and summary["judges"]["oracle"]["top1_regret"] == 0.0
    assert (tmp_path / "audit" / "audit_regions.png").read_bytes()[:4] == b"\x89PNG"
    assert "judge audit on val" in capsys.readouterr().out
