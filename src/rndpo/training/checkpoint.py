"""Model checkpoints: weights as ``.safetensors`` plus a sidecar ``.json`` that rebuilds the model.

``save_model("run/base/best.safetensors", model, meta)`` writes

- ``best.safetensors``: the model's ``state_dict`` (plain tensor names, loadable by any safetensors
  reader), written atomically;
- ``best.json``: ``meta`` plus ``weights_sha256`` (checksum of the weights file) and ``format``.

``meta`` must hold what :func:`load_model` needs to rebuild the network alone: ``model`` (the
:class:`rndpo.config.ModelConfig` as a dict), ``num_classes``, ``in_channels``, ``spatial_dims``; the
trainers also record ``arch``, ``size`` (training size per side), ``normalisation`` (how the images
were normalised) and the step / scores of the checkpoint. :func:`model_meta` builds it from a data set.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rndpo import __version__
from rndpo.config import ModelConfig
from rndpo.errors import CheckpointError
from rndpo.io import atomic_path, read_json, write_json

__all__ = ["save_model", "load_model", "load_weights", "model_meta", "resolve_checkpoint", "MODEL_FORMAT", "REQUIRED_META"]

#: ``format`` entry of the sidecar JSON.
MODEL_FORMAT = "rndpo-model-v1"
#: Keys ``meta`` must contain for :func:`load_model` to rebuild the network.
REQUIRED_META = ("model", "num_classes", "in_channels", "spatial_dims")


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_meta(model_cfg: ModelConfig, dataset: Any, **extra: Any) -> dict[str, Any]:
    """The metadata :func:`save_model` stores, from a model config and a ``SegDataset``.

    Records ``arch``, ``model`` (config dict), ``num_classes``, ``in_channels``, ``spatial_dims``,
    ``size`` (an int when every side is equal, else a list), ``normalisation`` and ``source`` (from
    ``dataset.meta`` when present), the rndpo version, and any ``extra`` keyword.
    """
    spatial = [int(s) for s in dataset.images.shape[2:]]
    data_meta = getattr(dataset, "meta", None) or {}
    meta: dict[str, Any] = {
        "arch": model_cfg.arch,
        "model": model_cfg.model_dump(mode="json"),
        "num_classes": int(dataset.num_classes),
        "in_channels": int(dataset.images.shape[1]),
        "spatial_dims": int(dataset.spatial_dims),
        "size": spatial[0] if len(set(spatial)) == 1 else spatial,
        "normalisation": data_meta.get("normalisation"),
        "source": data_meta.get("source"),
        "rndpo_version": __version__,
    }
    meta.update(extra)
    return meta


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Save ``model``'s weights to ``path`` (``.safetensors``) and ``meta`` to the sidecar ``.json``.

    Both files are written atomically (weights first; the sidecar carries the weights' checksum, so a
    crash between the two is detected on load). Returns ``path``.

    Raises:
        ValueError: ``path`` does not end in ``.safetensors`` or ``meta`` lacks a key of :data:`REQUIRED_META`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model checkpoints end in .safetensors, got {path}")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"meta is missing {', '.join(missing)} (needed to rebuild the model)")
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "rndpo_format": MODEL_FORMAT})
    sidecar = dict(meta)
    sidecar["format"] = MODEL_FORMAT
    sidecar["weights_sha256"] = _file_sha256(path)
    write_json(_sidecar(path), sidecar)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/best.safetensors`` when ``path`` is a folder (a trainer's output)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "base/best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no best.safetensors or last.safetensors in {path}")
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    sidecar = _sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    if not sidecar.is_file():
        raise CheckpointError(f"model metadata not found: {sidecar} (written next to {path.name} by save_model)")
    try:
        meta = read_json(sidecar)
    except (ValueError, OSError) as error:
        raise CheckpointError(f"cannot read model metadata {sidecar}: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{sidecar} is not rndpo model metadata")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointError(f"model metadata {sidecar} lacks {', '.join(missing)}")
    if meta.get("weights_sha256") != _file_sha256(path):
        raise CheckpointError(f"model checkpoint {path} is corrupted or does not match {sidecar.name} (checksum mismatch)")
    return meta


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the weights of checkpoint ``path`` into ``model`` in place (strict)."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    _read_meta(path)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception as error:
        raise CheckpointError(f"cannot load weights {path}: {' '.join(str(error).split())[:300]}") from error


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a :func:`save_model` checkpoint and load its weights.

    Args:
        path: the ``.safetensors`` file, or a run folder holding ``best.safetensors``.
        device: where to put the model.

    Returns:
        ``(model, meta)``: the model in eval mode and the sidecar metadata.

    Raises:
        CheckpointError: missing, truncated or corrupted files, or weights that do not fit the
            recorded architecture; the message names the file.
    """
    from rndpo.models import build_model
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    meta = _read_meta(path)
    try:
        model_cfg = ModelConfig(**meta["model"])
        model = build_model(
            model_cfg,
            spatial_dims=int(meta["spatial_dims"]),
            in_channels=int(meta["in_channels"]),
            num_classes=int(meta["num_classes"]),
        )
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception as error:
        raise CheckpointError(f"cannot load model {path}: {' '.join(str(error).split())[:300]}") from error
    model.to(device)
    model.eval()
    return model, meta
