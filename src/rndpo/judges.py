"""Judges: quality-control (QC) scores for every proposal of every image, their noise models, and
the audit of a judge against ground truth.

A judge maps a proposal bank (``N`` images, up to ``K`` proposals each) to scores ``(N, K)``, higher =
better, NaN exactly in the empty slots (``k >= K_i``). Judges (names of :class:`~rndpo.config.JudgeConfig`):

``oracle``
    true Dice of each proposal with the ground truth (the only judge that reads it; an upper bound
    and a controlled noise source). Noise models: ``gaussian:σ`` adds ``N(0, σ²)`` to every score
    (seeded); ``size-bias:b`` adds ``b ×`` the proposal's foreground fraction; ``flip:p`` leaves the
    scores alone and is applied at mining time (each pair's orientation flipped with probability
    ``p``, see :func:`judge_flip_prob`).
``agreement``
    consensus among the proposals of an image: each proposal's mean Dice with the other proposals
    (``agreement_mode="mean-dice"``) or its Dice with the majority vote of the others (``"majority"``).
``entropy``
    the base model's MC-dropout uncertainty: predictive entropy of the mean probabilities of
    ``entropy_passes`` stochastic passes (normalised to [0, 1]), averaged over the proposal's
    foreground (``entropy_region="foreground"``) or over a band of half-width ``boundary_width``
    around its contour (``"boundary"``); score = − that mean (lower uncertainty scores higher). An
    empty region scores −1, the worst. The map is recomputed from the model (nothing is stored
    beside the bank). Known bias: with ``foreground`` a shrunken mask sits in the confident core and
    scores well; the audit measures how much this matters.
``learned-qc``
    a small CNN regressor ``(image, mask) → predicted Dice`` (:class:`QCNet`), trained only on the
    labeled split (:func:`train_qc_model`) on the base model's proposals and synthetic corruptions
    (erosion, dilation, shifts, holes, false blobs) of the labeled masks, early-stopped on the labeled
    validation split; saved as ``.safetensors`` + ``.json``.
``ensemble``
    mean over members of the within-image rank, normalised to [0, 1].

Dice convention (here and in the audit): per foreground class ``2|A∩B| / (|A| + |B|)``, averaged over
the classes present in either mask; two masks without any foreground have Dice 1.

Every judge's output is checked (:func:`check_scores`): NaN/inf in a valid slot raise an error
naming the judge; an image whose valid scores are all equal is reported in
:attr:`JudgeReport.constant_images` (every pair of that image is a tie, which mining drops).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats
from torch import nn

from rndpo.config import JudgeConfig, ProposalConfig
from rndpo.errors import CheckpointError, DataError, RndpoError
from rndpo.io import atomic_path, read_json, to_jsonable
from rndpo.models import has_dropout, logits_to_probs
from rndpo.proposals import ball, forward_logits, morph_labels, propose
from rndpo.training.loop import derive_seed

__all__ = [
    "JudgeError",
    "JudgeReport",
    "score",
    "run_judge",
    "judge_flip_prob",
    "parse_noise",
    "check_scores",
    "dice_matrix",
    "proposal_dice",
    "oracle_scores",
    "agreement_scores",
    "predictive_entropy",
    "entropy_scores",
    "ensemble_scores",
    "QCNet",
    "corrupt_mask",
    "qc_samples",
    "train_qc_model",
    "save_qc_model",
    "load_qc_model",
    "qc_scores",
    "audit_judge",
    "pair_outcomes",
    "plot_region_histogram",
]


class JudgeError(RndpoError):
    """A judge produced unusable scores (NaN / inf in a valid slot); the message names the judge."""


class ProposalSource(Protocol):
    """What the judges read: :class:`rndpo.bank.ProposalBank` or :class:`rndpo.proposals.Proposals`."""

    num_classes: int
    k_max: int
    spatial_shape: tuple[int, ...]
    case_ids: list[str]

    def __len__(self) -> int: ...
    def masks(self, case_index: int) -> np.ndarray: ...
    @property
    def num_proposals(self) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------


def dice_matrix(first: np.ndarray, second: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice between every mask of ``first`` and every mask of ``second``.

    Args:
        first: ``(A, *spatial)`` integer label maps in ``[0, num_classes)``.
        second: ``(B, *spatial)`` label maps of the same spatial shape.
        num_classes: classes including background (binary: 2).

    Returns:
        ``(A, B)`` float64 Dice: mean over the foreground classes present in either mask of the pair;
        1 for two masks without foreground.
    """
    first = np.asarray(first)
    second = np.asarray(second)
    if first.shape[1:] != second.shape[1:]:
        raise ValueError(f"dice_matrix: spatial shapes differ, {first.shape[1:]} vs {second.shape[1:]}")
    a = first.reshape(len(first), -1)
    b = second.reshape(len(second), -1)
    dtype = np.float32 if a.shape[1] < 2**24 else np.float64  # exact integer counts either way
    total = np.zeros((len(a), len(b)))
    present = np.zeros((len(a), len(b)))
    for c in range(1, max(int(num_classes), 2)):
        fa = (a == c).astype(dtype)
        fb = (b == c).astype(dtype)
        inter = (fa @ fb.T).astype(np.float64)
        sizes = fa.sum(axis=1, dtype=np.float64)[:, None] + fb.sum(axis=1, dtype=np.float64)[None, :]
        here = sizes > 0
        total += np.where(here, 2.0 * inter / np.where(here, sizes, 1.0), 0.0)
        present += here
    return np.where(present > 0, total / np.maximum(present, 1.0), 1.0)


def _check_source(bank: ProposalSource, label: str) -> None:
    if len(bank) == 0:
        raise RndpoError(f"judge {label}: the proposal bank is empty (empty pool)")
    if bank.k_max < 2:
        raise RndpoError(f"judge {label}: the bank has K = {bank.k_max} proposal slot per image; pairs need K >= 2")


