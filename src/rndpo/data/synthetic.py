"""The embedded synthetic data set: lesion-like shapes on textured, noisy, ultrasound-like backgrounds.

Each image (or small volume) holds one lesion, sometimes two: an ellipse (ellipsoid) of random size,
aspect and orientation whose boundary is wobbled by a few random low-frequency harmonics. The
background is smooth low-frequency shading plus mid-frequency texture; the lesion is darker
(hypoechoic, 75 %) or brighter than its surroundings with a random contrast (about 20 % of the cases
are low-contrast), has its own interior texture and a soft edge of random width. Fainter
"distractor" blobs of the same polarity that are *not* in the mask, multiplicative speckle-like
noise, additive noise and, for some cases, a final blur make the task learnable but not trivial:
a small UNet reaches Dice of roughly 0.8-0.9, not 1.0, and its proposals differ.

Every two consecutive images are one fake "patient" (``patient_id``; :attr:`SegDataset.groups`):
they share the low-frequency background shading and the lesion polarity, so a split that is not
grouped would leak, just as with real data.

Everything is drawn from ``numpy.random.default_rng`` seeded by ``SyntheticConfig.seed``; the same
config gives the same data set bit for bit. Generation is vectorised over chunks of images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from rndpo.config import SyntheticConfig
from rndpo.data.dataset import SegDataset
from rndpo.data.preprocess import NORMALISATION, zscore

__all__ = ["make_synthetic"]

_CHUNK_2D = 64
_CHUNK_3D = 8
_HARMONICS = 4
_IMAGES_PER_PATIENT = 2


def _unit_vectors(rng: np.random.Generator, shape: tuple[int, ...], dims: int) -> np.ndarray:
    vectors = rng.normal(size=(*shape, dims))
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _draw_parameters(n: int, dims: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All per-image random parameters, drawn up front (deterministic, independent of chunking)."""
    n_patients = (n + _IMAGES_PER_PATIENT - 1) // _IMAGES_PER_PATIENT
    patient = np.arange(n) // _IMAGES_PER_PATIENT
    p: dict[str, np.ndarray] = {}
    # lesions: slot 0 always present, slot 1 in ~25 % of the images
    p["n_lesions"] = 1 + (rng.random(n) < 0.25).astype(np.int64)
    p["center"] = rng.uniform(0.25, 0.75, size=(n, 2, dims))
    p["radius"] = np.exp(rng.uniform(np.log(0.08), np.log(0.25), size=(n, 2)))
    p["radius"][:, 1] *= 0.75  # a second lesion tends to be smaller
    p["axes"] = rng.uniform(0.55, 1.0, size=(n, 2, dims))
    p["axes"][..., 0] = 1.0
    p["rotation"] = np.stack([_random_rotation(rng, dims) for _ in range(n * 2)]).reshape(n, 2, dims, dims)
    p["wobble_amp"] = rng.uniform(0.0, 0.1, size=(n, 2, _HARMONICS))
    p["wobble_freq"] = rng.uniform(0.5, 2.0, size=(n, 2, _HARMONICS))
    p["wobble_phase"] = rng.uniform(0, 2 * np.pi, size=(n, 2, _HARMONICS))
    p["wobble_dir"] = _unit_vectors(rng, (n, 2, _HARMONICS), dims)
    # appearance
    patient_dark = rng.random(n_patients) < 0.75
    p["polarity"] = np.where(patient_dark[patient], -1.0, 1.0)
    low_contrast = rng.random(n) < 0.2
    p["low_contrast"] = low_contrast
    p["contrast"] = np.where(low_contrast, rng.uniform(0.22, 0.35, n), rng.uniform(0.4, 0.9, n))
    p["edge_width"] = rng.uniform(0.3, 1.8, n)  # pixels
    p["interior_texture"] = rng.uniform(0.02, 0.12, n)
    p["shading"] = rng.uniform(0.05, 0.25, n)
    p["texture"] = rng.uniform(0.03, 0.1, n)
    p["speckle"] = rng.uniform(0.06, 0.22, n)
    p["noise"] = rng.uniform(0.02, 0.06, n)
    p["blur"] = np.where(rng.random(n) < 0.3, rng.uniform(0.6, 1.5, n), 0.0)
    # distractors: faint blobs of the same polarity that are not lesions
    p["n_distractors"] = rng.choice(3, size=n, p=[0.45, 0.35, 0.2])
    p["distractor_center"] = rng.uniform(0.1, 0.9, size=(n, 2, dims))
    p["distractor_radius"] = rng.uniform(0.04, 0.12, size=(n, 2))
    p["distractor_contrast"] = rng.uniform(0.2, 0.5, size=(n, 2))
    p["patient"] = patient
    return p


