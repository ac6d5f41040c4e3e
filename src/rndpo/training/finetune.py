"""Preference fine-tuning (DPO, RN-DPO, …) and the baselines, in one readable loop.

    batch of images → ONE forward → all of their pairs scored with ``mask_logps(image_index=…)``
    → ``preference_loss`` against the reference log-ratios stored at mining → step → periodic eval

No reference forward pass runs here: the reference term of each pair is a constant computed once
when the pairs were mined (:func:`rndpo.mining.attach_reference`). Baselines go through the same
loop with another step loss: ``pseudo-label`` / ``oracle`` (DiceCE on a per-image target: the
judge's top proposal / the ground truth), ``entropy-min`` and ``mean-teacher``; ``base`` only evaluates.

The run folder gets ``metrics.jsonl`` (one record per evaluation, step 0 = the base model) and,
every ``checkpoint_every`` steps, ``state.safetensors``: the full training state (model, optimizer,
scheduler, RNG, step, teacher), written atomically; calling :func:`finetune` again on the same
folder resumes from it and ends with the same metrics as an uninterrupted run (deterministic on CPU).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rndpo.config import OBJECTIVES, FinetuneConfig
from rndpo.errors import RndpoError
from rndpo.io import append_jsonl, read_jsonl, to_jsonable
from rndpo.metrics import evaluate
from rndpo.models import set_dropout
from rndpo.objectives import mask_logps, preference_loss
from rndpo.training.losses import SupervisedLoss, consistency_loss, ema_update, entropy_loss
from rndpo.training import distributed
from rndpo.training.loop import load_training_state, rewind_jsonl, save_training_state, seed_everything

__all__ = ["FinetuneInputs", "finetune", "evaluate_all", "batch_cases", "METRICS_FILE", "STATE_FILE"]

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.safetensors"
_TRAIN_KEYS = (
    "train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "region/mean", "pairs/truly_better",
)


@dataclass
class FinetuneInputs:
    """What fine-tuning reads; which fields are needed depends on the method.

    Attributes:
        pool_images: ``(N, C_in, *spatial)`` float32 unlabeled pool, in bank order.
        bank: proposal bank of the pool (preference methods, ``sft_weight``).
        pairs: mined pairs with reference columns (preference methods).
        targets: ``(N, *spatial)`` per-image target label maps: the judge's top proposal
            (``pseudo-label``) or the ground truth (``oracle``).
        labeled: labeled split (``mean-teacher``'s supervised part): ``images``, ``masks``.
        truly_better: ``(P,)`` bool, whether each pair's chosen mask is truly better. A diagnostic
            logged as ``pairs/truly_better``; never used for training.
    """

    pool_images: np.ndarray
    bank: object | None = None
    pairs: object | None = None
    targets: np.ndarray | None = None
    labeled: object | None = None
    truly_better: np.ndarray | None = None


def batch_cases(step: int, population: np.ndarray, per_step: int, seed: int) -> np.ndarray:
    """The cases of optimizer step ``step``: epochs of seeded permutations, read without state.

    The k-th case drawn overall is ``perm_e[k mod n]`` with ``e = k div n`` and ``perm_e`` a
    permutation seeded by ``(seed, e)``, so a resumed run draws exactly what it would have drawn.
    """
    n = len(population)
    if n == 0:
        raise RndpoError("nothing to train on: the population of cases is empty")
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(k, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(population[perm[position]])
    # a case drawn twice in one batch (n < per_step) is kept once
    return np.asarray(list(dict.fromkeys(int(c) for c in out)), dtype=np.int64)


class _StepLoss:
    """Per-method loss of one batch of pool cases: ``(loss, stats)``."""

    def __init__(self, model: torch.nn.Module, cfg: FinetuneConfig, inputs: FinetuneInputs, num_channels: int,
                 forward: torch.nn.Module | None = None):
        # ``forward``: what runs the training forward (a DDP wrapper of ``model`` under torchrun)
        self.model, self.cfg, self.inputs = model, cfg, inputs
        self.forward = forward if forward is not None else model
        self.supervised = SupervisedLoss(num_channels)
        self.teacher: torch.nn.Module | None = None
        method = cfg.method
        if method in OBJECTIVES:
            if inputs.pairs is None or inputs.bank is None:
                raise RndpoError(f"method {method!r} needs mined pairs and their proposal bank")
            if len(inputs.pairs) == 0:
                raise RndpoError(f"method {method!r}: no preference pairs were mined (see the mining counts)")
            if not inputs.pairs.has_reference:
                raise RndpoError("pairs lack reference log-ratios: mine them with attach_reference first")
            self.groups = inputs.pairs.group_by_image()
            self.population = np.fromiter(self.groups, dtype=np.int64, count=len(self.groups))
            self.loss_type, self.normalize = OBJECTIVES[method]
        elif method in ("pseudo-label", "oracle"):
            if inputs.targets is None:
                raise RndpoError(f"method {method!r} needs per-image targets")
            self.population = np.arange(len(inputs.pool_images))
        elif method == "entropy-min":
            self.population = np.arange(len(inputs.pool_images))
        elif method == "mean-teacher":
            if inputs.labeled is None or getattr(inputs.labeled, "masks", None) is None:
                raise RndpoError("method 'mean-teacher' needs the labeled split")
            self.population = np.arange(len(inputs.pool_images))
            self.teacher = copy.deepcopy(model)
            for param in self.teacher.parameters():
                param.requires_grad_(False)
        elif method != "base":
            raise RndpoError(f"unknown method {method!r}")

    def __call__(self, step: int, cases: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        images = torch.from_numpy(np.ascontiguousarray(self.inputs.pool_images[cases]))
        method = self.cfg.method
        if method in OBJECTIVES:
            return self._preference(images, cases)
        logits = self.forward(images)
        if method in ("pseudo-label", "oracle"):
            targets = torch.from_numpy(np.ascontiguousarray(self.inputs.targets[cases])).long()
            return self.supervised(logits, targets), {}
        if method == "entropy-min":
            return entropy_loss(logits), {}
        # mean-teacher: supervised on a labeled batch + consistency with the EMA teacher on the pool
        labeled = self.inputs.labeled
        pick = batch_cases(step, np.arange(len(labeled.images)), len(cases), self.cfg.seed + 1)
        sup_logits = self.forward(torch.from_numpy(np.ascontiguousarray(labeled.images[pick])))
        sup = self.supervised(sup_logits, torch.from_numpy(np.ascontiguousarray(labeled.masks[pick])).long())
        with torch.no_grad():
            teacher_logits = self.teacher(images + 0.1 * torch.randn_like(images))
        consistency = consistency_loss(logits, teacher_logits)
        return sup + consistency, {"loss/consistency": float(consistency.detach())}

    def after_step(self) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.model, self.cfg.ema_decay)

    def _preference(self, images: torch.Tensor, cases: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        pairs, bank, cfg = self.inputs.pairs, self.inputs.bank, self.cfg
        rows = np.concatenate([self.groups[int(c)] for c in cases])
        image_index = np.concatenate([np.full(len(self.groups[int(c)]), i) for i, c in enumerate(cases)])
        masks = {int(c): torch.from_numpy(bank.masks(int(c))) for c in cases}
        chosen = torch.stack([masks[int(pairs.case_index[r])][pairs.chosen[r]] for r in rows])
        rejected = torch.stack([masks[int(pairs.case_index[r])][pairs.rejected[r]] for r in rows])
        index = torch.from_numpy(image_index)

        logits = self.forward(images)  # ONE forward for all pairs of these images
        # one gather of the D pixels gives both the log-ratio (for the loss) and the per-mask
        # log-probabilities (for the TRL reward statistics): logratio = chosen_logp − rejected_logp
        chosen_logp, rejected_logp, region = mask_logps(logits, chosen, rejected, image_index=index)
        loss, stats = preference_loss(
            chosen_logp - rejected_logp,
            torch.from_numpy(pairs.ref_logratio[rows]),
            region,
            beta=cfg.beta,
            loss_type=self.loss_type,
            normalize=self.normalize,
            label_smoothing=cfg.label_smoothing if self.loss_type == "robust" else 0.0,
            policy_logps=(chosen_logp.detach(), rejected_logp.detach()),
            ref_logps=(torch.from_numpy(pairs.ref_chosen_logp[rows]), torch.from_numpy(pairs.ref_rejected_logp[rows])),
        )
        if cfg.sft_weight > 0:
            # anchor: the chosen mask of each image's first pair (the judge's top for top-vs-* mining)
            first = [self.groups[int(c)][0] for c in cases]
            anchor = torch.stack([masks[int(c)][pairs.chosen[r]] for c, r in zip(cases, first)]).long()
            sft = self.supervised(logits, anchor)
            loss = loss + cfg.sft_weight * sft
            stats["loss/sft"] = float(sft.detach())
        if self.inputs.truly_better is not None:
            stats["pairs/truly_better"] = float(np.mean(self.inputs.truly_better[rows]))
        return loss, stats


def evaluate_all(model: torch.nn.Module, eval_sets: dict, hd95: bool) -> dict[str, float]:
    """``{"<name>/dice", "<name>/iou", "<name>/hd95"}`` of ``model`` on each named data set (HD95 NaN when off)."""
    record: dict[str, float] = {}
    for split, dataset in eval_sets.items():
        result = evaluate(model, dataset, hd95=hd95)
        for key in ("dice", "iou", "hd95"):
            record[f"{split}/{key}"] = result[key] if (hd95 or key != "hd95") else float("nan")
    return record


def _warmup(total_steps: int) -> Callable[[int], float]:
    warm = max(1, min(20, total_steps // 10))
    return lambda step: min(1.0, (step + 1) / warm)


def finetune(
    model: torch.nn.Module,
    cfg: FinetuneConfig,
    inputs: FinetuneInputs,
    eval_sets: dict,
    out_dir: str | Path,
    *,
    progress: bool = False,
    eval_hd95: bool = True,
    stop_after: int | None = None,
    initial_eval: dict[str, float] | None = None,
) -> list[dict]:
    """Fine-tune ``model`` in place with ``cfg.method`` and return the evaluation records.

    Args:
        model: the base network (from :func:`rndpo.training.checkpoint.load_model`), trained in place.
        cfg: method, β, learning rate, steps, images per step, SFT weight, clipping, cadence.
        inputs: pool images and what the method needs (:class:`FinetuneInputs`).
        eval_sets: ``{"val": SegDataset, "test": SegDataset}`` (any names) evaluated every
            ``cfg.eval_every`` steps and at step 0; records use ``"<name>/dice"`` etc.
        out_dir: run folder: ``metrics.jsonl`` and the resumable ``state.safetensors`` go there.
        progress: show a progress bar.
        eval_hd95: include HD95 in the periodic evaluations (the slowest metric).
        stop_after: stop (as if killed) after this many steps of this call; for tests of resuming.
        initial_eval: the step-0 evaluation of this very model on ``eval_sets`` (``{"test/dice": …}``),
            when the caller already has it (every cell of a sweep starts from the same base model).

    Returns:
        The records of ``metrics.jsonl``, one per evaluation, in step order (empty on ranks > 0).

    Under ``torchrun`` (``WORLD_SIZE > 1``, process group started by :func:`rndpo.training.distributed.init`)
    each step's images are sharded over the ranks, the model is wrapped in DDP, and rank 0 alone
    evaluates and writes; the result equals a single-process run with the same ``images_per_step``
    up to floating-point summation order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, state_path = out / METRICS_FILE, out / STATE_FILE
    dinfo = distributed.info()
    main_rank = dinfo.rank == 0
    if dinfo.enabled and cfg.images_per_step < dinfo.world_size:
        raise RndpoError(f"images_per_step = {cfg.images_per_step} is smaller than the {dinfo.world_size} processes")
    num_channels = _num_channels(model, inputs.pool_images)
    step_loss = _StepLoss(model, cfg, inputs, num_channels, forward=distributed.wrap(model))
    total = 0 if cfg.method == "base" else cfg.steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(max(total, 1)))

    start = 0
    if state_path.exists():
        start, extra = load_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler)
        if step_loss.teacher is not None:
            step_loss.teacher.load_state_dict(extra["teacher"])
        running: dict[str, list[float]] = {k: list(v) for k, v in (extra.get("running") or {}).items()}
        if main_rank:
            rewind_jsonl(metrics_path, start)
        records = read_jsonl(metrics_path) if metrics_path.exists() else []
    else:
        seed_everything(cfg.seed)
        if main_rank and metrics_path.exists():
            metrics_path.unlink()
        records = []
        running = {}  # training statistics since the last evaluation (kept in the checkpoint)

    def set_modes() -> None:
        model.eval()  # norms in inference mode; dropout only if asked (deterministic logits by default)
        set_dropout(model, cfg.dropout)

    clock = time.perf_counter()
    if start == 0 and main_rank:
        evaluation = initial_eval if initial_eval is not None else evaluate_all(model, eval_sets, eval_hd95)
        record = to_jsonable({"step": 0, **evaluation,
                              **{k: None for k in _TRAIN_KEYS}, "time_s": 0.0})
        append_jsonl(metrics_path, record)
        records.append(record)

    bar = _progress(progress and main_rank, total, start, cfg.method)
    steps_this_call = 0
    for step in range(start, total):
        if stop_after is not None and steps_this_call >= stop_after:
            break
        set_modes()
        cases = batch_cases(step, step_loss.population, cfg.images_per_step, cfg.seed)
        loss, stats = step_loss(step, distributed.shard(cases, dinfo))
        if dinfo.enabled:
            # DDP averages gradients over ranks; weigh each rank's mean by its share of the global
            # count (pairs, or images) so the step equals the single-process step on the whole batch
            count = stats.get("pairs/count", float(len(distributed.shard(cases, dinfo))))
            loss = loss * (count * dinfo.world_size / max(distributed.all_reduce_sum(count), 1.0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step_loss.after_step()
        steps_this_call += 1
        for key, value in {"train/loss": float(loss.detach()), **stats}.items():
            if value == value:  # skip NaN (e.g. rewards without pairs)
                running.setdefault(key, []).append(value)
        done = step + 1
        if bar is not None:
            bar.update(1, loss=float(loss.detach()))
        if main_rank and (done % cfg.eval_every == 0 or done == total):
            record = {"step": done, **evaluate_all(model, eval_sets, eval_hd95)}
            record.update({k: (float(np.mean(running[k])) if running.get(k) else None) for k in _TRAIN_KEYS})
            record.update({k: float(np.mean(v)) for k, v in running.items() if k not in _TRAIN_KEYS})
            record["time_s"] = time.perf_counter() - clock
            record = to_jsonable(record)  # the in-memory records equal what metrics.jsonl holds (NaN → None)
            append_jsonl(metrics_path, record)
            records.append(record)
            running = {}
            if bar is not None:
                bar.note(dice=record.get("test/dice", record.get("val/dice")))
        if main_rank and (done % cfg.checkpoint_every == 0 or done == total):
            extra = {"running": running}
            if step_loss.teacher is not None:
                extra["teacher"] = step_loss.teacher.state_dict()
            save_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler, step=done, extra=extra)
    if bar is not None:
        bar.close()
    distributed.barrier()
    model.eval()
    set_dropout(model, False)
    return records


def _num_channels(model: torch.nn.Module, images: np.ndarray) -> int:
    with torch.no_grad():
        was = model.training
        model.eval()
        channels = int(model(torch.from_numpy(np.ascontiguousarray(images[:1]))).shape[1])
        model.train(was)
    return channels


class _Bar:
    def __init__(self, total: int, start: int, label: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc=label, leave=False, dynamic_ncols=True)
        self.extra: dict[str, float] = {}

    def update(self, n: int, **values: float) -> None:
        self.extra.update(values)
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in self.extra.items()}, refresh=False)
        self.bar.update(n)

    def note(self, **values) -> None:
        self.extra.update({k: v for k, v in values.items() if v is not None})

    def close(self) -> None:
        self.bar.close()


def _progress(enabled: bool, total: int, start: int, label: str) -> _Bar | None:
    return _Bar(total, start, label) if enabled and total > 0 else None