def _empty_scores(bank: ProposalSource) -> np.ndarray:
    return np.full((len(bank), bank.k_max), np.nan, dtype=np.float64)


def _check_truth(truth: np.ndarray | None, bank: ProposalSource, label: str) -> np.ndarray:
    if truth is None:
        raise RndpoError(f"judge {label} needs the ground-truth masks of the bank's images (truth=...)")
    truth = np.asarray(truth)
    expected = (len(bank), *bank.spatial_shape)
    if truth.shape != expected:
        raise DataError(f"judge {label}: ground truth has shape {truth.shape}, the bank needs {expected}")
    return truth


def proposal_dice(bank: ProposalSource, truth: np.ndarray) -> np.ndarray:
    """True Dice ``(N, K)`` of every proposal with the ground truth ``(N, *spatial)``; NaN in empty slots."""
    truth = _check_truth(truth, bank, "oracle")
    dice = _empty_scores(bank)
    for i in range(len(bank)):
        masks = bank.masks(i)
        dice[i, : len(masks)] = dice_matrix(masks, truth[i : i + 1], bank.num_classes)[:, 0]
    return dice


# ----------------------------------------------------------------------------------------------
# oracle and its noise models
# ----------------------------------------------------------------------------------------------


def parse_noise(noise: str | None) -> tuple[str | None, float]:
    """``"gaussian:0.1"`` → ``("gaussian", 0.1)``; ``None`` → ``(None, 0.0)``."""
    if not noise:
        return None, 0.0
    kind, _, level = noise.partition(":")
    return kind, float(level)


def judge_flip_prob(cfg: JudgeConfig) -> float:
    """Probability with which mining flips each pair's orientation: ``p`` of ``oracle+flip:p``, else 0."""
    kind, level = parse_noise(cfg.noise)
    return level if kind == "flip" else 0.0


