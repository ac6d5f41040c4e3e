"""Generic pieces of every rndpo training loop: seeding, optimizer + schedule, and resumable
full-state checkpoints. The base trainer and the preference trainer both use them.

API
---
Seeding
    ``seed_everything(seed)``            seeds Python ``random``, NumPy and torch (CPU and CUDA).
    ``derive_seed(*parts) -> int``       a 31-bit seed from integers, e.g. ``derive_seed(seed, step)``:
                                         randomness that is a pure function of (seed, step) needs no
                                         state to resume (data order, augmentation).
    ``rng_state() / set_rng_state(s)``   capture / restore the global Python, NumPy and torch RNGs.

Optimisation
    ``make_optimizer(model, lr, weight_decay)``          AdamW (no decay on biases and norm weights).
    ``cosine_schedule(optimizer, total_steps, warmup)``  LambdaLR: linear warm-up, cosine to zero.

Full-state checkpoints (one ``.safetensors`` file, written atomically: temp file + rename)
    ``save_state(path, state)`` / ``load_state(path) -> state``
        Any nested dict/list/tuple of tensors, NumPy arrays, numbers, strings, bools and None. Tensors
        go in the safetensors body, everything else in a JSON tree in the safetensors header, with a
        SHA-256 of the tensor bytes: a truncated or corrupted file raises
        :class:`rndpo.errors.CheckpointError` naming the file. No pickle anywhere.
    ``save_training_state(path, *, model, optimizer, scheduler=None, step, extra=None)``
    ``load_training_state(path, *, model, optimizer=None, scheduler=None) -> (step, extra)``
        model + optimizer + scheduler state, global RNG states, the step and a free ``extra`` dict
        (history, best score, running sums...). Loading restores everything in place.

Logs
    ``rewind_jsonl(path, step)``   drop records with ``record["step"] > step`` (after a resume, the steps
                                   that are redone would otherwise be logged twice).

Resume recipe (what :func:`rndpo.training.base.train_base` does)::

    seed_everything(cfg.seed); model = build(...); optimizer = ...; scheduler = ...
    step, extra = 0, {}
    if state_path.exists():
        step, extra = load_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler)
        rewind_jsonl(log_path, step)
    while step < total_steps:
        batch = batch_for(derive_seed(cfg.seed, step))   # a pure function of the step
        ...; step += 1
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                step=step, extra=extra)

An interrupted run restarted this way ends with the same weights as an uninterrupted one (on CPU,
same thread count).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rndpo.errors import CheckpointError
from rndpo.io import atomic_path, read_jsonl, to_jsonable

__all__ = [
    "seed_everything",
    "derive_seed",
    "rng_state",
    "set_rng_state",
    "make_optimizer",
    "cosine_schedule",
    "save_state",
    "load_state",
    "save_training_state",
    "load_training_state",
    "rewind_jsonl",
    "STATE_FORMAT",
]

#: Value of the ``rndpo_format`` header entry of a full-state checkpoint.
STATE_FORMAT = "rndpo-state-v1"


# --------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**31)`` derived from integers (stable across runs and platforms)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA when available)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------------------- optimisation
def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters; biases and 1-D (norm) weights get no weight decay."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine decay to zero at ``total_steps`` (call ``.step()``
    once per optimizer step)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------- state (de)serialising
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors/arrays in a nested structure by references into ``tensors``; JSON-able result."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        array = np.ascontiguousarray(value)
        stored = array if array.dtype in (np.float32, np.float64, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_) else array.astype(np.int64)
        tensors[key] = torch.from_numpy(stored.copy())
        return {"__ndarray__": key, "dtype": str(array.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: _pack(v, tensors) for k, v in value.items()}
        return {"__dict__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return _pack(value.item(), tensors)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a state checkpoint")


def _unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if set(value) == {"__ndarray__", "dtype"}:
            return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
        if len(value) == 1 and "__tuple__" in value:
            return tuple(_unpack(v, tensors) for v in value["__tuple__"])
        if len(value) == 1 and "__dict__" in value:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value["__dict__"]}
        if len(value) == 1 and "__float__" in value:
            return float(value["__float__"])
        return {k: _unpack(v, tensors) for k, v in value.items()}
    return value


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a nested state (see the module docstring) to one ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _pack(state, tensors)
    header = {
        "rndpo_format": STATE_FORMAT,
        "rndpo_tree": json.dumps(tree, allow_nan=False, separators=(",", ":")),
        "rndpo_sha256": _tensor_digest(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`save_state`.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted (checksum) or not an rndpo state;
            the message names the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("rndpo_format") != STATE_FORMAT:
                raise CheckpointError(f"{path} is not an rndpo state checkpoint (format {header.get('rndpo_format')!r})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if _tensor_digest(tensors) != header.get("rndpo_sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupted (checksum mismatch)")
        return _unpack(json.loads(header["rndpo_tree"]), tensors)
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated / garbled files
        raise CheckpointError(f"cannot read checkpoint {path}: {' '.join(str(error).split()) or type(error).__name__}") from error


def save_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomically save model, optimizer, scheduler, global RNG states, ``step`` and ``extra``."""
    state = {
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    save_state(path, state)


def load_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore a :func:`save_training_state` checkpoint in place; returns ``(step, extra)``.

    Raises:
        CheckpointError: unreadable file, or a state that does not fit ``model`` / ``optimizer``.
    """
    state = load_state(path)
    try:
        model.load_state_dict(state["model"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return int(state["step"]), dict(state.get("extra") or {})
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {' '.join(str(error).split())[:300]}") from error


def rewind_jsonl(path: str | os.PathLike, step: int) -> None:
    """Keep only the records of a JSON-lines log whose ``step`` is ``<= step`` (atomic rewrite)."""
    path = Path(path)
    if not path.exists():
        return
    records = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in records))
