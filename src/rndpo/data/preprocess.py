"""Bring one case to training size and normalise its intensities.

Two modes (:class:`rndpo.config.DataConfig.resize_mode`):

- ``resize``: every spatial side is resampled to ``size`` (aspect ratio not kept). Images use
  bilinear (2D, antialiased when shrinking) / trilinear (3D) interpolation, masks nearest
  neighbour (``nearest-exact``: pixel centres), so masks stay integer with no new labels.
- ``pad``: the image is scaled so its longest side becomes ``size`` (aspect kept; same
  interpolation as above), then zero-padded, centred, to ``size`` per side. Padding happens after
  normalisation, so the padded border is 0 = the image's mean intensity; masks are padded with
  background (0). ``scale`` and ``pad`` ((before, after) per axis) are recorded per case, so a
  prediction can be mapped back: crop the padding, then resample to ``original_size``.

Normalisation: z-score per image and channel, ``(x - mean) / std`` over the (unpadded) resized
image (std floored at 1e-6 for constant images).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["to_training_size", "zscore", "resize_nearest", "NORMALISATION"]

NORMALISATION = "zscore per image and channel (after resizing, before padding; padding = 0)"


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score of ``image`` ``(C, *spatial)``; returns float32."""
    data = image.astype(np.float64, copy=False)
    axes = tuple(range(1, data.ndim))
    mean = data.mean(axis=axes, keepdims=True)
    std = data.std(axis=axes, keepdims=True)
    return ((data - mean) / np.maximum(std, 1e-6)).astype(np.float32)


def _resample(image: np.ndarray, mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample ``image`` (C, *spatial) and ``mask`` (*spatial) to ``shape``."""
    if tuple(image.shape[1:]) == tuple(shape):
        return image.astype(np.float32, copy=False), mask
    spatial_dims = image.ndim - 1
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    shrinking = any(t < s for t, s in zip(shape, image.shape[1:]))
    if spatial_dims == 2:
        out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)
    else:
        out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return out[0].numpy(), None if mask is None else resize_nearest(mask, shape)


def resize_nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (pixel centres, as torch ``nearest-exact``)."""
    index = [np.minimum(((np.arange(t) + 0.5) * (s / t)).astype(np.int64), s - 1) for t, s in zip(shape, mask.shape)]
    return np.ascontiguousarray(mask[np.ix_(*index)], dtype=np.uint8)


def to_training_size(
    image: np.ndarray, mask: np.ndarray | None, size: int, mode: str = "resize"
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Resize/pad one case to ``size`` per side and z-score it.

    Args:
        image: ``(C, *spatial)`` raw intensities (any real dtype).
        mask: ``(*spatial)`` integer label map, or ``None``.
        size: training side length.
        mode: ``"resize"`` or ``"pad"`` (see the module docstring).

    Returns:
        ``(image (C, *[size]*d) float32, mask (*[size]*d) uint8 | None, info)`` where ``info`` has
        ``scale`` (resized shape / original shape per axis) and ``pad`` ((before, after) per axis).
    """
    if mode not in ("resize", "pad"):
        raise ValueError(f"resize mode must be 'resize' or 'pad', got {mode!r}")
    spatial = tuple(int(s) for s in image.shape[1:])
    if mode == "resize":
        target = (size,) * len(spatial)
    else:
        factor = size / max(spatial)
        target = tuple(min(size, max(1, int(round(s * factor)))) for s in spatial)
    resized, resized_mask = _resample(image, mask, target)
    normalised = zscore(resized)
    pad = [(0, 0)] * len(spatial)
    if mode == "pad" and target != (size,) * len(spatial):
        pad = [((size - t) // 2, size - t - (size - t) // 2) for t in target]
        normalised = np.pad(normalised, [(0, 0), *pad], mode="constant", constant_values=0.0)
        if resized_mask is not None:
            resized_mask = np.pad(resized_mask, pad, mode="constant", constant_values=0)
    info = {"scale": [t / s for t, s in zip(target, spatial)], "pad": [list(p) for p in pad]}
    return normalised, (None if resized_mask is None else resized_mask.astype(np.uint8, copy=False)), info