def oracle_scores(
    bank: ProposalSource,
    truth: np.ndarray,
    noise: str | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Oracle judge: true Dice with the ground truth, plus an optional noise model.

    Args:
        bank: proposals.
        truth: ``(N, *spatial)`` ground-truth label maps of the bank's images.
        noise: ``None``, ``gaussian:σ``, ``size-bias:b`` or ``flip:p`` (flip: scores unchanged).
        rng: generator of the gaussian noise.

    Returns:
        ``(N, K)`` scores, NaN in empty slots.
    """
    scores = proposal_dice(bank, truth)
    kind, level = parse_noise(noise)
    valid = ~np.isnan(scores)
    if kind == "gaussian" and level > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        scores[valid] += rng.normal(0.0, level, size=int(valid.sum()))
    elif kind == "size-bias":
        for i in range(len(bank)):
            masks = bank.masks(i)
            scores[i, : len(masks)] += level * (masks.reshape(len(masks), -1) > 0).mean(axis=1)
    return scores


# ----------------------------------------------------------------------------------------------
# agreement
# ----------------------------------------------------------------------------------------------


def _majority_of_others(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """For each proposal k, the per-pixel majority vote of the other proposals (ties → lower class)."""
    k = len(masks)
    flat = masks.reshape(k, -1).astype(np.int64)
    if num_classes <= 2:
        foreground = flat > 0
        others = foreground.sum(axis=0)[None, :] - foreground
        votes = (2 * others > (k - 1)).astype(np.uint8)
    else:
        onehot = np.eye(num_classes, dtype=np.int32)[flat]  # (K, P, C)
        others = onehot.sum(axis=0)[None] - onehot
        votes = others.argmax(axis=-1).astype(np.uint8)
    return votes.reshape(masks.shape)


def agreement_scores(bank: ProposalSource, mode: str = "mean-dice") -> np.ndarray:
    """Agreement judge: consensus of each proposal with the other proposals of its image.

    Args:
        bank: proposals.
        mode: ``mean-dice`` (mean Dice with each other proposal) or ``majority`` (Dice with the
            majority vote of the others).

    Returns:
        ``(N, K)`` scores in [0, 1], NaN in empty slots; an image with a single proposal scores 1.
    """
    if mode not in {"mean-dice", "majority"}:
        raise ValueError(f"agreement mode must be 'mean-dice' or 'majority', got {mode!r}")
    scores = _empty_scores(bank)
    for i in range(len(bank)):
        masks = bank.masks(i)
        k = len(masks)
        if k == 1:
            scores[i, 0] = 1.0
        elif mode == "mean-dice":
            pairwise = dice_matrix(masks, masks, bank.num_classes)
            scores[i, :k] = (pairwise.sum(axis=1) - np.diag(pairwise)) / (k - 1)
        else:
            votes = _majority_of_others(masks, bank.num_classes)
            scores[i, :k] = [dice_matrix(masks[j : j + 1], votes[j : j + 1], bank.num_classes)[0, 0] for j in range(k)]
    return scores


# ----------------------------------------------------------------------------------------------
# entropy
# ----------------------------------------------------------------------------------------------


def predictive_entropy(
    model: nn.Module, images: np.ndarray | torch.Tensor, *, passes: int = 8, batch_size: int = 32, seed: int = 0
) -> np.ndarray:
    """Predictive entropy of the base model under MC dropout, normalised to [0, 1].

    ``H = −Σ_c p̄_c log p̄_c / log C`` of the mean probabilities ``p̄`` over ``passes`` stochastic passes
    (binary: the two classes ``sigmoid(z)``, ``1 − sigmoid(z)``). A model without dropout gives the
    entropy of its deterministic prediction.

    Args:
        model: base segmenter.
        images: ``(N, C_in, *spatial)`` float32.
        passes: stochastic passes (>= 1).
        batch_size: images per forward pass.
        seed: seed of the dropout masks (the global torch RNG is untouched).

    Returns:
        ``(N, *spatial)`` float32 in [0, 1].
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if not has_dropout(model):
        passes = 1
    out = []
    for start in range(0, int(images.shape[0]), batch_size):
        x = images[start : start + batch_size]
        x = x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        mean = None
        for t in range(passes):
            z = forward_logits(model, x, what="entropy judge", dropout=passes > 1, seed=derive_seed(seed, start, t))
            probs = logits_to_probs(z)
            mean = probs if mean is None else mean + probs
        mean = mean / passes
        if mean.shape[1] == 1:
            mean = torch.cat([1.0 - mean, mean], dim=1)
        entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum(dim=1) / math.log(mean.shape[1])
        out.append(entropy.clamp(0.0, 1.0).numpy().astype(np.float32))
    return np.concatenate(out, axis=0)


def _boundary_band(masks: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a label change, for each mask of ``masks (K, *spatial)``."""
    footprint = ball(width, masks.ndim - 1)[None]
    return ndimage.grey_dilation(masks, footprint=footprint) != ndimage.grey_erosion(masks, footprint=footprint)


def entropy_scores(bank: ProposalSource, entropy: np.ndarray, *, region: str = "foreground", width: int = 2) -> np.ndarray:
    """Entropy judge from a precomputed uncertainty map.

    Args:
        bank: proposals.
        entropy: ``(N, *spatial)`` normalised predictive entropy (:func:`predictive_entropy`).
        region: ``foreground`` (the proposal's foreground pixels) or ``boundary`` (a band of half-width
            ``width`` around the proposal's contour).
        width: band half-width in pixels.

    Returns:
        ``(N, K)`` scores ``−mean entropy over the region`` in [−1, 0]; an empty region scores −1.
    """
    if region not in {"foreground", "boundary"}:
        raise ValueError(f"entropy region must be 'foreground' or 'boundary', got {region!r}")
    entropy = np.asarray(entropy)
    expected = (len(bank), *bank.spatial_shape)
    if entropy.shape != expected:
        raise DataError(f"judge entropy: uncertainty map has shape {entropy.shape}, the bank needs {expected}")
    scores = _empty_scores(bank)
    for i in range(len(bank)):
        masks = bank.masks(i)
        where = masks > 0 if region == "foreground" else _boundary_band(masks, width)
        flat = where.reshape(len(masks), -1)
        pixels = flat.sum(axis=1)
        total = flat.astype(np.float32) @ entropy[i].reshape(-1)
        scores[i, : len(masks)] = np.where(pixels > 0, -total / np.maximum(pixels, 1), -1.0)
    return scores


# ----------------------------------------------------------------------------------------------
# ensemble
# ----------------------------------------------------------------------------------------------


def ensemble_scores(member_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Mean within-image rank over judges.

    Args:
        member_scores: ``(N, K)`` score arrays of the members (NaN in the same empty slots).

    Returns:
        ``(N, K)`` mean normalised rank in [0, 1] (1: ranked best by every member; ties share the
        average rank; an image with one proposal scores 0.5), NaN in empty slots.
    """
    if len(member_scores) < 1:
        raise ValueError("ensemble_scores needs at least one member")
    shape = np.shape(member_scores[0])
    if any(np.shape(s) != shape for s in member_scores):
        raise ValueError(f"ensemble members have different shapes: {[np.shape(s) for s in member_scores]}")
    valid = ~np.isnan(member_scores[0])
    ranks = np.full(shape, np.nan)
    for i in range(shape[0]):
        k = int(valid[i].sum())
        if k == 0:
            continue
        if k == 1:
            ranks[i, valid[i]] = 0.5
            continue
        ranks[i, valid[i]] = np.mean(
            [(stats.rankdata(s[i, valid[i]], method="average") - 1.0) / (k - 1) for s in member_scores], axis=0
        )
    return ranks


# ----------------------------------------------------------------------------------------------
# learned QC
# ----------------------------------------------------------------------------------------------


class QCNet(nn.Module):
    """Small CNN regressor of segmentation quality: ``(image, mask) → predicted Dice`` (as a logit).

    Input ``(B, C_in + M, *spatial)``: the image channels followed by the mask's foreground channels
    (``M = 1`` for binary, ``C − 1`` one-hot channels for ``C`` classes), at ``qc_size`` per side.
    Four levels of (stride-2 convolution, convolution), global mean and max pooling, two linear
    layers: about 7 MFLOP per 64² sample, so it trains in seconds per epoch on a CPU.

    Args:
        in_channels: ``C_in + M``.
        spatial_dims: 2 or 3.
        width: features of the first level (doubling per level).
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, width: int = 8) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        layers: list[nn.Module] = []
        channels = in_channels
        for level in range(4):
            out = width * 2**level
            layers += [conv(channels, out, 3, stride=2, padding=1), norm(out), nn.LeakyReLU(0.1),
                       conv(out, out, 3, padding=1), norm(out), nn.LeakyReLU(0.1)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * channels, 32), nn.LeakyReLU(0.1), nn.Linear(32, 1))
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *spatial)`` → ``(B,)`` logits of the predicted Dice."""
        h = self.features(x).flatten(2)
        return self.head(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))[:, 0]


def _qc_inputs(images: np.ndarray, masks: np.ndarray, num_classes: int, size: int) -> torch.Tensor:
    """Stack ``images (n, C_in, *spatial)`` and ``masks (n, *spatial)`` at ``size`` per side.

    Images are resampled (bi/trilinear), the masks' foreground channels area-averaged (a thin
    structure stays visible as a fractional value).
    """
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(masks).astype(np.int64))
    if num_classes <= 2:
        onehot = (labels > 0).float()[:, None]
    else:
        onehot = F.one_hot(labels, num_classes).movedim(-1, 1)[:, 1:].float()
    dims = x.ndim - 2
    target = (size,) * dims
    if tuple(x.shape[2:]) != target:
        x = F.interpolate(x, size=target, mode="bilinear" if dims == 2 else "trilinear", align_corners=False)
        onehot = F.adaptive_avg_pool2d(onehot, target) if dims == 2 else F.adaptive_avg_pool3d(onehot, target)
    return torch.cat([x, onehot], dim=1)


def corrupt_mask(mask: np.ndarray, rng: np.random.Generator, num_classes: int = 2) -> tuple[np.ndarray, str]:
    """A synthetic corruption of one label map: erosion, dilation, shift, holes or false blobs
    (one, or two composed, chosen at random; sizes scaled to the image).

    Args:
        mask: ``(*spatial)`` label map.
        rng: random generator.
        num_classes: classes including background.

    Returns:
        ``(corrupted (*spatial) uint8, description such as "dilate:3+holes:2")``.
    """
    mask = np.asarray(mask).astype(np.uint8)
    side = min(mask.shape)
    dims = mask.ndim
    out = mask.copy()
    kinds = []
    for _ in range(1 if rng.random() < 0.6 else 2):
        kind = str(rng.choice(["erode", "dilate", "shift", "holes", "blobs"]))
        if kind in {"erode", "dilate"}:
            radius = int(rng.integers(1, max(2, side // 12) + 1))
            out = morph_labels(out[None], kind, radius, num_classes)[0]
            kinds.append(f"{kind}:{radius}")
        elif kind == "shift":
            offsets = rng.integers(-max(1, side // 10), max(1, side // 10) + 1, size=dims)
            out = ndimage.shift(out, offsets, order=0, mode="constant", cval=0).astype(np.uint8)
            kinds.append("shift:" + ",".join(str(int(o)) for o in offsets))
        else:
            count = int(rng.integers(1, 4))
            grid = np.indices(mask.shape)
            foreground = np.argwhere(out > 0)
            for _ in range(count):
                radius = rng.uniform(side / 24, side / 8)
                if kind == "holes":
                    if not len(foreground):
                        break
                    centre = foreground[rng.integers(len(foreground))]
                else:
                    centre = rng.integers(0, mask.shape)
                disk = ((grid - np.reshape(centre, (-1,) + (1,) * dims)) ** 2).sum(axis=0) <= radius**2
                out[disk] = 0 if kind == "holes" else int(rng.integers(1, max(num_classes, 2)))
            kinds.append(f"{kind}:{count}")
    return out, "+".join(kinds)


def qc_samples(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    num_classes: int,
    rng: np.random.Generator,
    corruptions: int = 8,
    proposals: ProposalSource | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training samples of the QC regressor from labeled images.

    For every image: its true mask (Dice 1), ``corruptions`` corruptions (:func:`corrupt_mask`), half of
    the true mask and half of the base prediction when ``proposals`` are given, and every proposal.

    Args:
        images: ``(n, C_in, *spatial)``.
        masks: ``(n, *spatial)`` ground truth.
        num_classes: classes including background.
        rng: random generator.
        corruptions: corruptions per image.
        proposals: the base model's proposals of the same images (optional).

    Returns:
        ``(image_index (S,) int64, candidates (S, *spatial) uint8, dice (S,) float32)``.
    """
    index, candidates, targets = [], [], []
    for i in range(len(images)):
        truth = np.asarray(masks[i]).astype(np.uint8)
        own = [truth]
        base = proposals.masks(i) if proposals is not None else np.zeros((0, *truth.shape), np.uint8)
        sources = [truth, base[0]] if len(base) else [truth]
        own += [corrupt_mask(sources[j % len(sources)], rng, num_classes)[0] for j in range(corruptions)]
        own += list(base)
        stacked = np.stack(own)
        candidates.append(stacked)
        targets.append(dice_matrix(stacked, truth[None], num_classes)[:, 0])
        index.append(np.full(len(stacked), i, dtype=np.int64))
    return np.concatenate(index), np.concatenate(candidates), np.concatenate(targets).astype(np.float32)


@dataclass
class _QCSet:
    inputs: torch.Tensor
    targets: torch.Tensor


def _qc_set(data: Any, *, cfg: JudgeConfig, num_classes: int, model: nn.Module | None,
            proposal_cfg: ProposalConfig, rng: np.random.Generator, name: str) -> _QCSet:
    images = np.asarray(data.images)
    masks = getattr(data, "masks", None)
    if masks is None:
        raise DataError(f"learned-qc: the {name} split has no masks (it must be labeled)")
    if len(images) == 0:
        raise RndpoError(f"learned-qc: the {name} split is empty")
    proposals = None
    if model is not None:
        if not has_dropout(model):
            proposal_cfg = proposal_cfg.model_copy(update={"mc_dropout": 0})
        proposals = propose(model, images, proposal_cfg)
    index, candidates, targets = qc_samples(images, np.asarray(masks), num_classes=num_classes, rng=rng,
                                            corruptions=cfg.qc_corruptions, proposals=proposals)
    inputs = torch.cat([_qc_inputs(images[index[s : s + 256]], candidates[s : s + 256], num_classes, cfg.qc_size)
                        for s in range(0, len(index), 256)])
    return _QCSet(inputs, torch.from_numpy(targets))


def train_qc_model(
    labeled: Any,
    val: Any,
    *,
    cfg: JudgeConfig,
    model: nn.Module | None = None,
    proposal_cfg: ProposalConfig | None = None,
    out_path: str | Path | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    progress: bool = False,
) -> tuple[QCNet, dict]:
    """Train the ``learned-qc`` regressor on the labeled split, early-stopped on the labeled validation split.

    Samples (:func:`qc_samples`): the true masks, synthetic corruptions of them, and the base model's
    proposals of the labeled images (when ``model`` is given), each with its true Dice as target.
    Loss: binary cross-entropy of the predicted Dice against the true Dice; random flips as
    augmentation; the weights of the epoch with the lowest validation loss are kept.

    Args:
        labeled: the labeled training split (``images (n, C_in, *spatial)``, ``masks (n, *spatial)``,
            ``num_classes``), e.g. a :class:`rndpo.data.SegDataset`.
        val: the labeled validation split (same fields).
        cfg: ``qc_epochs``, ``qc_patience``, ``qc_size``, ``qc_corruptions``, ``seed``.
        model: base segmenter whose proposals are added to the samples (optional).
        proposal_cfg: proposal generators for those (default: :class:`ProposalConfig`).
        out_path: save the regressor there (``.safetensors`` + ``.json``).
        batch_size, lr: optimiser settings (AdamW).
        progress: show a rich progress bar.

    Returns:
        ``(qc_model in eval mode, history)``; history holds per-epoch train/val loss, best epoch, samples.
    """
    from rich.progress import Progress

    num_classes = int(getattr(labeled, "num_classes", 2))
    rng = np.random.default_rng(cfg.seed)
    proposal_cfg = proposal_cfg or ProposalConfig()
    train_set = _qc_set(labeled, cfg=cfg, num_classes=num_classes, model=model, proposal_cfg=proposal_cfg, rng=rng, name="labeled")
    val_set = _qc_set(val, cfg=cfg, num_classes=num_classes, model=model, proposal_cfg=proposal_cfg, rng=rng, name="validation")
    spatial_dims = train_set.inputs.ndim - 2
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        qc = QCNet(train_set.inputs.shape[1], spatial_dims=spatial_dims)
    optimizer = torch.optim.AdamW(qc.parameters(), lr=lr, weight_decay=1e-4)
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "val_spearman": [], "best_epoch": -1,
                               "train_samples": len(train_set.targets), "val_samples": len(val_set.targets)}
    best_loss, best_state, waited = float("inf"), None, 0
    start = time.perf_counter()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("learned-qc", total=cfg.qc_epochs)
        for epoch in range(cfg.qc_epochs):
            qc.train()
            order = torch.randperm(len(train_set.targets), generator=generator)
            total = 0.0
            for begin in range(0, len(order), batch_size):
                batch = order[begin : begin + batch_size]
                if len(batch) < 2:
                    continue
                x = train_set.inputs[batch]
                for axis in range(2, x.ndim):
                    if torch.rand((), generator=generator) < 0.5:
                        x = torch.flip(x, dims=(axis,))
                loss = F.binary_cross_entropy_with_logits(qc(x), train_set.targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            predicted = _qc_predict(qc, val_set.inputs)
            val_loss = float(F.binary_cross_entropy(predicted.clamp(1e-6, 1 - 1e-6), val_set.targets))
            history["train_loss"].append(total / len(order))
            history["val_loss"].append(val_loss)
            history["val_spearman"].append(float(stats.spearmanr(predicted.numpy(), val_set.targets.numpy())[0]))
            bar.advance(task)
            if val_loss < best_loss - 1e-5:
                best_loss, waited, history["best_epoch"] = val_loss, 0, epoch
                best_state = {k: v.detach().clone() for k, v in qc.state_dict().items()}
            else:
                waited += 1
                if waited >= cfg.qc_patience:
                    break
    if best_state is not None:
        qc.load_state_dict(best_state)
    qc.eval()
    history["seconds"] = time.perf_counter() - start
    history.update(num_classes=num_classes, qc_size=cfg.qc_size)
    if out_path is not None:
        save_qc_model(out_path, qc, {"num_classes": num_classes, "qc_size": cfg.qc_size, "history": history})
    return qc, history


def _qc_predict(qc: QCNet, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    qc.eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(qc(inputs[s : s + batch_size])) for s in range(0, len(inputs), batch_size)]) \
            if len(inputs) else torch.zeros(0)


def save_qc_model(path: str | Path, qc: QCNet, meta: dict) -> Path:
    """Save the regressor as ``path`` (``.safetensors``) plus a ``.json`` sidecar (architecture, ``meta``)."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in qc.state_dict().items()}, str(tmp))
    sidecar = {"kind": "rndpo-learned-qc", "in_channels": qc.in_channels, "spatial_dims": qc.spatial_dims,
               "width": qc.width, **meta}
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(to_jsonable(sidecar), indent=1, allow_nan=False) + "\n")
    return path


def load_qc_model(path: str | Path) -> tuple[QCNet, dict]:
    """Load a regressor saved by :func:`save_qc_model`; returns ``(qc_model in eval mode, sidecar)``.

    Raises:
        CheckpointError: a missing file, a sidecar of another kind, or weights that do not fit.
    """
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    sidecar_path = path.with_suffix(".json")
    for file in (path, sidecar_path):
        if not file.is_file():
            raise CheckpointError(f"learned-qc model file missing: {file}")
    meta = read_json(sidecar_path)
    if meta.get("kind") != "rndpo-learned-qc":
        raise CheckpointError(f"{sidecar_path} does not describe a learned-qc model")
    qc = QCNet(int(meta["in_channels"]), spatial_dims=int(meta["spatial_dims"]), width=int(meta["width"]))
    try:
        qc.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"learned-qc weights {path} do not fit the architecture in {sidecar_path}: {error}") from None
    qc.eval()
    return qc, meta


def qc_scores(qc: QCNet, bank: ProposalSource, images: np.ndarray, *, qc_size: int) -> np.ndarray:
    """Learned-QC judge: predicted Dice ``(N, K)`` of every proposal (NaN in empty slots).

    Args:
        qc: trained regressor (:func:`train_qc_model` / :func:`load_qc_model`).
        bank: proposals.
        images: ``(N, C_in, *spatial)`` the bank's images.
        qc_size: the regressor's input side.
    """
    masks_channels = 1 if bank.num_classes <= 2 else bank.num_classes - 1
    if qc.in_channels != images.shape[1] + masks_channels:
        raise CheckpointError(
            f"judge learned-qc: the regressor takes {qc.in_channels} channels, the data give "
            f"{images.shape[1]} image + {masks_channels} mask channels"
        )
    scores = _empty_scores(bank)
    for i in range(len(bank)):
        masks = bank.masks(i)
        inputs = _qc_inputs(np.repeat(images[i : i + 1], len(masks), axis=0), masks, bank.num_classes, qc_size)
        scores[i, : len(masks)] = _qc_predict(qc, inputs).numpy()
    return scores


# ----------------------------------------------------------------------------------------------
# running a judge
# ----------------------------------------------------------------------------------------------


@dataclass
class JudgeReport:
    """Scores of one judge and what was noticed about them.

    Attributes:
        label: the judge (``oracle+gaussian:0.1``).
        scores: ``(N, K)`` float64, higher = better, NaN in empty slots.
        flip_prob: pair-orientation flip probability for mining (``flip:p``), else 0.
        constant_images: images with ``K_i >= 2`` whose scores are all equal (every pair a tie).
        single_images: images with one proposal (no pair possible).
        seconds: wall time of the judge.
        info: judge-specific facts (e.g. the learned-qc training history).
    """

    label: str
    scores: np.ndarray
    flip_prob: float = 0.0
    constant_images: list[int] = field(default_factory=list)
    single_images: list[int] = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def warnings(self) -> dict[str, Any]:
        """Problems worth telling the user about (empty when none)."""
        out: dict[str, Any] = {}
        if self.constant_images:
            out["constant_images"] = {
                "count": len(self.constant_images), "first": self.constant_images[:10],
                "message": f"judge {self.label} gives identical scores to all proposals of "
                           f"{len(self.constant_images)} image(s): every pair of those images is a tie",
            }
        return out

    def summary(self) -> dict[str, Any]:
        return {"judge": self.label, "images": int(self.scores.shape[0]), "k_max": int(self.scores.shape[1]),
                "flip_prob": self.flip_prob, "constant_images": len(self.constant_images),
                "single_images": len(self.single_images), "seconds": round(self.seconds, 3),
                "warnings": self.warnings, **{k: v for k, v in self.info.items() if k != "qc_history"}}


def check_scores(scores: np.ndarray, num_proposals: np.ndarray, label: str) -> tuple[list[int], list[int]]:
    """Validate judge scores against the slots of the bank.

    Args:
        scores: ``(N, K)`` scores.
        num_proposals: ``(N,)`` valid proposals per image (slots ``k < K_i``).
        label: the judge, named in errors.

    Returns:
        ``(constant_images, single_images)`` index lists.

    Raises:
        JudgeError: wrong shape, or NaN / inf in a valid slot.
    """
    scores = np.asarray(scores, dtype=np.float64)
    num_proposals = np.asarray(num_proposals)
    if scores.ndim != 2 or scores.shape[0] != len(num_proposals):
        raise JudgeError(f"judge {label} returned scores of shape {scores.shape} for {len(num_proposals)} images")
    valid = np.arange(scores.shape[1])[None, :] < num_proposals[:, None]
    bad = valid & ~np.isfinite(scores)
    if bad.any():
        images = np.unique(np.nonzero(bad)[0])
        kinds = "NaN" if np.isnan(scores[bad]).all() else "NaN/inf"
        raise JudgeError(
            f"judge {label} produced {kinds} scores for {int(bad.sum())} proposal(s) of {len(images)} image(s) "
            f"(first image index: {int(images[0])})"
        )
    filled = np.where(valid, scores, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanmax(filled, axis=1) - np.nanmin(filled, axis=1)
    constant = [int(i) for i in np.flatnonzero((num_proposals >= 2) & (spread == 0))]
    single = [int(i) for i in np.flatnonzero(num_proposals == 1)]
    return constant, single


def _as_rng(rng: np.random.Generator | int | None, seed: int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(seed if rng is None else int(rng))


def _check_images(images: np.ndarray | None, bank: ProposalSource, label: str) -> np.ndarray:
    if images is None:
        raise RndpoError(f"judge {label} needs the images of the bank (images=...)")
    images = np.asarray(images)
    if images.ndim != len(bank.spatial_shape) + 2 or images.shape[0] != len(bank) or tuple(images.shape[2:]) != tuple(bank.spatial_shape):
        raise DataError(
            f"judge {label}: images have shape {images.shape}, the bank needs ({len(bank)}, C_in, "
            f"{', '.join(str(s) for s in bank.spatial_shape)})"
        )
    return images


def run_judge(
    judge_cfg: JudgeConfig | str,
    bank: ProposalSource,
    *,
    images: np.ndarray | None = None,
    model: nn.Module | None = None,
    truth: np.ndarray | None = None,
    labeled_data: tuple[Any, Any] | None = None,
    rng: np.random.Generator | int | None = None,
    qc_out: str | Path | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> JudgeReport:
    """Score every proposal of ``bank`` with one judge (see the module docstring) and check the scores.

    Args:
        judge_cfg: the judge (a :class:`JudgeConfig` or its string form, ``"oracle+gaussian:0.1"``).
        bank: a :class:`rndpo.bank.ProposalBank` (or in-memory :class:`rndpo.proposals.Proposals`).
        images: ``(N, C_in, *spatial)`` images of the bank (``entropy``, ``learned-qc``).
        model: the base segmenter (``entropy``; ``learned-qc`` uses its proposals on labeled images).
        truth: ``(N, *spatial)`` ground truth of the bank's images (``oracle`` only).
        labeled_data: ``(labeled, val)`` labeled splits (``learned-qc`` without ``cfg.qc_model``).
        rng: generator (or seed) of the oracle's gaussian noise; default ``cfg.seed``.
        qc_out: where to save a freshly trained learned-qc regressor.
        batch_size: images per forward pass of the base model.
        progress: show progress bars.

    Returns:
        :class:`JudgeReport`.

    Raises:
        RndpoError: an empty bank, K < 2, a missing input the judge needs, shapes that do not match
            the bank; :class:`JudgeError` for NaN / inf scores.
    """
    cfg = judge_cfg if isinstance(judge_cfg, JudgeConfig) else JudgeConfig.model_validate(judge_cfg)
    label = cfg.label
    _check_source(bank, label)
    start = time.perf_counter()
    info: dict[str, Any] = {}
    if cfg.name == "oracle":
        scores = oracle_scores(bank, truth, cfg.noise, _as_rng(rng, cfg.seed))
    elif cfg.name == "agreement":
        scores = agreement_scores(bank, cfg.agreement_mode)
    elif cfg.name == "entropy":
        images = _check_images(images, bank, label)
        if model is None:
            raise RndpoError(f"judge {label} needs the base model (model=...)")
        if not has_dropout(model):
            info["note"] = "the model has no dropout: entropy of its deterministic prediction"
        entropy = np.concatenate([
            predictive_entropy(model, images[s : s + 256], passes=cfg.entropy_passes, batch_size=batch_size,
                               seed=derive_seed(cfg.seed, s))
            for s in range(0, len(images), 256)
        ])
        scores = entropy_scores(bank, entropy, region=cfg.entropy_region, width=cfg.boundary_width)
    elif cfg.name == "learned-qc":
        images = _check_images(images, bank, label)
        if cfg.qc_model:
            qc, meta = load_qc_model(cfg.qc_model)
            qc_size = int(meta["qc_size"])
            info["qc_model"] = str(cfg.qc_model)
        else:
            if labeled_data is None:
                raise RndpoError(f"judge {label} needs labeled data (labeled_data=(labeled, val)) or a trained qc_model")
            labeled, val = labeled_data
            qc, history = train_qc_model(labeled, val, cfg=cfg, model=model, out_path=qc_out, progress=progress)
            qc_size = cfg.qc_size
            info["qc_history"] = history
            info["qc_best_epoch"] = history["best_epoch"]
            if qc_out is not None:
                info["qc_model"] = str(Path(qc_out).with_suffix(".safetensors"))
        scores = qc_scores(qc, bank, images, qc_size=qc_size)
    elif cfg.name == "ensemble":
        members = [run_judge(member, bank, images=images, model=model, truth=truth, labeled_data=labeled_data,
                             rng=rng, qc_out=qc_out, batch_size=batch_size, progress=progress) for member in cfg.members]
        scores = ensemble_scores([m.scores for m in members])
        info["members"] = [m.summary() for m in members]
    else:  # pragma: no cover - JudgeConfig restricts the names
        raise RndpoError(f"unknown judge {cfg.name!r}")
    constant, single = check_scores(scores, bank.num_proposals, label)
    scores = np.where(np.arange(bank.k_max)[None, :] < np.asarray(bank.num_proposals)[:, None], scores, np.nan)
    return JudgeReport(label=label, scores=scores, flip_prob=judge_flip_prob(cfg), constant_images=constant,
                       single_images=single, seconds=time.perf_counter() - start, info=info)


def score(
    judge_cfg: JudgeConfig | str,
    bank: ProposalSource,
    *,
    images: np.ndarray | None = None,
    model: nn.Module | None = None,
    truth: np.ndarray | None = None,
    labeled_data: tuple[Any, Any] | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Scores ``(N, K)`` of one judge (higher = better, NaN in empty slots); see :func:`run_judge`.

    Images where the judge is constant are reported with a :class:`UserWarning` (use
    :func:`run_judge` for the full :class:`JudgeReport`).
    """
    report = run_judge(judge_cfg, bank, images=images, model=model, truth=truth, labeled_data=labeled_data, rng=rng)
    for problem in report.warnings.values():
        warnings.warn(problem["message"], stacklevel=2)
    return report.scores


# ----------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------


def _pair_column(pairs: Any, name: str) -> np.ndarray:
    if isinstance(pairs, np.ndarray) and pairs.dtype.names:
        return np.asarray(pairs[name])
    if isinstance(pairs, dict):
        return np.asarray(pairs[name])
    return np.asarray(getattr(pairs, name))


def pair_outcomes(pairs: Any, true_dice: np.ndarray) -> dict[str, np.ndarray]:
    """Split mined pairs by whether their chosen mask is truly better.

    Args:
        pairs: mined pairs with columns ``case_index``, ``chosen``, ``rejected``, ``region`` (|D|):
            :class:`rndpo.mining.Pairs`, a structured array or a dict of arrays.
        true_dice: ``(N, K)`` true Dice of every proposal.

    Returns:
        dict of bool masks ``right`` / ``wrong`` / ``tie`` and the ``region`` (|D|) and ``gap``
        (true Dice of chosen − rejected) columns.
    """
    case = _pair_column(pairs, "case_index").astype(np.int64)
    chosen = _pair_column(pairs, "chosen").astype(np.int64)
    rejected = _pair_column(pairs, "rejected").astype(np.int64)
    region = _pair_column(pairs, "region").astype(np.int64)
    gap = true_dice[case, chosen] - true_dice[case, rejected]
    if np.isnan(gap).any():
        raise RndpoError("audit: a mined pair points at an empty proposal slot")
    return {"right": gap > 0, "wrong": gap < 0, "tie": gap == 0, "region": region, "gap": gap}


def _describe(values: np.ndarray) -> dict[str, float | int]:
    if len(values) == 0:
        return {"count": 0}
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"count": int(len(values)), "mean": float(values.mean()), "median": float(q50),
            "q10": float(q10), "q90": float(q90)}


def audit_judge(scores: np.ndarray, true_dice: np.ndarray, pairs: Any = None) -> dict[str, Any]:
    """How well a judge's scores order proposals by their true quality (labeled validation split).

    Args:
        scores: ``(N, K)`` judge scores, NaN in empty slots.
        true_dice: ``(N, K)`` true Dice of the same proposals (:func:`proposal_dice`), NaN in empty slots.
        pairs: optional mined pairs (see :func:`pair_outcomes`).

    Returns:
        dict with

        - ``spearman_pooled``: Spearman ρ over all proposals of all images;
        - ``spearman_within``: mean over images of the within-image ρ (images where either the scores
          or the true Dice are constant have no ρ and are left out; ``spearman_within_images`` counts
          the others);
        - ``pairwise_accuracy``: over all within-image proposal pairs with different true Dice, the
          fraction the judge orders as the true Dice does, a judge tie counting ½
          (``judge_tie_rate`` reports those ties);
        - ``top1_regret``: mean over images of best true Dice − true Dice of the judge's top proposal
          (tied tops averaged); ``top1_dice``, ``best_dice``, ``mean_dice`` and ``top1_hit_rate``;
        - with ``pairs``: ``pairs`` = {``count``, ``fraction_correct`` (chosen truly better, ties
          excluded), ``effective_flip_rate`` = 1 − that, ``ties``, ``region_right`` /
          ``region_wrong``: |D| summaries}.

    Raises:
        RndpoError: shapes differ, or scores are not finite where the true Dice is defined.
    """
    scores = np.asarray(scores, dtype=np.float64)
    true_dice = np.asarray(true_dice, dtype=np.float64)
    if scores.shape != true_dice.shape or scores.ndim != 2:
        raise RndpoError(f"audit: scores {scores.shape} and true_dice {true_dice.shape} must be the same (N, K) shape")
    valid = ~np.isnan(true_dice)
    if (valid & ~np.isfinite(scores)).any():
        raise RndpoError("audit: the judge's scores are NaN/inf where a proposal exists")
    if not valid.any():
        raise RndpoError("audit: no proposals to audit (empty split)")
    pooled = stats.spearmanr(scores[valid], true_dice[valid])[0] if np.ptp(scores[valid]) > 0 and np.ptp(true_dice[valid]) > 0 else np.nan
    within, correct, considered, judge_ties, regrets, top, best, hits = [], 0.0, 0, 0, [], [], [], []
    for i in range(scores.shape[0]):
        s, d = scores[i, valid[i]], true_dice[i, valid[i]]
        if len(s) == 0:
            continue
        tops = s == s.max()
        top.append(d[tops].mean())
        best.append(d.max())
        regrets.append(d.max() - d[tops].mean())
        hits.append(float(np.isclose(d[tops], d.max()).mean()))
        if len(s) < 2:
            continue
        if np.ptp(s) > 0 and np.ptp(d) > 0:
            within.append(stats.spearmanr(s, d)[0])
        upper = np.triu_indices(len(s), k=1)
        ds = (d[:, None] - d[None, :])[upper]
        ss = (s[:, None] - s[None, :])[upper]
        informative = ds != 0
        considered += int(informative.sum())
        ties = informative & (ss == 0)
        judge_ties += int(ties.sum())
        correct += float((informative & (np.sign(ss) == np.sign(ds))).sum()) + 0.5 * float(ties.sum())
    result: dict[str, Any] = {
        "images": int(valid.any(axis=1).sum()),
        "proposals": int(valid.sum()),
        "spearman_pooled": float(pooled),
        "spearman_within": float(np.mean(within)) if within else float("nan"),
        "spearman_within_images": len(within),
        "pairwise_accuracy": correct / considered if considered else float("nan"),
        "pairs_compared": considered,
        "judge_tie_rate": judge_ties / considered if considered else float("nan"),
        "top1_regret": float(np.mean(regrets)),
        "top1_dice": float(np.mean(top)),
        "best_dice": float(np.mean(best)),
        "mean_dice": float(np.nanmean(true_dice)),
        "top1_hit_rate": float(np.mean(hits)),
    }
    if pairs is not None:
        outcome = pair_outcomes(pairs, true_dice)
        decided = int(outcome["right"].sum() + outcome["wrong"].sum())
        fraction = float(outcome["right"].sum() / decided) if decided else float("nan")
        result["pairs"] = {
            "count": int(len(outcome["gap"])),
            "fraction_correct": fraction,
            "effective_flip_rate": 1.0 - fraction if decided else float("nan"),
            "ties": int(outcome["tie"].sum()),
            "region_right": _describe(outcome["region"][outcome["right"]]),
            "region_wrong": _describe(outcome["region"][outcome["wrong"]]),
        }
    return result


def plot_region_histogram(outcomes: dict[str, dict[str, np.ndarray]], path: str | Path, *, bins: int = 30) -> Path:
    """PNG histogram of |D| for right vs wrong mined pairs, one panel per judge.

    Args:
        outcomes: judge label → :func:`pair_outcomes` result.
        path: the ``.png`` to write (atomically).
        bins: histogram bins (log-spaced over the |D| range).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(outcomes)
    fig, axes = plt.subplots(1, max(len(labels), 1), figsize=(4 * max(len(labels), 1), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        outcome = outcomes[label]
        regions = outcome["region"]
        right, wrong = regions[outcome["right"]], regions[outcome["wrong"]]
        positive = regions[regions > 0]
        if len(positive):
            edges = np.geomspace(positive.min(), positive.max() + 1, bins + 1)
            ax.hist(right, bins=edges, alpha=0.6, label=f"right ({len(right)})", color="tab:green")
            ax.hist(wrong, bins=edges, alpha=0.6, label=f"wrong ({len(wrong)})", color="tab:red")
            ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("|D| (pixels)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("pairs")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
