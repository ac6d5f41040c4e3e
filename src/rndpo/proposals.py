"""Proposal generators: K candidate masks per unlabeled image, from the base segmenter alone.

Each image gets one set of proposals combined from the generators a :class:`~rndpo.config.ProposalConfig`
turns on, in this order (which is also the priority when duplicates are removed):

``base``
    the base model's own prediction (``z > 0`` for one logit channel, ``argmax`` for ``C ≥ 2``).
``mc-dropout:t``
    ``t``-th stochastic forward pass with dropout on (:func:`rndpo.models.set_dropout`); normalisation
    layers stay in eval mode. Each pass is seeded from ``(cfg.seed, batch start, t)``: the same config
    and batch size give the same proposals.
``tta:<name>``
    prediction on a flipped / rotated image (``hflip``: last axis, ``vflip``: second-to-last axis,
    ``rot90|rot180|rot270``: rotation in the last two axes), with the logits transformed back.
``threshold:t``
    a probability cut-off of the base prediction. Binary: ``sigmoid(z) > t``. Multi-class: a pixel is
    foreground where the foreground probability ``1 − p(background) > t``, and then takes the most
    probable foreground class (for ``C = 2`` softmax channels this is exactly the binary rule).
``checkpoint:s``
    the prediction of the ``s``-th snapshot kept during base training (``cfg.checkpoints``).
``morphology:<op>:<r>``
    ``erode|dilate|open|close`` of the base prediction with a ball of radius ``r`` pixels, per class
    (see :func:`morph_labels`).

Proposals that are identical (pixel for pixel) to an earlier one of the same image are removed, so an
image keeps ``K_i ≤ K`` proposals; the number removed is reported. Nothing here reads ground truth.

The ``entropy`` judge needs the base model's MC-dropout uncertainty; it recomputes it from the model
(:func:`rndpo.judges.predictive_entropy`) rather than storing probability maps beside the bank, so a
bank holds masks only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from rndpo.config import ProposalConfig
from rndpo.errors import DataError, RndpoError
from rndpo.models import has_dropout, logits_to_labels, logits_to_probs, predict_logits
from rndpo.training.loop import derive_seed

__all__ = [
    "Proposals",
    "ProposalStats",
    "generator_names",
    "iter_proposals",
    "propose",
    "generate_proposals",
    "morph_labels",
    "ball",
    "dedupe_masks",
    "tta_forward",
    "tta_inverse",
    "forward_logits",
]


@dataclass
class ProposalStats:
    """What a proposal run did: images, proposals kept, duplicates removed, time."""

    images: int = 0
    proposals: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    duplicates_by_generator: dict[str, int] = field(default_factory=dict)

    @property
    def proposals_per_second(self) -> float:
        return (self.proposals + self.duplicates) / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "proposals": self.proposals,
            "duplicates": self.duplicates,
            "duplicates_by_generator": dict(self.duplicates_by_generator),
            "seconds": round(self.seconds, 3),
            "proposals_per_second": self.proposals_per_second,
        }


@dataclass
class Proposals:
    """Proposals held in memory (small splits: labeled, validation) with the reading interface of
    :class:`rndpo.bank.ProposalBank` that the judges use (``len``, ``masks(i)``, ``generator_names(i)``,
    ``num_proposals``, ``k_max``, ``valid``, ``num_classes``, ``spatial_shape``, ``case_ids``).

    Args:
        mask_sets: one ``(K_i, *spatial)`` uint8 label array per image.
        name_sets: the generator name of every proposal, per image.
        num_classes: classes including background (binary: 2).
        k_max: proposal slots per image (K before duplicates were removed).
        case_ids: one id per image.
    """

    mask_sets: list[np.ndarray]
    name_sets: list[list[str]]
    num_classes: int
    k_max: int
    case_ids: list[str]
    stats: ProposalStats = field(default_factory=ProposalStats)

    def __len__(self) -> int:
        return len(self.mask_sets)

    def masks(self, case_index: int) -> np.ndarray:
        return self.mask_sets[case_index]

    def generator_names(self, case_index: int) -> list[str]:
        return self.name_sets[case_index]

    @property
    def num_proposals(self) -> np.ndarray:
        return np.array([len(m) for m in self.mask_sets], dtype=np.int32)

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.k_max)[None, :] < self.num_proposals[:, None]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.mask_sets[0].shape[1:]) if self.mask_sets else ()


def generator_names(cfg: ProposalConfig, num_snapshots: int = 0) -> list[str]:
    """Names of the proposals one image gets before duplicates are removed (the bank's K)."""
    names = ["base"] if cfg.include_base else []
    names += [f"mc-dropout:{t}" for t in range(cfg.mc_dropout)]
    names += [f"tta:{name}" for name in cfg.tta]
    names += [f"threshold:{t:g}" for t in cfg.thresholds]
    names += [f"checkpoint:{s}" for s in range(num_snapshots if cfg.checkpoints else 0)]
    names += [f"morphology:{spec}" for spec in cfg.morphology]
    return names


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------


def ball(radius: int, spatial_dims: int) -> np.ndarray:
    """Boolean ball (disk in 2D) of ``radius`` pixels: shape ``(2r+1,) * spatial_dims``."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    grid = np.indices((2 * radius + 1,) * spatial_dims) - radius
    return (grid**2).sum(axis=0) <= radius * radius


def _binary_morph(masks: np.ndarray, op: str, structure: np.ndarray) -> np.ndarray:
    """``op`` of boolean ``masks (B, *spatial)`` with ``structure`` applied per item (no batch cross-talk).

    Erosion treats the outside of the image as foreground, so masks touching the border do not shrink
    from it; dilation treats it as background.
    """
    footprint = structure[None]

    def erode(m: np.ndarray) -> np.ndarray:
        return ndimage.binary_erosion(m, structure=footprint, border_value=1)

    def dilate(m: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(m, structure=footprint, border_value=0)

    if op == "erode":
        return erode(masks)
    if op == "dilate":
        return dilate(masks)
    if op == "open":
        return dilate(erode(masks))
    if op == "close":
        return erode(dilate(masks))
    raise ValueError(f"morphology op must be erode|dilate|open|close, got {op!r}")


def morph_labels(labels: np.ndarray, op: str, radius: int, num_classes: int) -> np.ndarray:
    """Morphological ``op`` (``erode|dilate|open|close``) of label maps, class by class.

    Each foreground class is transformed as its own binary mask with a ball of ``radius``. A pixel
    covered by several transformed classes keeps the class it had if that class still covers it,
    otherwise takes the lowest such class; pixels covered by none become background.

    Args:
        labels: ``(B, *spatial)`` integer label maps in ``[0, num_classes)``.
        op: ``erode``, ``dilate``, ``open`` or ``close``.
        radius: ball radius in pixels (>= 1).
        num_classes: classes including background (binary: 2).

    Returns:
        ``(B, *spatial)`` uint8 label maps.
    """
    labels = np.asarray(labels)
    structure = ball(radius, labels.ndim - 1)
    if num_classes <= 2:
        return _binary_morph(labels > 0, op, structure).astype(np.uint8)
    covered = np.stack([_binary_morph(labels == c, op, structure) for c in range(1, num_classes)])
    first = np.where(covered.any(axis=0), covered.argmax(axis=0) + 1, 0)
    original = labels.astype(np.int64)
    keeps = np.take_along_axis(covered, np.clip(original - 1, 0, None)[None], axis=0)[0] & (original > 0)
    return np.where(keeps, original, first).astype(np.uint8)


def dedupe_masks(masks: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """Remove proposals identical to an earlier one of the same image (the first one is kept).

    Args:
        masks: ``(K, *spatial)`` label maps of one image.
        names: the generator name of each proposal.

    Returns:
        ``(kept masks (K_i, *spatial), kept names, names of the removed duplicates)``.
    """
    seen: set[bytes] = set()
    keep, removed = [], []
    for k in range(len(masks)):
        key = np.ascontiguousarray(masks[k]).tobytes()
        if key in seen:
            removed.append(names[k])
        else:
            seen.add(key)
            keep.append(k)
    return masks[keep], [names[k] for k in keep], removed


def tta_forward(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply test-time augmentation ``name`` to ``x (B, C, *spatial)`` (flips / rotations of the last two axes)."""
    if name == "hflip":
        return torch.flip(x, dims=(-1,))
    if name == "vflip":
        return torch.flip(x, dims=(-2,))
    if name.startswith("rot") and name[3:] in {"90", "180", "270"}:
        return torch.rot90(x, k=int(name[3:]) // 90, dims=(-2, -1))
    raise ValueError(f"unknown test-time augmentation {name!r}: hflip|vflip|rot90|rot180|rot270")


def tta_inverse(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo :func:`tta_forward` on ``x (B, C, *spatial)`` (e.g. the logits of an augmented image)."""
    if name in {"hflip", "vflip"}:
        return tta_forward(x, name)
    if name.startswith("rot") and name[3:] in {"90", "180", "270"}:
        return torch.rot90(x, k=-(int(name[3:]) // 90), dims=(-2, -1))
    raise ValueError(f"unknown test-time augmentation {name!r}: hflip|vflip|rot90|rot180|rot270")


def _labels(logits: torch.Tensor) -> np.ndarray:
    """``(B, C, *spatial)`` logits → ``(B, *spatial)`` uint8 labels (one channel: ``z > 0``; else argmax)."""
    return logits_to_labels(logits).to(torch.uint8).numpy()


def _threshold_labels(logits: torch.Tensor, threshold: float) -> np.ndarray:
    """Labels of a foreground-probability cut-off (see the module docstring)."""
    probs = logits_to_probs(logits)
    if logits.shape[1] == 1:
        return (probs[:, 0] > threshold).to(torch.uint8).numpy()
    foreground = (1.0 - probs[:, 0]) > threshold
    best = probs[:, 1:].argmax(dim=1) + 1
    return torch.where(foreground, best, torch.zeros_like(best)).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------------


def forward_logits(
    model: torch.nn.Module, x: torch.Tensor | np.ndarray, *, what: str = "base model",
    dropout: bool = False, seed: int | None = None,
) -> torch.Tensor:
    """Logits ``(B, C, *spatial)`` of ``model`` for one batch ``x (B, C_in, *spatial)`` (eval mode, no grad),
    checked against the batch's spatial shape.

    Args:
        model: segmenter.
        x: image batch.
        what: name used in the error message.
        dropout: sample dropout (MC-dropout); with ``seed``, the draw is repeatable and the global
            torch RNG is left untouched.

    Raises:
        DataError: the logits do not have the batch's size and spatial shape.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        logits = predict_logits(model, x, batch_size=max(int(x.shape[0]), 1), dropout=dropout)
    if logits.ndim != x.ndim or logits.shape[0] != x.shape[0] or tuple(logits.shape[2:]) != tuple(x.shape[2:]):
        raise DataError(
            f"{what}: model output {tuple(logits.shape)} does not match the image batch {tuple(x.shape)} "
            "(expected logits (B, C, *spatial) with the images' spatial shape)"
        )
    return logits


def _check_images(images: np.ndarray | torch.Tensor) -> None:
    shape = tuple(images.shape)
    if len(shape) < 3:
        raise DataError(f"images must have shape (N, C_in, *spatial), got {shape}")
    if shape[0] == 0:
        raise RndpoError("no images to propose for (empty pool): check the split and the data folder")


def _num_classes(channels: int) -> int:
    return 2 if channels == 1 else channels


def iter_proposals(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    cfg: ProposalConfig,
    *,
    snapshots: Sequence[torch.nn.Module] | None = None,
    progress: bool = False,
) -> Iterator[tuple[list[np.ndarray], list[list[str]], list[str]]]:
    """Generate proposals batch by batch (nothing is kept in memory beyond one batch).

    Args:
        model: base segmenter; ``model(x (B, C_in, *spatial)) -> logits (B, C, *spatial)``.
        images: ``(N, C_in, *spatial)`` float32, at the model's training size.
        cfg: which generators, their parameters, batch size and seed.
        snapshots: snapshot models of base training (used when ``cfg.checkpoints``).
        progress: show a rich progress bar.

    Yields:
        per batch ``(masks, names, removed)``: for every image of the batch its ``(K_i, *spatial)``
        uint8 proposals, their generator names, and the names of the duplicates removed.

    Raises:
        RndpoError: empty image set, fewer than 2 proposals configured, ``cfg.checkpoints`` without
            snapshots, or a model whose output does not match the images' spatial shape.
    """
    from rich.progress import Progress

    _check_images(images)
    snapshots = list(snapshots or [])
    if cfg.checkpoints and not snapshots:
        raise RndpoError("proposals: checkpoints=True needs the snapshot checkpoints of base training (none given)")
    all_names = generator_names(cfg, len(snapshots))
    if len(all_names) < 2:
        raise RndpoError(f"proposals: the config yields K = {len(all_names)} proposal(s) per image; pairs need K >= 2")
    if any(name in {"rot90", "rot270"} for name in cfg.tta) and images.shape[-1] != images.shape[-2]:
        raise DataError(f"tta rotations by 90° need square images, got spatial shape {tuple(images.shape[2:])}")
    if cfg.mc_dropout and not has_dropout(model):
        raise RndpoError("proposals: mc_dropout > 0 but the model has no dropout (train it with dropout > 0 or set mc_dropout=0)")

    total = int(images.shape[0])
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("proposals", total=total)
        for start in range(0, total, cfg.batch_size):
            x = images[start : start + cfg.batch_size]
            x = x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            logits = forward_logits(model, x)
            num_classes = _num_classes(logits.shape[1])
            base = _labels(logits)
            candidates: list[np.ndarray] = [base] if cfg.include_base else []
            for t in range(cfg.mc_dropout):
                z = forward_logits(model, x, what="mc-dropout", dropout=True, seed=derive_seed(cfg.seed, start, t))
                candidates.append(_labels(z))
            for name in cfg.tta:
                z = forward_logits(model, tta_forward(x, name), what=f"tta:{name}")
                candidates.append(_labels(tta_inverse(z, name)))
            for threshold in cfg.thresholds:
                candidates.append(_threshold_labels(logits, threshold))
            if cfg.checkpoints:
                for index, snapshot in enumerate(snapshots):
                    candidates.append(_labels(forward_logits(snapshot, x, what=f"checkpoint:{index}")))
            for spec in cfg.morphology:
                op, _, radius = spec.partition(":")
                candidates.append(morph_labels(base, op, int(radius), num_classes))
            stacked = np.stack(candidates, axis=1)  # (B, K, *spatial)
            masks, names, removed = [], [], []
            for i in range(stacked.shape[0]):
                kept, kept_names, dropped = dedupe_masks(stacked[i], all_names)
                masks.append(kept)
                names.append(kept_names)
                removed.extend(dropped)
            yield masks, names, removed
            bar.advance(task, len(x))


def _record(stats: ProposalStats, masks: list[np.ndarray], removed: list[str]) -> None:
    stats.images += len(masks)
    stats.proposals += sum(len(m) for m in masks)
    stats.duplicates += len(removed)
    for name in removed:
        generator = name.split(":", 1)[0]
        stats.duplicates_by_generator[generator] = stats.duplicates_by_generator.get(generator, 0) + 1


def propose(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    cfg: ProposalConfig,
    *,
    snapshots: Sequence[torch.nn.Module] | None = None,
    case_ids: Sequence[str] | None = None,
    progress: bool = False,
) -> Proposals:
    """Generate proposals for a small split and keep them in memory (labeled / validation splits).

    Same arguments as :func:`iter_proposals`; returns :class:`Proposals` (``stats`` filled in).
    """
    _check_images(images)
    start = time.perf_counter()
    n = int(images.shape[0])
    result = Proposals(
        [], [], num_classes=_infer_num_classes(model, images), k_max=len(generator_names(cfg, len(snapshots or []))),
        case_ids=[str(c) for c in case_ids] if case_ids is not None else [str(i) for i in range(n)],
    )
    if len(result.case_ids) != n:
        raise RndpoError(f"case_ids has {len(result.case_ids)} entries for {n} images")
    for masks, names, removed in iter_proposals(model, images, cfg, snapshots=snapshots, progress=progress):
        result.mask_sets.extend(masks)
        result.name_sets.extend(names)
        _record(result.stats, masks, removed)
    result.stats.seconds = time.perf_counter() - start
    return result


def _infer_num_classes(model: torch.nn.Module, images: np.ndarray | torch.Tensor) -> int:
    """Classes (including background) of ``model``, from the channels of one forward pass."""
    x = images[:1] if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images[:1], dtype=np.float32))
    return _num_classes(forward_logits(model, x).shape[1])


def generate_proposals(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    cfg: ProposalConfig,
    *,
    snapshots: Sequence[torch.nn.Module] | None = None,
    bank_path: str | Path,
    case_ids: Sequence[str],
    progress: bool = True,
    meta: dict | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
):
    """Generate K proposals per image and write them, with their generator names, to a proposal bank.

    Args:
        model: base segmenter (logits ``(B, C, *spatial)``).
        images: ``(N, C_in, *spatial)`` float32 unlabeled pool images (no masks are read).
        cfg: the generators (see the module docstring).
        snapshots: snapshot models of base training (for ``cfg.checkpoints``).
        bank_path: folder of the new :class:`rndpo.bank.ProposalBank`.
        case_ids: one id per image, in bank order.
        progress: show a rich progress bar.
        meta: extra provenance stored in the bank's metadata (checkpoint, split, ...).
        overwrite: replace an existing bank at ``bank_path``.
        shard: ``(rank, world_size)`` under torchrun: this process generates the images
            ``rank::world_size`` into ``ProposalBank.shard_path(bank_path, rank)``; once every rank has
            written its shard, ``ProposalBank.open(bank_path)`` reads them as one bank (this call then
            returns ``None``).

    Returns:
        the written :class:`rndpo.bank.ProposalBank`. ``k_max`` is the configured K; each image keeps
        ``K_i ≤ K`` proposals after duplicates are removed. ``bank.meta`` holds the proposal config,
        ``proposal_stats`` (duplicates removed, per generator, seconds, proposals per second) and ``meta``.

    Raises:
        RndpoError: see :func:`iter_proposals`; ``case_ids`` not matching the images.
    """
    from rndpo.bank import ProposalBank

    _check_images(images)
    n = int(images.shape[0])
    if len(case_ids) != n:
        raise RndpoError(f"case_ids has {len(case_ids)} entries for {n} images")
    names = generator_names(cfg, len(snapshots or []))
    name_ids = {name: i for i, name in enumerate(names)}
    stats = ProposalStats()
    start = time.perf_counter()
    rank, world_size = shard or (0, 1)
    positions = np.arange(n)[rank::world_size]
    target = ProposalBank.shard_path(bank_path, rank) if shard else bank_path
    writer = ProposalBank.create(
        target, case_ids=list(case_ids), spatial_shape=tuple(int(s) for s in images.shape[2:]),
        num_classes=_infer_num_classes(model, images), k_max=len(names), generators=names,
        meta={"proposal_config": cfg.model_dump(mode="json"), **(meta or {})},
        dedupe=False,  # done here, so the duplicates can be counted per generator
        overwrite=overwrite,
        shard=shard,
    )
    with writer:
        index = 0
        for masks, generators, removed in iter_proposals(model, images[positions] if shard else images, cfg,
                                                         snapshots=snapshots, progress=progress):
            for mask_set, generator_set in zip(masks, generators):
                writer.add(int(positions[index]), mask_set, np.array([name_ids[g] for g in generator_set], dtype=np.int16))
                index += 1
            _record(stats, masks, removed)
        stats.seconds = time.perf_counter() - start
        writer.meta["proposal_stats"] = stats.as_dict()
    if shard is not None:
        return None  # a shard alone is not a bank: open bank_path once every rank has written its shard
    return ProposalBank.open(bank_path)
