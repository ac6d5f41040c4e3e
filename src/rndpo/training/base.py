"""Supervised training of the base segmenter on the labeled split.

``train_base(labeled, val, model_cfg, train_cfg, out_dir)`` reads top to bottom: one seeded loop of
AdamW steps (cosine schedule after a short warm-up) on MONAI DiceCE
(:class:`rndpo.training.losses.SupervisedLoss`: sigmoid for one logit channel, softmax + one-hot for
``C`` channels), with MONAI dictionary augmentation applied to each batch, validation Dice at the end
of every epoch and checkpoints. ``out_dir`` ends up holding

- ``best.safetensors`` / ``best.json``: the weights with the best validation Dice (the last weights
  when there is no validation set) and the metadata :func:`rndpo.training.checkpoint.load_model` needs;
- ``last.safetensors`` / ``last.json``: the final weights;
- ``snap_000.safetensors`` ...: ``train_cfg.snapshots`` evenly spaced snapshots (for the
  ``checkpoints`` proposal generator), the last one at the final step;
- ``train_log.jsonl``: one record per evaluation (step, epoch, loss, lr, val_dice, best_val_dice, elapsed_s);
- ``summary.json``: best validation Dice and step, steps, wall time;
- ``state.safetensors``: the full resumable state (model, optimizer, schedule, RNG, step, history),
  written atomically every ``train_cfg.checkpoint_every`` steps and at the end.

Calling ``train_base`` again with the same ``out_dir`` resumes from ``state.safetensors`` and ends with
the same weights as an uninterrupted run (CPU, same thread count): the data order and the
augmentation are pure functions of ``(seed, step)`` and the global RNG (dropout) is restored. A
finished run returns at once. A state written for another configuration or other data raises
:class:`rndpo.errors.CheckpointError` (use a new folder).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rndpo.config import BaseTrainConfig, ModelConfig, config_hash
from rndpo.errors import CheckpointError, DataError
from rndpo.io import append_jsonl, write_json
from rndpo.metrics import dice_per_case
from rndpo.models import build_model, check_input_size, logits_to_labels, out_channels_for, predict_logits
from rndpo.training import distributed
from rndpo.training.checkpoint import model_meta, save_model
from rndpo.training.loop import (
    cosine_schedule,
    derive_seed,
    load_training_state,
    make_optimizer,
    rewind_jsonl,
    save_training_state,
    seed_everything,
)
from rndpo.training.losses import SupervisedLoss

__all__ = ["train_base", "build_augmentation", "augment_batch", "total_steps_for", "snapshot_steps", "StepCallback"]

#: ``callback(step, record)`` after every optimizer step (``step`` counts from 1); ``record`` holds
#: ``loss`` and ``lr`` (and ``val_dice`` after an evaluation). Raising in it stops training (the
#: full state at the last ``checkpoint_every`` multiple stays on disk for resuming).
StepCallback = Callable[[int, dict[str, Any]], None]

STATE_FILE = "state.safetensors"
LOG_FILE = "train_log.jsonl"


def total_steps_for(n_labeled: int, cfg: BaseTrainConfig) -> tuple[int, int]:
    """``(total_steps, steps_per_epoch)``: ``cfg.steps`` when set, else ``cfg.epochs`` passes of
    ``ceil(n_labeled / batch_size)`` steps."""
    steps_per_epoch = max(1, math.ceil(n_labeled / cfg.batch_size))
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    return int(total), steps_per_epoch


def snapshot_steps(total_steps: int, snapshots: int) -> list[int]:
    """Steps of ``snapshots`` evenly spaced snapshots: ``round(total * (i + 1) / snapshots)``, deduplicated."""
    return sorted({max(1, round(total_steps * (i + 1) / snapshots)) for i in range(snapshots)}) if snapshots else []


def build_augmentation(spatial_dims: int):
    """MONAI dictionary augmentation for ``{"image": (C, *spatial), "label": (1, *spatial)}`` tensors.

    Left-right flip (2D: the last axis only, as ultrasound and most 2D modalities have a meaningful
    top; 3D: every axis), each with p = 0.5; affine with p = 0.5: rotation up to ±15° (about every
    axis in 3D) and scaling by ±10 %, bilinear for the image, nearest for the label, zero padding
    (the mean of a z-scored image); intensity scale by ±10 % and shift by ±0.1 (z units), p = 0.5 each.
    """
    from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "label"]
    axes = [spatial_dims - 1] if spatial_dims == 2 else list(range(spatial_dims))
    rotate = (math.pi / 12,) if spatial_dims == 2 else (math.pi / 12,) * 3
    transforms = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in axes]
    transforms += [
        RandAffined(
            keys=keys,
            prob=0.5,
            rotate_range=rotate,
            scale_range=(0.1,) * spatial_dims,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]
    return Compose(transforms)


def _plain(tensor: Any) -> torch.Tensor:
    as_tensor = getattr(tensor, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else torch.as_tensor(tensor)


def augment_batch(transform, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``transform`` sample by sample, seeded by ``seed`` (a pure function of it).

    Args:
        transform: from :func:`build_augmentation`.
        images: ``(B, C, *spatial)`` float32.
        labels: ``(B, *spatial)`` integer label maps.
        seed: seeds the transform's random state for this batch.

    Returns:
        ``(images (B, C, *spatial) float32, labels (B, *spatial) int64)``.
    """
    transform.set_random_state(seed=seed)
    out_images, out_labels = [], []
    for image, label in zip(images, labels):
        sample = transform({"image": image, "label": label[None].float()})
        out_images.append(_plain(sample["image"]).float())
        out_labels.append(_plain(sample["label"])[0].round().long())
    return torch.stack(out_images), torch.stack(out_labels)