def _random_rotation(rng: np.random.Generator, dims: int) -> np.ndarray:
    if dims == 2:
        angle = rng.uniform(0, 2 * np.pi)
        c, s = math.cos(angle), math.sin(angle)
        return np.array([[c, -s], [s, c]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _smooth_noise(rng: np.random.Generator, n: int, size: int, dims: int, sigma: float, down: int = 1) -> np.ndarray:
    """Unit-std Gaussian noise smoothed with ``sigma`` pixels (computed at 1/``down`` resolution)."""
    low = max(4, size // down)
    noise = rng.standard_normal((n, *(low,) * dims), dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0, *(sigma / down,) * dims), mode="wrap")
    if low != size:
        mode = "bilinear" if dims == 2 else "trilinear"
        noise = F.interpolate(torch.from_numpy(noise)[:, None], size=(size,) * dims, mode=mode, align_corners=False)[:, 0].numpy()
    std = noise.reshape(n, -1).std(axis=1).reshape((n,) + (1,) * dims)
    return noise / np.maximum(std, 1e-6)


def _shape_field(coords: np.ndarray, center: np.ndarray, radius: np.ndarray, axes: np.ndarray,
                 rotation: np.ndarray, amp: np.ndarray, freq: np.ndarray, phase: np.ndarray,
                 direction: np.ndarray, size: int) -> np.ndarray:
    """Signed distance-like field in pixels (> 0 inside) of one wobbly ellipse per image.

    coords: (P, d) pixel coordinates in [0, 1); center (n, d); radius (n,); axes (n, d);
    rotation (n, d, d); amp/freq/phase (n, H); direction (n, H, d). Returns (n, P).
    """
    dims = coords.shape[1]
    coords = coords.astype(np.float32)
    scale = (radius[:, None] * axes).astype(np.float32)  # (n, d)
    local = []
    for e in range(dims):  # rotate into the ellipse frame: local_e = sum_d offset_d R[d, e]
        acc = np.zeros((center.shape[0], coords.shape[0]), dtype=np.float32)
        for d in range(dims):
            acc += (coords[None, :, d] - center[:, d, None].astype(np.float32)) * rotation[:, d, e, None].astype(np.float32)
        local.append(acc / scale[:, e, None])
    rho = np.sqrt(sum(component * component for component in local))  # (n, P), 1 on the unwobbled boundary
    inv_rho = 1.0 / np.maximum(rho, 1e-6)
    wobble = np.zeros_like(rho)
    for h in range(amp.shape[1]):
        projection = sum(local[d] * direction[:, h, d, None].astype(np.float32) for d in range(dims)) * inv_rho
        wobble += amp[:, h, None].astype(np.float32) * np.cos(
            projection * (freq[:, h, None] * np.pi).astype(np.float32) + phase[:, h, None].astype(np.float32))
    boundary = 1.0 + wobble
    return (boundary - rho) * (radius[:, None] * size).astype(np.float32)


def _render_chunk(p: dict[str, np.ndarray], index: np.ndarray, size: int, dims: int,
                  rng: np.random.Generator, shading: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(index)
    grid = np.stack(np.meshgrid(*[(np.arange(size) + 0.5) / size] * dims, indexing="ij"), axis=-1).reshape(-1, dims)
    spatial = (size,) * dims
    expand = (n,) + (1,) * dims

    def col(name: str) -> np.ndarray:
        return p[name][index].reshape(expand)

    lesion_soft = np.zeros((n, grid.shape[0]), dtype=np.float32)
    mask = np.zeros((n, grid.shape[0]), dtype=bool)
    for slot in range(2):
        rows = np.flatnonzero(p["n_lesions"][index] > slot)
        if rows.size == 0:
            continue
        sub = index[rows]
        field = _shape_field(
            grid, p["center"][sub, slot], p["radius"][sub, slot], p["axes"][sub, slot],
            p["rotation"][sub, slot], p["wobble_amp"][sub, slot], p["wobble_freq"][sub, slot],
            p["wobble_phase"][sub, slot], p["wobble_dir"][sub, slot], size,
        )
        mask[rows] |= field > 0
        soft = 1.0 / (1.0 + np.exp(np.clip(-field / p["edge_width"][sub].astype(np.float32)[:, None], -30.0, 30.0)))
        lesion_soft[rows] = np.maximum(lesion_soft[rows], soft)
    distractor_soft = np.zeros((n, grid.shape[0]), dtype=np.float32)
    for slot in range(2):
        rows = np.flatnonzero(p["n_distractors"][index] > slot)
        if rows.size == 0:
            continue
        sub = index[rows]
        dist2 = sum((grid[None, :, d].astype(np.float32) - p["distractor_center"][sub, slot, d, None].astype(np.float32)) ** 2 for d in range(dims))
        dist2 = dist2 / (p["distractor_radius"][sub, slot, None].astype(np.float32) ** 2)
        blob = np.exp(-0.5 * (2.56 * dist2) ** 2) * p["distractor_contrast"][sub, slot, None].astype(np.float32)
        distractor_soft[rows] = np.maximum(distractor_soft[rows], blob)

    lesion_soft = lesion_soft.reshape(n, *spatial)
    distractor_soft = distractor_soft.reshape(n, *spatial)
    texture = _smooth_noise(rng, n, size, dims, sigma=max(1.0, size / 40))
    interior = _smooth_noise(rng, n, size, dims, sigma=max(1.0, size / 60))
    speckle = _smooth_noise(rng, n, size, dims, sigma=0.7)
    additive = rng.standard_normal((n, *spatial), dtype=np.float32)

    background = 1.0 + col("shading") * shading + col("texture") * texture
    polarity, contrast = col("polarity"), col("contrast")
    intensity = background * (1.0 + polarity * contrast * (lesion_soft + distractor_soft * (1 - lesion_soft)))
    intensity = intensity + col("interior_texture") * interior * lesion_soft
    intensity = intensity * np.exp(col("speckle") * speckle - 0.5 * col("speckle") ** 2)
    intensity = intensity + col("noise") * additive
    blur = p["blur"][index]
    for level in np.unique(blur[blur > 0]):
        chosen = np.flatnonzero(blur == level)
        intensity[chosen] = ndimage.gaussian_filter(intensity[chosen], sigma=(0, *(level,) * dims))
    return intensity.astype(np.float32), mask.reshape(n, *spatial).astype(np.uint8)


def make_synthetic(cfg: SyntheticConfig | None = None) -> SegDataset:
    """Generate the synthetic lesion data set (binary: background 0, lesion 1).

    Args:
        cfg: number of images, side length, 2D/3D and seed (defaults: 500 images of 96², seed 0).

    Returns:
        A :class:`SegDataset` with ``images`` ``(N, 1, *[size]*d)`` float32 (z-scored per image),
        ``masks`` ``(N, *[size]*d)`` uint8 in {0, 1}, ``case_ids`` ``syn_0000``..., ``groups`` = fake
        patient ids (two consecutive images each), ``num_classes`` 2, and ``meta["metadata"]`` with
        per-case ``patient_id``, ``n_lesions``, ``polarity``, ``contrast`` and ``low_contrast``.
    """
    cfg = cfg or SyntheticConfig()
    n, size, dims = cfg.n_images, cfg.size, cfg.spatial_dims
    rng = np.random.default_rng(cfg.seed)
    params = _draw_parameters(n, dims, rng)
    chunk = _CHUNK_2D if dims == 2 else _CHUNK_3D
    images = np.empty((n, 1, *(size,) * dims), dtype=np.float32)
    masks = np.empty((n, *(size,) * dims), dtype=np.uint8)
    for start in range(0, n, chunk):
        index = np.arange(start, min(n, start + chunk))
        patients = params["patient"][index]
        first = int(patients.min())
        # one low-frequency shading field per patient, shared by its images
        patient_rng = np.random.default_rng([cfg.seed, 1, first])
        patient_shading = _smooth_noise(patient_rng, int(patients.max()) - first + 1, size, dims, sigma=size / 6, down=4)
        shading = patient_shading[patients - first]
        chunk_rng = np.random.default_rng([cfg.seed, 2, start])
        intensity, mask = _render_chunk(params, index, size, dims, chunk_rng, shading)
        images[index, 0] = np.stack([zscore(img[None])[0] for img in intensity])
        masks[index] = mask
    case_ids = [f"syn_{i:04d}" for i in range(n)]
    patient_ids = [f"patient_{p:04d}" for p in params["patient"]]
    metadata = {
        "patient_id": patient_ids,
        "n_lesions": [str(int(v)) for v in params["n_lesions"]],
        "polarity": ["dark" if v < 0 else "bright" for v in params["polarity"]],
        "contrast": [f"{v:.3f}" for v in params["contrast"]],
        "low_contrast": [str(bool(v)).lower() for v in params["low_contrast"]],
    }
    meta = {
        "source": "synthetic",
        "format": "synthetic",
        "synthetic": cfg.model_dump(mode="json"),
        "size": size,
        "resize_mode": "resize",
        "normalisation": NORMALISATION,
        "label_names": ["background", "lesion"],
        "channel_names": ["intensity"],
        "group_column": "patient_id",
        "cases": {
            "original_size": [[size] * dims for _ in range(n)],
            "image_files": [[] for _ in range(n)],
            "mask_file": [None] * n,
            "scale": [[1.0] * dims for _ in range(n)],
            "pad": [[[0, 0]] * dims for _ in range(n)],
        },
        "metadata": metadata,
    }
    return SegDataset(images=images, masks=masks, case_ids=case_ids, groups=patient_ids,
                      num_classes=2, spatial_dims=dims, meta=meta)
