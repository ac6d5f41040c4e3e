"""Preference-pair mining: from a judge's scores of each image's proposals to (chosen, rejected) pairs.

Pure functions on arrays. :func:`mine_pairs` enumerates candidate pairs per image with one of the
strategies below, orients each by the judge (higher score = chosen), filters them, and optionally
flips each kept pair with probability ``flip_prob`` (the ``flip:p`` judge-noise model).
:func:`attach_reference` then computes each pair's reference log-ratio once from the base model's
logits (the DPO reference term is a constant per pair, Kalisch et al., arXiv 2601.23222), one
forward pass per image for all of that image's pairs. :func:`mine` does both.

Strategies (per image with K_i ≥ 2 valid proposals):

- ``top-vs-rest``: the judge's top proposal against every other one (K_i − 1 candidates).
- ``top-vs-bottom``: the top proposal against the worst (1 candidate).
- ``random-pairs``: ``pairs_per_image`` distinct unordered pairs drawn at random (all of them when
  fewer exist), each oriented by the judge.
- ``all-pairs``: every unordered pair, oriented by the judge (K_i (K_i − 1) / 2 candidates).

The top is the first slot with the highest score, the bottom the last slot with the lowest, so
the two differ whenever K_i ≥ 2. Filters, applied in this order; each dropped candidate is counted
once, under the first filter it fails:

- ``ties``: equal scores (no preference) — always dropped;
- ``below_margin``: judge-score gap below ``cfg.min_margin``;
- ``empty_region``: |D| = 0 (identical masks carry no signal);
- ``below_region``: |D| below ``cfg.min_region`` pixels.

``candidates = ties + below_margin + empty_region + below_region + kept``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch

from rndpo.bank import ProposalBank
from rndpo.config import MiningConfig
from rndpo.errors import CheckpointError, RndpoError
from rndpo.io import atomic_path, to_jsonable

__all__ = ["Pairs", "COUNT_KEYS", "mine_pairs", "pair_regions", "attach_reference", "mine", "check_scores"]

#: Keys of :attr:`Pairs.counts`, in table order.
COUNT_KEYS = ("images", "images_lt2", "candidates", "ties", "below_margin", "empty_region",
              "below_region", "kept", "flipped")

RegionSource = Union[ProposalBank, np.ndarray, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]

_COLUMNS: dict[str, Any] = {
    "case_index": np.int64,
    "chosen": np.int32,
    "rejected": np.int32,
    "region": np.int64,
    "margin": np.float64,
    "flipped": np.bool_,
    "ref_logratio": np.float32,
    "ref_chosen_logp": np.float32,
    "ref_rejected_logp": np.float32,
}
_REFERENCE = ("ref_logratio", "ref_chosen_logp", "ref_rejected_logp")


@dataclass
class Pairs:
    """Mined preference pairs, one row per pair (columns are (M,) arrays).

    Attributes:
        case_index: int64, the image (index into the bank / pool images).
        chosen, rejected: int32 proposal slots of that image (after any flip).
        region: int64 |D|, pixels where chosen and rejected differ.
        margin: float64 judge-score gap |s_a − s_b| (> 0; independent of flipping).
        flipped: bool, the judge's orientation was flipped by ``flip:p`` noise.
        ref_logratio: float32 log π_ref(chosen|x) − log π_ref(rejected|x) (NaN until
            :func:`attach_reference`).
        ref_chosen_logp, ref_rejected_logp: float32 reference log-probabilities restricted to D.
        counts: candidate/filter counts (:data:`COUNT_KEYS`).
        meta: provenance (strategy, filters, flip_prob, seed, reference model ...).
    """

    case_index: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    region: np.ndarray
    margin: np.ndarray
    flipped: np.ndarray
    ref_logratio: np.ndarray
    ref_chosen_logp: np.ndarray
    ref_rejected_logp: np.ndarray
    counts: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = set()
        for name, dtype in _COLUMNS.items():
            column = np.asarray(getattr(self, name)).astype(dtype, copy=False)
            if column.ndim != 1:
                raise RndpoError(f"Pairs.{name} must be 1-D, got shape {column.shape}")
            setattr(self, name, column)
            lengths.add(len(column))
        if len(lengths) > 1:
            raise RndpoError(f"Pairs columns differ in length: {sorted(lengths)}")

    @classmethod
    def empty(cls, counts: dict | None = None, meta: dict | None = None) -> "Pairs":
        return cls(**{name: np.zeros(0, dtype) for name, dtype in _COLUMNS.items()},
                   counts=dict(counts or {}), meta=dict(meta or {}))

    def __len__(self) -> int:
        return len(self.case_index)

    @property
    def has_reference(self) -> bool:
        """True when every pair has a finite reference log-ratio."""
        return bool(np.isfinite(self.ref_logratio).all())

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _COLUMNS}

    def subset(self, rows: np.ndarray) -> "Pairs":
        """The pairs at ``rows`` (indices or a boolean mask); counts and meta are kept."""
        return Pairs(**{name: column[rows] for name, column in self.columns().items()},
                     counts=dict(self.counts), meta=dict(self.meta))

    def group_by_image(self) -> dict[int, np.ndarray]:
        """``{case_index: row indices}`` (ascending case index; rows in stored order)."""
        if not len(self):
            return {}
        order = np.argsort(self.case_index, kind="stable")
        cases, starts = np.unique(self.case_index[order], return_index=True)
        return {int(c): rows for c, rows in zip(cases, np.split(order, starts[1:]))}

    def save(self, path: str | os.PathLike) -> Path:
        """Write all columns, counts and meta to one ``.npz`` file, atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **self.columns(),
                         counts_json=np.array(json.dumps(to_jsonable(self.counts))),
                         meta_json=np.array(json.dumps(to_jsonable(self.meta))))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Pairs":
        """Read pairs written by :meth:`save`.

        Raises:
            CheckpointError: missing, unreadable or incomplete file (named).
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"pairs file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as archive:
                missing = [k for k in (*_COLUMNS, "counts_json", "meta_json") if k not in archive.files]
                if missing:
                    raise CheckpointError(f"pairs file {path} lacks {missing}")
                columns = {name: archive[name] for name in _COLUMNS}
                counts = json.loads(str(archive["counts_json"]))
                meta = json.loads(str(archive["meta_json"]))
        except (OSError, ValueError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"unreadable pairs file {path}: {error}") from None
        return cls(**columns, counts=counts, meta=meta)


# ---------------------------------------------------------------------- validation
def check_scores(scores: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate judge scores and return ``(scores float64 (N, K), valid (N, K) bool)``.

    Args:
        scores: (N, K) float, higher = better, NaN exactly in empty slots.
        valid: (N, K) bool proposal slots that exist (from the bank); default ``~isnan(scores)``.

    Raises:
        RndpoError (a ValueError): not 2-D float, empty pool, K < 2, ±inf anywhere, NaN in a valid
            slot or a score in an empty slot — naming the first offending (image, slot).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise RndpoError(f"scores must be a 2-D float array (N, K), got {scores.dtype} with shape {scores.shape}")
    n, k = scores.shape
    if n == 0:
        raise RndpoError("scores: the pool is empty (N = 0 images)")
    if k < 2:
        raise RndpoError(f"scores: need K ≥ 2 proposal slots per image to form pairs, got K = {k}")
    scores = scores.astype(np.float64)
    inf = np.argwhere(np.isinf(scores))
    if len(inf):
        i, j = inf[0]
        raise RndpoError(f"scores hold ±inf ({len(inf)} entries; first at image {i}, slot {j})")
    if valid is None:
        valid = ~np.isnan(scores)
    else:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != scores.shape:
            raise RndpoError(f"scores have shape {scores.shape} but the bank's slots are {valid.shape}")
        bad = np.argwhere(valid & np.isnan(scores))
        if len(bad):
            i, j = bad[0]
            raise RndpoError(f"scores hold NaN for existing proposals ({len(bad)} entries; first at image {i}, slot {j})")
        bad = np.argwhere(~valid & ~np.isnan(scores))
        if len(bad):
            i, j = bad[0]
            raise RndpoError(f"scores hold values for empty proposal slots ({len(bad)} entries; first at "
                             f"image {i}, slot {j}); empty slots must be NaN")
    return scores, valid


# ---------------------------------------------------------------------- regions
def pair_regions(source: RegionSource, case_index: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """|D| for each (image, slot, slot) triple, from a bank, a mask array or a callable.

    Args:
        source: a :class:`~rndpo.bank.ProposalBank` (XOR + popcount of packed rows), an array of
            masks ``(N, K, *spatial)``, or a callable ``(case_index, first, second) -> (m,) int``.
        case_index, first, second: (m,) integer arrays.

    Returns:
        (m,) int64 pixel counts.
    """
    if isinstance(source, ProposalBank):
        return source.pair_regions(case_index, first, second)
    if isinstance(source, np.ndarray):
        out = np.zeros(len(case_index), dtype=np.int64)
        for begin in range(0, len(case_index), 1024):
            sl = slice(begin, begin + 1024)
            a = source[case_index[sl], first[sl]]
            b = source[case_index[sl], second[sl]]
            out[sl] = (a != b).reshape(len(a), -1).sum(axis=1)
        return out
    if callable(source):
        out = np.asarray(source(case_index, first, second))
        if out.shape != (len(case_index),):
            raise RndpoError(f"regions callable returned shape {out.shape}, expected ({len(case_index)},)")
        return out.astype(np.int64)
    raise RndpoError(f"regions must be a ProposalBank, a mask array or a callable, got {type(source).__name__}")


# ---------------------------------------------------------------------- mining
def _candidates(scores: np.ndarray, valid: np.ndarray, cfg: MiningConfig, rng: np.random.Generator):
    """Unordered candidate pairs (case, slot_a, slot_b) of every image with ≥ 2 valid slots."""
    n, k = scores.shape
    num_valid = valid.sum(axis=1)
    eligible = num_valid >= 2
    if cfg.strategy in ("top-vs-rest", "top-vs-bottom"):
        high = np.where(valid, scores, -np.inf)
        top = np.argmax(high, axis=1)  # first maximum
        if cfg.strategy == "top-vs-bottom":
            low = np.where(valid, scores, np.inf)[:, ::-1]
            bottom = k - 1 - np.argmin(low, axis=1)  # last minimum
            cases = np.flatnonzero(eligible)
            return cases, top[cases], bottom[cases]
        others = valid & (np.arange(k)[None, :] != top[:, None]) & eligible[:, None]
        cases, slots = np.nonzero(others)
        return cases, top[cases], slots
    first, second = np.triu_indices(k, 1)
    both = valid[:, first] & valid[:, second] & eligible[:, None]  # (N, P)
    if cfg.strategy == "random-pairs":
        keys = np.where(both, rng.random(both.shape), np.inf)
        ranks = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
        both &= ranks < cfg.pairs_per_image
    cases, pair = np.nonzero(both)
    return cases, first[pair], second[pair]


def mine_pairs(
    scores: np.ndarray,
    regions: RegionSource,
    cfg: MiningConfig | None = None,
    *,
    flip_prob: float = 0.0,
    rng: np.random.Generator | int | None = None,
    valid: np.ndarray | None = None,
) -> Pairs:
    """Mine oriented, filtered preference pairs from judge scores.

    Args:
        scores: (N, K) float judge scores (higher = better), NaN in empty slots.
        regions: where |D| comes from: a :class:`~rndpo.bank.ProposalBank` (its ``valid`` slots are
            also checked against ``scores``), masks ``(N, K, *spatial)``, or a callable
            ``(case_index (m,), first (m,), second (m,)) -> (m,) int``.
        cfg: strategy and filters (default :class:`~rndpo.config.MiningConfig()`).
        flip_prob: probability p of flipping each kept pair's orientation (``flip:p`` judge noise).
        rng: generator or seed for ``random-pairs`` and flips (default: ``cfg.seed``).
        valid: (N, K) bool existing slots (default: from the bank, else ``~isnan(scores)``).

    Returns:
        :class:`Pairs` (reference columns NaN), rows grouped by image in ascending case index.

    Raises:
        RndpoError (a ValueError): bad scores (see :func:`check_scores`), ``flip_prob`` outside
            [0, 1], a bank of another size.
    """
    cfg = cfg or MiningConfig()
    if not 0.0 <= float(flip_prob) <= 1.0:
        raise RndpoError(f"flip_prob must lie in [0, 1], got {flip_prob}")
    if valid is None and isinstance(regions, ProposalBank):
        valid = regions.valid
    scores, valid = check_scores(scores, valid)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(cfg.seed if rng is None else rng)

    cases, slot_a, slot_b = _candidates(scores, valid, cfg, rng)
    score_a, score_b = scores[cases, slot_a], scores[cases, slot_b]
    a_wins = score_a >= score_b
    chosen = np.where(a_wins, slot_a, slot_b)
    rejected = np.where(a_wins, slot_b, slot_a)
    margin = np.abs(score_a - score_b)

    counts = {"images": int(len(scores)), "images_lt2": int((valid.sum(axis=1) < 2).sum()),
              "candidates": int(len(cases))}
    tie = margin == 0
    below_margin = ~tie & (margin < cfg.min_margin)
    counts["ties"], counts["below_margin"] = int(tie.sum()), int(below_margin.sum())
    keep = ~tie & ~below_margin
    cases, chosen, rejected, margin = cases[keep], chosen[keep], rejected[keep], margin[keep]

    region = pair_regions(regions, cases, chosen, rejected)
    empty = region == 0
    below_region = ~empty & (region < cfg.min_region)
    counts["empty_region"], counts["below_region"] = int(empty.sum()), int(below_region.sum())
    keep = ~empty & ~below_region
    cases, chosen, rejected, margin, region = cases[keep], chosen[keep], rejected[keep], margin[keep], region[keep]

    flipped = rng.random(len(cases)) < float(flip_prob) if flip_prob > 0 else np.zeros(len(cases), bool)
    chosen, rejected = np.where(flipped, rejected, chosen), np.where(flipped, chosen, rejected)
    counts["kept"], counts["flipped"] = int(len(cases)), int(flipped.sum())
    counts = {key: counts[key] for key in COUNT_KEYS}

    nan = np.full(len(cases), np.nan, dtype=np.float32)
    meta = {"strategy": cfg.strategy, "pairs_per_image": cfg.pairs_per_image, "min_margin": cfg.min_margin,
            "min_region": cfg.min_region, "seed": cfg.seed, "flip_prob": float(flip_prob)}
    return Pairs(case_index=cases, chosen=chosen, rejected=rejected, region=region, margin=margin,
                 flipped=flipped, ref_logratio=nan, ref_chosen_logp=nan.copy(), ref_rejected_logp=nan.copy(),
                 counts=counts, meta=meta)


# ---------------------------------------------------------------------- reference log-ratios
def attach_reference(
    pairs: Pairs,
    bank: ProposalBank,
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 8,
    pair_chunk: int = 256,
) -> Pairs:
    """Fill the reference columns of ``pairs`` from the base model's logits (once per pair).

    One forward pass per image (``batch_size`` images at a time); every pair of those images is scored
    from their logits (``image_index``, no copies of the logits) with :func:`rndpo.objectives.mask_logps`:
    ``ref_chosen_logp`` and ``ref_rejected_logp`` (log-probabilities restricted to D) and their
    difference ``ref_logratio``.

    Args:
        pairs: mined pairs (case indices into ``bank`` and ``images``).
        bank: the proposal bank the pairs were mined from.
        model: the reference (base) network, run in eval mode without gradients through
            :func:`rndpo.models.predict_logits`, or a callable ``images (B, C_in, *spatial) float32
            tensor -> logits (B, C, *spatial)``.
        images: (N, C_in, *spatial) pool images in bank order (``SegDataset.images``).
        batch_size: images per forward pass.
        pair_chunk: pairs scored at a time (bounds memory).

    Returns:
        A new :class:`Pairs` with the three reference columns filled (float32).

    Raises:
        RndpoError: images that do not match the bank, logits of the wrong shape, or a recomputed
            |D| that disagrees with ``pairs.region`` (pairs mined from another bank).
    """
    from rndpo.objectives import mask_logps

    if int(batch_size) < 1 or int(pair_chunk) < 1:
        raise RndpoError(f"batch_size and pair_chunk must be ≥ 1, got {batch_size}, {pair_chunk}")
    if tuple(images.shape[:1]) != (len(bank),) or tuple(images.shape[2:]) != bank.spatial_shape:
        raise RndpoError(f"images have shape {tuple(images.shape)}, expected ({len(bank)}, C_in, "
                         f"*{bank.spatial_shape}) to match the bank {bank.path}")
    if len(pairs) and (pairs.case_index.max() >= len(bank) or pairs.case_index.min() < 0):
        raise RndpoError(f"pairs name case indices outside the bank of {len(bank)} images")
    channels = 1 if bank.num_classes == 2 else bank.num_classes
    out = {name: np.full(len(pairs), np.nan, dtype=np.float32) for name in _REFERENCE}
    groups = pairs.group_by_image()
    cases = np.fromiter(groups, dtype=np.int64, count=len(groups))
    for begin in range(0, len(cases), int(batch_size)):
        batch = cases[begin : begin + int(batch_size)]
        logits = _reference_logits(model, images, batch)
        if tuple(logits.shape) != (len(batch), channels, *bank.spatial_shape):
            raise RndpoError(f"reference logits have shape {tuple(logits.shape)}, expected "
                             f"{(len(batch), channels, *bank.spatial_shape)} for num_classes={bank.num_classes}")
        rows = np.concatenate([groups[int(case)] for case in batch])
        image_row = np.repeat(np.arange(len(batch)), [len(groups[int(case)]) for case in batch])
        masks = {int(case): torch.from_numpy(bank.masks(int(case))) for case in batch}
        for start in range(0, len(rows), int(pair_chunk)):
            chunk, image_index = rows[start : start + int(pair_chunk)], image_row[start : start + int(pair_chunk)]
            chosen = torch.stack([masks[int(pairs.case_index[r])][int(pairs.chosen[r])] for r in chunk])
            rejected = torch.stack([masks[int(pairs.case_index[r])][int(pairs.rejected[r])] for r in chunk])
            index = torch.from_numpy(image_index)
            # one gather of D for both terms, computed as the trainer computes the policy's (so the
            # DPO logit of an unchanged policy is exactly 0)
            chosen_logp, rejected_logp, region = mask_logps(logits, chosen, rejected, image_index=index)
            logratio = chosen_logp - rejected_logp
            if not np.array_equal(region.numpy(), pairs.region[chunk]):
                bad = int(pairs.case_index[chunk][np.flatnonzero(region.numpy() != pairs.region[chunk])[0]])
                raise RndpoError(f"pairs of image {bank.case_ids[bad]!r} disagree with the bank {bank.path} "
                                 "on |D|: were they mined from another bank?")
            out["ref_logratio"][chunk] = logratio.numpy()
            out["ref_chosen_logp"][chunk] = chosen_logp.numpy()
            out["ref_rejected_logp"][chunk] = rejected_logp.numpy()
    meta = dict(pairs.meta)
    meta["reference"] = {"bank": str(bank.path), "model": type(model).__name__, "batch_size": int(batch_size)}
    return dataclasses.replace(pairs, **out, counts=dict(pairs.counts), meta=meta)


def _reference_logits(model, images, cases: np.ndarray) -> torch.Tensor:
    batch = images[cases]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    batch = batch.float()
    if isinstance(model, torch.nn.Module):
        from rndpo.models import predict_logits

        logits = predict_logits(model, batch, batch_size=len(cases))
    else:
        with torch.no_grad():
            logits = model(batch)
    return logits.detach().float().cpu()


def mine(
    bank: ProposalBank,
    scores: np.ndarray,
    images: np.ndarray | torch.Tensor,
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    cfg: MiningConfig | None = None,
    *,
    flip_prob: float = 0.0,
    rng: np.random.Generator | int | None = None,
    batch_size: int = 8,
) -> Pairs:
    """:func:`mine_pairs` on ``bank`` + :func:`attach_reference` with ``model`` on ``images``."""
    pairs = mine_pairs(scores, bank, cfg, flip_prob=flip_prob, rng=rng)
    return attach_reference(pairs, bank, model, images, batch_size=batch_size)