def _check_datasets(labeled: Any, val: Any | None, model_cfg: ModelConfig) -> None:
    if labeled is None or len(labeled) == 0:
        raise DataError("the labeled split is empty: nothing to train the base model on")
    if labeled.masks is None:
        raise DataError("the labeled split has no masks")
    check_input_size(model_cfg, labeled.images.shape[2:])
    if val is not None and len(val):
        if val.masks is None:
            raise DataError("the validation split has no masks")
        if val.images.shape[1:] != labeled.images.shape[1:] or val.num_classes != labeled.num_classes:
            raise DataError(
                f"validation images {tuple(val.images.shape[1:])} / {val.num_classes} classes do not match "
                f"labeled images {tuple(labeled.images.shape[1:])} / {labeled.num_classes} classes"
            )


def _fingerprint(labeled: Any, val: Any | None, model_cfg: ModelConfig, train_cfg: BaseTrainConfig) -> str:
    data = {
        "labeled": list(labeled.case_ids),
        "val": list(val.case_ids) if val is not None else [],
        "shape": list(labeled.images.shape[1:]),
        "num_classes": int(labeled.num_classes),
    }
    training = train_cfg.model_dump(mode="json", exclude={"checkpoint_every"})  # does not change the result
    return config_hash(model_cfg, training, data)


def _validation_dice(model: torch.nn.Module, val: Any | None, batch_size: int) -> float | None:
    if val is None or len(val) == 0:
        return None
    labels = logits_to_labels(predict_logits(model, val.images, batch_size=batch_size))
    return float(dice_per_case(labels, val.masks, val.num_classes).mean())


