"""The practitioner's path: your model, your images, your candidate masks and QC scores → a
preference-fine-tuned model, in a few calls.

    import rndpo.api as rn
    bank = rn.make_bank("work/bank", candidates)                 # (N, K, H, W) masks your system produced
    pairs = rn.mine_pairs(bank, qc_scores, images, model)        # (N, K) QC scores, higher = better
    records = rn.preference_finetune(model, images, bank, pairs, out_dir="work/ft", method="rn-dpo", beta=1.0)

``model`` is any ``torch.nn.Module`` mapping ``(B, C_in, *spatial)`` float images to logits
``(B, C, *spatial)`` (one channel: binary with a sigmoid; C ≥ 2: softmax). No candidates? Generate
them from the model: :func:`rndpo.proposals.generate_proposals` writes a bank directly. Everything
here is a thin wrapper over :mod:`rndpo.bank`, :mod:`rndpo.mining` and
:mod:`rndpo.training.finetune`, which the experiment runner uses too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rndpo.bank import ProposalBank
from rndpo.config import FinetuneConfig, MiningConfig
from rndpo.errors import RndpoError
from rndpo.mining import Pairs, mine
from rndpo.training.finetune import FinetuneInputs, finetune

__all__ = ["make_bank", "mine_pairs", "preference_finetune"]


def make_bank(
    path: str | Path,
    candidates: np.ndarray,
    *,
    case_ids: Sequence[str] | None = None,
    num_classes: int | None = None,
    overwrite: bool = False,
) -> ProposalBank:
    """Store candidate masks ``(N, K, *spatial)`` (integer labels) as an on-disk proposal bank.

    Args:
        path: bank folder to create.
        candidates: K candidate masks per image, labels in ``[0, num_classes)``.
        case_ids: one id per image (default ``"0"``, ``"1"``, ...).
        num_classes: classes including background (default: ``max label + 1``, at least 2).
        overwrite: replace an existing bank.

    Note:
        Identical candidates of an image are kept as they are (so your score columns stay aligned
        with ``candidates``); mining drops their pairs (``|D| = 0``) and counts them.
    """
    candidates = np.asarray(candidates)
    if candidates.ndim < 4:
        raise RndpoError(f"candidates must be (N, K, *spatial) label maps, got shape {candidates.shape}")
    if not np.issubdtype(candidates.dtype, np.integer) and candidates.dtype != bool:
        raise RndpoError(f"candidates must hold integer labels, got dtype {candidates.dtype}")
    n, k = candidates.shape[:2]
    if k < 2:
        raise RndpoError(f"need at least 2 candidates per image to form pairs, got K = {k}")
    classes = int(num_classes or max(2, int(candidates.max()) + 1))
    ids = [str(c) for c in (case_ids if case_ids is not None else range(n))]
    with ProposalBank.create(path, case_ids=ids, spatial_shape=candidates.shape[2:], num_classes=classes, k_max=k,
                             generators=["user"], dedupe=False, overwrite=overwrite) as writer:
        writer.add(np.arange(n), candidates.astype(np.uint8), np.zeros((n, k), dtype=np.int16))
    return ProposalBank.open(path)


def mine_pairs(
    bank: ProposalBank,
    scores: np.ndarray,
    images: np.ndarray,
    model: torch.nn.Module,
    *,
    strategy: str = "top-vs-rest",
    min_margin: float = 0.0,
    min_region: int = 1,
    pairs_per_image: int = 4,
    seed: int = 0,
) -> Pairs:
    """Mine preference pairs from QC ``scores (N, K)`` (higher = better) and attach the reference
    log-ratios of ``model`` (your base model, evaluated once per image). See :mod:`rndpo.mining`."""
    cfg = MiningConfig(strategy=strategy, min_margin=min_margin, min_region=min_region,
                       pairs_per_image=pairs_per_image, seed=seed)
    return mine(bank, np.asarray(scores, dtype=np.float64), np.asarray(images, dtype=np.float32), model, cfg)


def preference_finetune(
    model: torch.nn.Module,
    images: np.ndarray,
    bank: ProposalBank,
    pairs: Pairs,
    *,
    out_dir: str | Path,
    eval_data: dict[str, Any] | None = None,
    progress: bool = False,
    **config: Any,
) -> list[dict]:
    """Fine-tune ``model`` in place on the mined ``pairs``; returns the evaluation records.

    Args:
        model: the base model the pairs' reference log-ratios were computed with.
        images: ``(N, C_in, *spatial)`` images in bank order.
        bank: the candidates' bank.
        pairs: from :func:`mine_pairs`.
        out_dir: where ``metrics.jsonl`` and the resumable state go.
        eval_data: optional ``{"name": SegDataset}`` with masks, evaluated every ``eval_every`` steps.
        progress: show a progress bar.
        **config: :class:`rndpo.config.FinetuneConfig` fields: ``method`` (``rn-dpo`` default),
            ``beta``, ``lr``, ``steps``, ``images_per_step``, ``sft_weight``, ...
    """
    cfg = FinetuneConfig(**config)
    if not cfg.is_preference:
        raise RndpoError(f"preference_finetune runs preference objectives, not {cfg.method!r}")
    inputs = FinetuneInputs(pool_images=np.asarray(images, dtype=np.float32), bank=bank, pairs=pairs)
    return finetune(model, cfg, inputs, eval_data or {}, out_dir, progress=progress, eval_hd95=False)
