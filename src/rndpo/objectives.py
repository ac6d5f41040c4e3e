"""Preference objectives over the disagreement region of two masks (DPO, RN-DPO and relatives).

A segmenter is a per-pixel factorised policy, ``log π(y|x) = Σ_i log p(y_i|x)``. For two masks of the
same image every pixel where they agree cancels, so the log-likelihood ratio only involves the
disagreement region ``D = {i : chosen_i ≠ rejected_i}``:

* binary (one logit channel ``z``, sigmoid):
  ``log π(w) − log π(l) = Σ_{i∈D} s_i z_i`` with ``s_i = +1`` where ``w_i = 1`` and ``−1`` where ``w_i = 0``
  (because ``log σ(z) − log σ(−z) = z``);
* multi-class (``C ≥ 2`` channels, softmax):
  ``log π(w) − log π(l) = Σ_{i∈D} (z_i[w_i] − z_i[l_i])`` (the log-sum-exp cancels).

The DPO logit of a pair is ``h = logratio_policy − logratio_ref``; **RN-DPO** (Kalisch et al.,
"Region-Normalized DPO for Medical Image Segmentation under Noisy Judges", arXiv 2601.23222, 2026)
divides it by ``|D|``, which bounds the gradient each pair can exert whatever the size of its region.
The loss types follow TRL's ``DPOTrainer`` (``sigmoid``, ``ipo``, ``hinge``, ``robust``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["mask_logratio", "mask_logps", "preference_loss", "LOSS_TYPES", "NORMALIZATIONS"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
NORMALIZATIONS = ("none", "region")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_masks(
    logits: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, image_index: torch.Tensor | None
) -> None:
    """Validate ``logits (B, C, *spatial)`` against integer label maps ``(B or P, *spatial)``."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor (B, C, *spatial), got {getattr(logits, 'dtype', type(logits))}")
    if logits.ndim < 3:
        raise ValueError(f"logits must have shape (B, C, *spatial) with at least one spatial dim, got {tuple(logits.shape)}")
    if image_index is None:
        rows = logits.shape[0]
    else:
        if not isinstance(image_index, torch.Tensor) or image_index.ndim != 1 or image_index.is_floating_point():
            raise ValueError(f"image_index must be an integer tensor of shape (P,), got {getattr(image_index, 'shape', type(image_index))}")
        if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= logits.shape[0]):
            raise ValueError(f"image_index must index the {logits.shape[0]} rows of logits, got values in "
                             f"[{int(image_index.min())}, {int(image_index.max())}]")
        rows = image_index.shape[0]
    expected = (rows, *logits.shape[2:])
    num_channels = logits.shape[1]
    for name, mask in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor label map {expected}, got {type(mask).__name__}")
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"{name} must hold integer (or bool) labels, got dtype {mask.dtype}")
        if tuple(mask.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {expected} to match logits {tuple(logits.shape)}")
        if mask.numel() == 0:
            continue
        low, high = int(mask.min()), int(mask.max())
        allowed = 1 if num_channels == 1 else num_channels - 1
        if low < 0 or high > allowed:
            kind = "binary labels in {0, 1} (one logit channel)" if num_channels == 1 else f"labels in [0, {allowed}] for C = {num_channels}"
            raise ValueError(f"{name} holds labels in [{low}, {high}], expected {kind}")


def _compute_dtype(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in _LOW_PRECISION else logits


def _gather_region(
    logits: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, image_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather what the disagreement region needs, touching only the pixels of D.

    Returns ``(row, logits_at_d, chosen_at_d, rejected_at_d, region)``: ``row (M,)`` the mask row of
    each of the M pixels of D (over all rows), ``logits_at_d (M, C)`` their logits (rows mapped through
    ``image_index``), their labels ``(M,)`` int64, and ``region (R,)`` int64 = |D| per mask row.
    """
    disagree = (chosen != rejected).flatten(1)  # (R, N)
    region = disagree.sum(dim=1)
    row, pixel = disagree.nonzero(as_tuple=True)
    image = row if image_index is None else image_index.to(row.device)[row]
    logits_at_d = logits.flatten(2)[image, :, pixel]  # (M, C): one gather, one scatter in backward
    return row, logits_at_d, chosen.flatten(1)[row, pixel].long(), rejected.flatten(1)[row, pixel].long(), region


def _sum_by_row(values: torch.Tensor, row: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.zeros(rows, dtype=values.dtype, device=values.device).index_add(0, row, values)


def mask_logratio(
    logits: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    image_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood ratio ``log π(chosen|x) − log π(rejected|x)`` of two masks under a per-pixel policy.

    Computed through the disagreement-region identity (no log-softmax over the image): only the
    pixels where the masks differ are gathered, so work and memory scale with ``|D|``, and the
    gradient w.r.t. ``logits`` is exactly zero elsewhere.

    Args:
        logits: ``(B, C, *spatial)`` (2D ``BCHW`` or 3D ``BCHWD``) raw network outputs. ``C == 1``:
            binary with a sigmoid; ``C >= 2``: multi-class with a softmax over channels.
            Half-precision inputs are computed in float32.
        chosen: ``(B, *spatial)`` integer (or bool) label map of the preferred mask, labels in
            ``{0, 1}`` for ``C == 1`` and ``[0, C)`` otherwise. ``(P, *spatial)`` with ``image_index``.
        rejected: label map of the dispreferred mask, same rules and shape as ``chosen``.
        image_index: optional ``(P,)`` integer row of ``logits`` that each of P mask pairs belongs to,
            so that all pairs of one image are scored from one forward pass without copying logits.

    Returns:
        ``(logratio, region)``: ``logratio (B,)`` (or ``(P,)``) float (float32, or float64 for float64
        logits) and ``region`` of the same shape, int64: the number of pixels ``|D|`` where the
        two masks differ.

    Raises:
        ValueError: non-float logits, fewer than 3 dims, mask shape not ``(B, *spatial)`` (or
            ``(P, *spatial)``), non-integer masks, labels out of range, ``image_index`` out of range.
    """
    _check_masks(logits, chosen, rejected, image_index)
    logits = _compute_dtype(logits)
    row, logits_at_d, chosen_at_d, rejected_at_d, region = _gather_region(logits, chosen, rejected, image_index)
    if logits.shape[1] == 1:
        # s_i z_i on D: +z where chosen is foreground, −z where chosen is background.
        z = logits_at_d[:, 0]
        contrib = torch.where(chosen_at_d == 1, z, -z)
    else:
        contrib = logits_at_d.gather(1, chosen_at_d[:, None])[:, 0] - logits_at_d.gather(1, rejected_at_d[:, None])[:, 0]
    return _sum_by_row(contrib, row, region.shape[0]), region


def mask_logps(
    logits: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    image_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of each mask restricted to the disagreement region D.

    ``chosen_logp = Σ_{i∈D} log p(chosen_i|x)`` and ``rejected_logp = Σ_{i∈D} log p(rejected_i|x)``;
    their difference equals :func:`mask_logratio` (pixels outside D contribute equally to both masks,
    so D-restricted log-probabilities are the part that differs). Used for the reference terms stored
    with each pair and for TRL-style ``rewards/chosen`` and ``rewards/rejected`` statistics. Like
    :func:`mask_logratio`, only the pixels of D are touched (the softmax runs over their C logits).

    Args:
        logits: ``(B, C, *spatial)``; see :func:`mask_logratio`.
        chosen: ``(B, *spatial)`` label map (``(P, *spatial)`` with ``image_index``).
        rejected: same shape as ``chosen``.
        image_index: optional ``(P,)`` row of ``logits`` of each pair; see :func:`mask_logratio`.

    Returns:
        ``(chosen_logp, rejected_logp, region)``, each ``(B,)`` (or ``(P,)``); region int64.
    """
    _check_masks(logits, chosen, rejected, image_index)
    logits = _compute_dtype(logits)
    row, logits_at_d, chosen_at_d, rejected_at_d, region = _gather_region(logits, chosen, rejected, image_index)
    if logits.shape[1] == 1:
        z = logits_at_d[:, 0]
        signed = torch.where(chosen_at_d == 1, z, -z)  # log p(chosen_i) = logσ(s z), log p(rejected_i) = logσ(−s z)
        chosen_pix, rejected_pix = F.logsigmoid(signed), F.logsigmoid(-signed)
    else:
        log_probs = torch.log_softmax(logits_at_d, dim=1)
        chosen_pix = log_probs.gather(1, chosen_at_d[:, None])[:, 0]
        rejected_pix = log_probs.gather(1, rejected_at_d[:, None])[:, 0]
    rows = region.shape[0]
    return _sum_by_row(chosen_pix, row, rows), _sum_by_row(rejected_pix, row, rows), region


def _check_pairs(policy_logratio: torch.Tensor, ref_logratio: torch.Tensor, region: torch.Tensor) -> None:
    for name, value in (("policy_logratio", policy_logratio), ("ref_logratio", ref_logratio), ("region", region)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (P,), got {type(value).__name__}")
        if value.ndim != 1:
            raise ValueError(f"{name} must have shape (P,), got {tuple(value.shape)}")
    if not (policy_logratio.shape == ref_logratio.shape == region.shape):
        raise ValueError(
            f"policy_logratio {tuple(policy_logratio.shape)}, ref_logratio {tuple(ref_logratio.shape)} and "
            f"region {tuple(region.shape)} must have the same shape (P,)"
        )
    if not policy_logratio.is_floating_point():
        raise ValueError(f"policy_logratio must be floating point, got {policy_logratio.dtype}")
    if region.numel() and bool((region < 0).any()):
        raise ValueError("region must hold pixel counts >= 0")


def preference_loss(
    policy_logratio: torch.Tensor,
    ref_logratio: torch.Tensor,
    region: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid",
    normalize: Literal["none", "region"] = "region",
    label_smoothing: float = 0.0,
    policy_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO-family loss of P preference pairs, optionally region-normalised (RN-DPO).

    With ``h = policy_logratio − ref_logratio`` (divided by ``|D|`` when ``normalize == "region"``):

    * ``sigmoid`` (DPO): ``−(1−ε) log σ(βh) − ε log σ(−βh)`` (ε = ``label_smoothing``, conservative DPO; 0 = DPO);
    * ``ipo``: ``(h − 1/(2β))²``;
    * ``hinge``: ``max(0, 1 − βh)``;
    * ``robust`` (rDPO): ``[(1−ε)(−log σ(βh)) − ε(−log σ(−βh))] / (1 − 2ε)``, ε the assumed flip rate.

    Pairs with ``region == 0`` carry no signal: they are excluded from the mean and counted in
    ``stats["pairs/empty"]``; when none is left the loss is an exact zero that still backpropagates.
    For ``sigmoid`` + ``region`` with a binary policy, the L1 norm of the gradient of one pair's loss
    w.r.t. the policy logits is at most β whatever ``|D|`` (2β for a softmax policy); for ``none`` it
    grows linearly with ``|D|``.

    Args:
        policy_logratio: ``(P,)`` log π(chosen) − log π(rejected) under the trained policy.
        ref_logratio: ``(P,)`` the same under the frozen reference (a constant per pair).
        region: ``(P,)`` ``|D|``, pixels where chosen and rejected differ.
        beta: temperature β > 0. Not transferable between normalisations (scales differ by ~|D|).
        loss_type: ``sigmoid`` | ``ipo`` | ``hinge`` | ``robust``.
        normalize: ``none`` (sum over D: DPO) | ``region`` (mean over D: RN-DPO).
        label_smoothing: ε in [0, 0.5).
        policy_logps: optional ``(chosen_logp (P,), rejected_logp (P,))`` from :func:`mask_logps`, for
            the ``rewards/chosen`` and ``rewards/rejected`` statistics.
        ref_logps: optional reference counterpart of ``policy_logps``.

    Returns:
        ``(loss, stats)``: scalar loss (mean over non-empty pairs) and floats ``rewards/chosen``,
        ``rewards/rejected`` (NaN unless both ``policy_logps`` and ``ref_logps`` are given),
        ``rewards/margins`` (mean βh), ``rewards/accuracies`` (fraction h > 0), ``region/mean``,
        ``pairs/empty``, ``pairs/count``.

    Raises:
        ValueError: shapes that are not equal ``(P,)``, ``beta <= 0``, ``label_smoothing`` outside
            ``[0, 0.5)``, unknown ``loss_type`` or ``normalize``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_pairs(policy_logratio, ref_logratio, region)

    policy_logratio = _compute_dtype(policy_logratio)
    dtype = policy_logratio.dtype
    ref_logratio = ref_logratio.to(dtype=dtype, device=policy_logratio.device)
    region = region.to(policy_logratio.device)
    valid = region > 0
    scale = region.to(dtype).clamp(min=1.0) if normalize == "region" else torch.ones_like(policy_logratio)

    h = (policy_logratio - ref_logratio) / scale
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)

    num_valid = int(valid.sum())
    # Masked mean: zero (with a graph) when no pair is left, never NaN.
    loss = (losses * valid.to(dtype)).sum() / max(num_valid, 1)

    with torch.no_grad():
        nan = float("nan")
        hv = h[valid]
        stats = {
            "rewards/margins": float((beta * hv).mean()) if num_valid else nan,
            "rewards/accuracies": float((hv > 0).to(dtype).mean()) if num_valid else nan,
            "rewards/chosen": nan,
            "rewards/rejected": nan,
            "region/mean": float(region[valid].to(torch.float64).mean()) if num_valid else nan,
            "pairs/empty": float(region.numel() - num_valid),
            "pairs/count": float(num_valid),
        }
        if policy_logps is not None and ref_logps is not None and num_valid:
            device = policy_logratio.device
            chosen_reward = (policy_logps[0].to(device, dtype) - ref_logps[0].to(device, dtype)) / scale
            rejected_reward = (policy_logps[1].to(device, dtype) - ref_logps[1].to(device, dtype)) / scale
            stats["rewards/chosen"] = float((beta * chosen_reward[valid]).mean())
            stats["rewards/rejected"] = float((beta * rejected_reward[valid]).mean())
    return loss, stats