class _Progress:
    """A rich progress bar on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("base"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
        )
        self.bar.start()
        self.task = self.bar.add_task("base", total=total, completed=start, info="")

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_base(
    dataset_labeled: Any,
    dataset_val: Any | None,
    model_cfg: ModelConfig,
    train_cfg: BaseTrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    callback: StepCallback | None = None,
    eval_batch_size: int = 32,
    dist_info: "distributed.DistInfo | None" = None,
) -> Path:
    """Train the base segmenter on ``dataset_labeled``, select it on ``dataset_val``; resumable.

    Args:
        dataset_labeled: a :class:`rndpo.data.SegDataset` with masks (the labeled split).
        dataset_val: labeled validation split for model selection, or ``None`` (best = last).
        model_cfg: the network.
        train_cfg: epochs or steps, batch size, AdamW lr / weight decay, augmentation, snapshots,
            ``checkpoint_every``, seed.
        out_dir: run folder (created); see the module docstring for what it holds.
        progress: show a progress bar (loss, validation Dice) on stderr.
        callback: called after every step, see :data:`StepCallback`.
        eval_batch_size: images per forward pass when validating.
        dist_info: under torchrun, :func:`rndpo.training.distributed.init`'s result: each step's
            (augmented) batch is split over the ranks, gradients are averaged by DDP with each rank's
            loss weighted by its share of the batch, and rank 0 alone validates and writes. ``None``:
            one process. With dropout off this equals the single-process run up to summation order
            (dropout draws differ per rank; the norms are instance norms, so no batch statistics).

    Returns:
        Path of ``best.safetensors``.

    Raises:
        DataError: empty labeled split, missing masks, mismatching validation data.
        ValueError: spatial size not divisible as the architecture needs.
        CheckpointError: ``out_dir`` holds an unreadable state, or one from another config / data.
    """
    _check_datasets(dataset_labeled, dataset_val, model_cfg)
    if dataset_val is not None and len(dataset_val) == 0:
        dataset_val = None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out_dir / STATE_FILE, out_dir / LOG_FILE
    best_path, last_path = out_dir / "best.safetensors", out_dir / "last.safetensors"
    fingerprint = _fingerprint(dataset_labeled, dataset_val, model_cfg, train_cfg)

    n_labeled = len(dataset_labeled)
    total_steps, steps_per_epoch = total_steps_for(n_labeled, train_cfg)
    snaps = snapshot_steps(total_steps, train_cfg.snapshots)
    seed = train_cfg.seed

    seed_everything(seed)
    model = build_model(
        model_cfg,
        spatial_dims=dataset_labeled.spatial_dims,
        in_channels=dataset_labeled.images.shape[1],
        num_classes=dataset_labeled.num_classes,
    )
    optimizer = make_optimizer(model, train_cfg.lr, train_cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, total_steps, warmup_steps=min(100, total_steps // 20))
    loss_fn = SupervisedLoss(out_channels_for(dataset_labeled.num_classes))
    augment = build_augmentation(dataset_labeled.spatial_dims) if train_cfg.augment else None
    images_all = torch.from_numpy(np.ascontiguousarray(dataset_labeled.images, dtype=np.float32))
    masks_all = torch.from_numpy(np.ascontiguousarray(dataset_labeled.masks)).long()

    dist_info = dist_info or distributed.DistInfo()
    main = dist_info.rank == 0
    if dist_info.enabled and train_cfg.batch_size < dist_info.world_size:
        raise DataError(f"batch_size {train_cfg.batch_size} is smaller than the {dist_info.world_size} processes")
    forward = distributed.wrap(model) if dist_info.enabled else model

    step = 0
    extra: dict[str, Any] = {
        "fingerprint": fingerprint, "history": [], "best_val_dice": None, "best_step": None,
        "loss_sum": 0.0, "loss_count": 0, "elapsed_s": 0.0,
    }
    if state_path.exists():
        step, extra = load_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler)
        if extra.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{state_path} belongs to another configuration or other data; "
                f"use a new output folder or delete {out_dir}"
            )
        if main:
            rewind_jsonl(log_path, step)
        if step >= total_steps and best_path.exists() and last_path.exists():
            return best_path
    elif log_path.exists() and main:
        log_path.unlink()  # a log without a state is from a run that never reached a checkpoint

    def meta(kind: str, at_step: int, val_dice: float | None) -> dict[str, Any]:
        return model_meta(
            model_cfg, dataset_labeled, kind=kind, step=at_step, val_dice=val_dice,
            train=train_cfg.model_dump(mode="json"), n_labeled=n_labeled,
        )

    bar = _Progress(progress and main, total_steps, step)
    started = time.perf_counter() - float(extra["elapsed_s"])
    smoothed_loss: float | None = None
    try:
        model.train()
        while step < total_steps:
            # -- batch: a pure function of (seed, step) -------------------------------------------
            epoch, position = divmod(step, steps_per_epoch)
            order = torch.randperm(n_labeled, generator=torch.Generator().manual_seed(derive_seed(seed, 0, epoch)))
            index = order[position * train_cfg.batch_size : (position + 1) * train_cfg.batch_size]
            images, labels = images_all[index], masks_all[index]
            if augment is not None:
                images, labels = augment_batch(augment, images, labels, derive_seed(seed, 1, step))
            # -- one optimizer step ---------------------------------------------------------------
            if dist_info.enabled:  # this rank's share of the batch, weighted by its size (DDP averages)
                share = torch.arange(len(images))[dist_info.rank :: dist_info.world_size]
                weight = max(len(share), 1) * dist_info.world_size / len(images)
                if len(share) == 0:  # a short last batch: stay in step with the others, contribute nothing
                    share, weight = torch.arange(1), 0.0
                images, labels = images[share], labels[share]
            else:
                weight = 1.0
            logits = forward(images)
            loss = loss_fn(logits, labels) * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = float(loss.detach())
            extra["loss_sum"] += loss_value
            extra["loss_count"] += 1
            smoothed_loss = loss_value if smoothed_loss is None else 0.9 * smoothed_loss + 0.1 * loss_value
            record: dict[str, Any] = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
            # -- end of an epoch: validate, log, keep the best (rank 0) ------------------------------
            if not main:
                continue
            if step % steps_per_epoch == 0 or step == total_steps:
                val_dice = _validation_dice(model, dataset_val, eval_batch_size)
                model.train()
                best = extra["best_val_dice"]
                if val_dice is None or best is None or val_dice > best:
                    extra["best_val_dice"], extra["best_step"] = val_dice, step
                    save_model(best_path, model, meta("best", step, val_dice))
                log = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "loss": extra["loss_sum"] / max(1, extra["loss_count"]),
                    "lr": record["lr"],
                    "val_dice": val_dice,
                    "best_val_dice": extra["best_val_dice"],
                    "elapsed_s": round(time.perf_counter() - started, 2),
                }
                extra["history"].append(log)
                extra["loss_sum"], extra["loss_count"] = 0.0, 0
                append_jsonl(log_path, log)
                record["val_dice"] = val_dice
            if step in snaps:
                save_model(out_dir / f"snap_{snaps.index(step):03d}.safetensors", model, meta("snapshot", step, None))
            if step == total_steps:
                save_model(last_path, model, meta("last", step, extra["history"][-1]["val_dice"]))
            if step % train_cfg.checkpoint_every == 0 or step == total_steps:
                extra["elapsed_s"] = time.perf_counter() - started
                save_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler, step=step, extra=extra)
            val_text = "" if extra["best_val_dice"] is None else f" val Dice {extra['history'][-1]['val_dice']:.3f}"
            bar.update(step, f"loss {smoothed_loss:.3f}{val_text}")
            if callback is not None:
                callback(step, record)
    finally:
        bar.close()
    if dist_info.enabled:  # (a process group may exist without this run being distributed: rndpo run's stages)
        distributed.barrier()
    if not main:
        return best_path
    write_json(
        out_dir / "summary.json",
        {
            "best_val_dice": extra["best_val_dice"],
            "best_step": extra["best_step"],
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "n_labeled": n_labeled,
            "n_val": 0 if dataset_val is None else len(dataset_val),
            "wall_s": round(time.perf_counter() - started, 2),
            "snapshots": [f"snap_{i:03d}.safetensors" for i in range(len(snaps))],
        },
    )
    return best_path
