"""The experiment runner: an :class:`~rndpo.config.ExperimentConfig` → cached stages → cells → results.

Stages (each a folder ``RUN/stages/<kind>-<hash>/``, named by the content hash of the config parts
that produced it, built once under a file lock and reused by every cell that needs it)::

    base     splits.json + the base segmenter trained on the labeled split     (data, split, model, base, seed)
    bank     proposals of the pool and of the val split                        (base + proposals)
    scores   one judge's scores of both banks + its audit on val               (bank + judge)
    pairs    pairs mined from the pool scores, reference log-ratios attached   (scores + mining)

A cell is (seed, judge, mining, method, β, lr): it fine-tunes a fresh copy of the base model into
``RUN/cells/<cell_id>/`` (``config.yaml``, ``metrics.jsonl``, ``done.json``, ``test_per_case.csv``). Baselines that ignore
the judge (``base``, ``entropy-min``, ``mean-teacher``, ``oracle``) run once per seed, ``pseudo-label``
once per (seed, judge); their row is repeated in every regime of ``results.csv`` so each table is
complete. Rerunning skips finished cells and stages; ``cells()`` lists them for schedulers
(``rndpo run --list`` / ``--cell I``). β is chosen per (dataset, judge, mining, method, seed) on the
validation split (:func:`rndpo.stats.select_beta`), never on test.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from filelock import FileLock, Timeout

from rndpo.config import (
    OBJECTIVES,
    ExperimentConfig,
    FinetuneConfig,
    JudgeConfig,
    MiningConfig,
    config_hash,
)
from rndpo.data import SegDataset, Splits, load_dataset, make_splits
from rndpo.errors import RndpoError
from rndpo.io import atomic_path, read_json, write_json, write_yaml
from rndpo.metrics import curve_summary, evaluate
from rndpo.training import distributed

__all__ = ["Cell", "Experiment", "plan_cells", "RESULT_COLUMNS", "PER_CASE_FILE", "read_config", "read_per_case",
           "write_per_case"]

JUDGE_FREE = ("base", "entropy-min", "mean-teacher", "oracle")
RESULT_COLUMNS = [
    "cell_id", "dataset", "judge", "judge_accuracy", "pair_accuracy", "mining", "method", "beta", "lr", "seed",
    "peak", "final", "sustained", "drop", "auc", "val_peak", "val_sustained", "val_final",
    "final_iou", "final_hd95", "pairs", "steps", "wall_s", "selected",
]


#: Per finished cell: the final model's metrics on every test case (paired comparisons over cases).
PER_CASE_FILE = "test_per_case.csv"
PER_CASE_COLUMNS = ["case_id", "dice", "iou", "hd95"]


def read_config(path: str | Path) -> ExperimentConfig:
    """Load and validate an experiment YAML (unknown keys and bad values are named)."""
    from rndpo.io import read_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise RndpoError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return ExperimentConfig.model_validate(data)


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the grid."""

    index: int
    seed: int
    judge: JudgeConfig | None  # None: the method ignores the judge
    mining: MiningConfig | None  # None: the method ignores the pairs
    method: str
    beta: float | None
    finetune: FinetuneConfig

    @property
    def cell_id(self) -> str:
        parts = [self.method, f"s{self.seed}"]
        if self.judge is not None:
            parts.append(_slug(self.judge.label))
        if self.mining is not None:
            parts.append(self.mining.strategy)
        if self.beta is not None:
            parts.append(f"b{self.beta:g}")
        parts.append(f"lr{self.finetune.lr:g}")
        key = config_hash(self.finetune, self.judge, self.mining, length=6)
        return "_".join(parts) + f"_{key}"

    def describe(self) -> str:
        judge = self.judge.label if self.judge else "-"
        mining = self.mining.strategy if self.mining else "-"
        beta = f"{self.beta:g}" if self.beta is not None else "-"
        return f"[{self.index}] seed={self.seed} judge={judge} mining={mining} method={self.method} beta={beta} lr={self.finetune.lr:g}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def plan_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell of the grid, in a stable order (seed, method, judge, mining, β, lr)."""
    cells: list[Cell] = []
    for seed in cfg.seeds:
        for spec in cfg.methods:
            lrs = spec.lrs or (cfg.finetune.lr,)
            is_objective = spec.method in OBJECTIVES
            judges: Iterable[JudgeConfig | None] = [None] if spec.method in JUDGE_FREE else cfg.judges
            for judge in judges:
                minings: Iterable[MiningConfig | None] = [None]
                if is_objective:
                    minings = [m for m in cfg.mining if spec.mining is None or m.strategy in spec.mining]
                for mining in minings:
                    for beta in (spec.betas if is_objective else (None,)):
                        for lr in lrs:
                            update = {**spec.overrides, "method": spec.method, "lr": lr, "seed": seed}
                            if beta is not None:
                                update["beta"] = beta
                            finetune = FinetuneConfig.model_validate({**cfg.finetune.model_dump(), **update})
                            cells.append(Cell(len(cells), seed, judge, mining, spec.method, beta, finetune))
    return cells


@dataclass
class BaseStage:
    dir: Path
    splits: Splits
    labeled: SegDataset
    pool: SegDataset
    val: SegDataset
    test: SegDataset

    @property
    def checkpoint(self) -> Path:
        return self.dir / "best.safetensors"


class Experiment:
    """Runs the cells of one :class:`ExperimentConfig` in a run folder (see the module docstring).

    Args:
        cfg: the experiment.
        run_dir: the run folder (created); several processes may share it.
        log: callable receiving one-line progress messages (the CLI prints them); default silent.
        progress: show progress bars of the stages and fine-tuning.
        stages_dir: keep the stages in this folder instead of ``RUN/stages`` (``RUN/stages`` becomes a
            link to it). Another run folder that names the same ``stages_dir`` reuses every stage whose
            config parts match, e.g. a longer fine-tuning sweep on the published base models, proposals
            and judge scores. Stages are keyed by content and built under file locks, so sharing is safe.

    Raises:
        RndpoError: ``RUN/stages`` already exists and is not ``stages_dir``.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, *, log: Callable[[str], None] | None = None,
                 progress: bool = False, stages_dir: str | Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log = log or (lambda message: None)
        self.progress = progress
        self._dataset: SegDataset | None = None
        self._cache: dict[str, Any] = {}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if stages_dir is not None:
            _link_stages(self.run_dir / "stages", Path(stages_dir))
        if not distributed.is_main():
            return
        config_path = self.run_dir / "config.yaml"
        resolved = cfg.model_dump(mode="json")
        if config_path.exists():
            from rndpo.io import read_yaml

            previous = read_yaml(config_path)
            if previous != resolved:
                self.log(f"note: {config_path} describes another config; cached stages are keyed by content, "
                         "so only matching work is reused (config.yaml is updated)")
        write_yaml(config_path, resolved)

    # ------------------------------------------------------------------ grid
    def cells(self) -> list[Cell]:
        return plan_cells(self.cfg)

    @property
    def dataset_name(self) -> str:
        path = self.cfg.data.path
        return "synthetic" if path == "synthetic" else Path(path).name

    # ------------------------------------------------------------------ stages
    def _stage(self, kind: str, parts: tuple, build: Callable[[Path], dict]) -> Path:
        """Build a stage folder once (under a file lock); ``build(tmp_dir)`` writes into it."""
        key = config_hash(*parts)
        folder = self.run_dir / "stages" / f"{kind}-{key}"
        done = folder / "done.json"
        if done.exists():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if done.exists():  # built by another process while we waited
                return folder
            folder.mkdir(exist_ok=True)
            write_yaml(folder / "config.yaml", {"kind": kind, "parts": [
                p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]})
            self.log(f"stage {kind}-{key}: building")
            start = time.perf_counter()
            summary = build(folder) or {}
            write_json(done, {"kind": kind, "seconds": round(time.perf_counter() - start, 2), **summary})
        return folder

    def dataset(self) -> SegDataset:
        if self._dataset is None:
            self.log(f"loading data: {self.cfg.data.path}")
            self._dataset = load_dataset(self.cfg.data)
        return self._dataset

    def _parts(self, seed: int, *, proposals: bool = False, judge: JudgeConfig | None = None,
               mining: MiningConfig | None = None) -> tuple:
        """The seeded config parts a stage depends on (its cache key): base ⊂ bank ⊂ scores ⊂ pairs."""
        cfg = self.cfg
        seeded = lambda part: part.model_copy(update={"seed": seed})  # noqa: E731
        parts: tuple = (cfg.data, seeded(cfg.split), cfg.model, seeded(cfg.base))
        if proposals or judge is not None:
            parts += (seeded(cfg.proposals),)
        if judge is not None:
            parts += (seeded(judge),)
        if mining is not None:
            parts += (seeded(mining),)
        return parts

    def base(self, seed: int) -> BaseStage:
        """Split the data and train the base segmenter for ``seed`` (cached)."""
        if ("base", seed) in self._cache:
            return self._cache[("base", seed)]
        from rndpo.training.base import train_base

        cfg = self.cfg
        data = self.dataset()
        split_cfg = cfg.split.model_copy(update={"seed": seed})

        def build(folder: Path) -> dict:
            splits = make_splits(data, split_cfg)
            splits.save(folder / "splits.json")
            labeled, val = data.select(splits.labeled), data.select(splits.val)
            train_base(labeled, val, cfg.model, cfg.base.model_copy(update={"seed": seed}), folder, progress=self.progress)
            test = evaluate(_load(folder / "best.safetensors"), data.select(splits.test), hd95=True)
            return {"counts": splits.counts, "test_dice": test["dice"], "test_iou": test["iou"], "test_hd95": test["hd95"]}

        folder = self._stage("base", self._parts(seed), build)
        splits = Splits.load(folder / "splits.json")
        stage = BaseStage(folder, splits, data.select(splits.labeled), data.select(splits.pool),
                          data.select(splits.val), data.select(splits.test))
        self._cache[("base", seed)] = stage
        return stage

    def bank(self, seed: int) -> tuple[Path, Any, Any]:
        """Proposals of the pool and of the val split (cached): ``(folder, pool_bank, val_bank)``."""
        from rndpo.bank import ProposalBank
        from rndpo.proposals import generate_proposals

        base = self.base(seed)
        proposals = self.cfg.proposals.model_copy(update={"seed": seed})

        def build(folder: Path) -> dict:
            model = _load(base.checkpoint)
            snapshots = [_load(p) for p in sorted(base.dir.glob("snap_*.safetensors"))] if proposals.checkpoints else None
            if proposals.checkpoints and not snapshots:
                raise RndpoError("proposals.checkpoints needs base.snapshots > 0 (no snapshots were kept)")
            out = {}
            for split, dataset in (("pool", base.pool), ("val", base.val)):
                bank = generate_proposals(model, dataset.images, proposals, snapshots=snapshots, bank_path=folder / split,
                                          case_ids=dataset.case_ids, progress=self.progress, overwrite=True)
                out[split] = bank.meta.get("proposal_stats", {})
            return out

        folder = self._stage("bank", self._parts(seed, proposals=True), build)
        return folder, ProposalBank.open(folder / "pool"), ProposalBank.open(folder / "val")

    def scores(self, seed: int, judge: JudgeConfig) -> tuple[Path, np.ndarray, dict]:
        """One judge's scores of the pool (cached) and its audit on the val split: ``(folder, scores, audit)``."""
        from rndpo.bank import load_scores, save_scores
        from rndpo.judges import audit_judge, proposal_dice, run_judge

        base = self.base(seed)
        bank_dir, pool_bank, val_bank = self.bank(seed)
        judge = judge.model_copy(update={"seed": seed})

        def build(folder: Path) -> dict:
            model = _load(base.checkpoint)
            is_oracle = judge.name == "oracle"
            report = run_judge(judge, pool_bank, images=base.pool.images, model=model,
                               truth=base.pool.masks if is_oracle else None,
                               labeled_data=(base.labeled, base.val), rng=seed, qc_out=folder / "qc",
                               progress=self.progress)
            save_scores(folder / "pool_scores.npy", report.scores, report.summary())
            val_judge = judge
            if judge.name == "learned-qc" and "qc_model" in report.info:
                val_judge = judge.model_copy(update={"qc_model": report.info["qc_model"]})
            val_report = run_judge(val_judge, val_bank, images=base.val.images, model=model,
                                   truth=base.val.masks if is_oracle else None,
                                   labeled_data=(base.labeled, base.val), rng=seed + 10_000)
            save_scores(folder / "val_scores.npy", val_report.scores, val_report.summary())
            audit = audit_judge(val_report.scores, proposal_dice(val_bank, base.val.masks))
            pool_audit = audit_judge(report.scores, proposal_dice(pool_bank, base.pool.masks))
            write_json(folder / "audit.json", {
                "judge": judge.label, "split": "val", "flip_prob": report.flip_prob,
                "spearman": audit["spearman_pooled"], "pairwise_accuracy": audit["pairwise_accuracy"],
                "regret": audit["top1_regret"], **audit, "pool": pool_audit, "report": report.summary(),
            })
            return {"judge": judge.label, "pairwise_accuracy": audit["pairwise_accuracy"]}

        folder = self._stage("scores", self._parts(seed, judge=judge), build)
        scores, _ = load_scores(folder / "pool_scores.npy")
        return folder, scores, read_json(folder / "audit.json")

    def pairs(self, seed: int, judge: JudgeConfig, mining: MiningConfig) -> tuple[Path, Any, np.ndarray]:
        """Pairs mined from the pool with reference log-ratios (cached): ``(folder, pairs, truly_better)``."""
        from rndpo.judges import judge_flip_prob, pair_outcomes, proposal_dice
        from rndpo.mining import Pairs, mine

        base = self.base(seed)
        _, pool_bank, _ = self.bank(seed)
        scores_dir, scores, audit = self.scores(seed, judge)
        mining = mining.model_copy(update={"seed": seed})

        def build(folder: Path) -> dict:
            model = _load(base.checkpoint)
            pairs = mine(pool_bank, scores, base.pool.images, model, mining,
                         flip_prob=judge_flip_prob(judge), rng=seed)
            pairs.save(folder / "pairs.npz")
            write_json(folder / "counts.json", pairs.counts)
            # diagnostics from the pool's ground truth (never used for training)
            outcomes = pair_outcomes(pairs, proposal_dice(pool_bank, base.pool.masks)) if len(pairs) else None
            right = outcomes["right"] if outcomes else np.zeros(0, bool)
            wrong = outcomes["wrong"] if outcomes else np.zeros(0, bool)
            decided = int(right.sum() + wrong.sum())
            write_json(folder / "pairs_audit.json", {
                "judge": judge.label, "mining": mining.strategy, "pairs": len(pairs),
                "truly_better_fraction": float(right.sum() / decided) if decided else None,
                "right_region": pairs.region[right].tolist(), "wrong_region": pairs.region[wrong].tolist(),
                "counts": pairs.counts,
            })
            np.save(folder / "truly_better.npy", right)
            self._write_gallery(folder / "gallery.npz", pairs, right, wrong, base, pool_bank)
            return {"pairs": len(pairs)}

        folder = self._stage("pairs", self._parts(seed, judge=judge, mining=mining), build)
        return folder, Pairs.load(folder / "pairs.npz"), np.load(folder / "truly_better.npy")

    def _write_gallery(self, path: Path, pairs, right, wrong, base: BaseStage, bank) -> None:
        count = self.cfg.eval.gallery
        if count == 0 or len(pairs) == 0:
            return
        rng = np.random.default_rng(0)
        picks = []
        for flags in (right, wrong):
            rows = np.flatnonzero(flags)
            take = min(len(rows), count - count // 2 if flags is right else count // 2)
            picks.extend(rng.choice(rows, size=take, replace=False).tolist() if take else [])
        if not picks:
            return
        cases = pairs.case_index[picks]
        image = base.pool.images[cases, 0]
        chosen = np.stack([bank.masks(int(c))[pairs.chosen[r]] for c, r in zip(cases, picks)])
        rejected = np.stack([bank.masks(int(c))[pairs.rejected[r]] for c, r in zip(cases, picks)])
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, image=image.astype(np.float32), truth=base.pool.masks[cases],
                                    chosen=chosen, rejected=rejected, region=pairs.region[picks],
                                    right=right[picks], case_ids=np.array([base.pool.case_ids[c] for c in cases]))

    # ------------------------------------------------------------------ cells
    def cell_dir(self, cell: Cell) -> Path:
        return self.run_dir / "cells" / cell.cell_id

    def run_cell(self, cell: Cell) -> dict:
        """Run one cell (or return its finished summary); resumes an interrupted cell.

        Under torchrun every rank calls this for the same cell: rank 0 holds the cell's lock and
        writes, all ranks fine-tune together (DDP), and rank 0's summary is returned on every rank.
        """
        folder = self.cell_dir(cell)
        done = folder / "done.json"
        finished = distributed.broadcast_object(read_json(done) if done.exists() else None)
        if finished is not None:
            return finished
        if not distributed.is_main():
            return distributed.broadcast_object(self._run_cell(cell, folder))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(folder) + ".lock", timeout=1):
                summary = read_json(done) if done.exists() else self._run_cell(cell, folder)
        except Timeout:
            raise RndpoError(f"cell {cell.cell_id} is being run by another process (lock {folder}.lock)") from None
        return distributed.broadcast_object(summary)

    def _run_cell(self, cell: Cell, folder: Path) -> dict | None:
        from rndpo.training.finetune import FinetuneInputs, finetune

        main = distributed.is_main()
        done = folder / "done.json"
        base = self.base(cell.seed)
        if main:
            write_yaml(folder / "config.yaml", {
                "dataset": self.dataset_name, "seed": cell.seed, "method": cell.method, "beta": cell.beta,
                "judge": cell.judge.label if cell.judge else None,
                "mining": cell.mining.model_dump(mode="json") if cell.mining else None,
                "finetune": cell.finetune.model_dump(mode="json"), "base_stage": base.dir.name,
            })
        inputs = FinetuneInputs(pool_images=base.pool.images)
        extra: dict[str, Any] = {}
        if cell.method in OBJECTIVES:
            pairs_dir, pairs, truly_better = self.pairs(cell.seed, cell.judge, cell.mining)
            _, inputs.bank, _ = self.bank(cell.seed)
            inputs.pairs, inputs.truly_better = pairs, truly_better
            extra["pairs"] = len(pairs)
            extra["pair_accuracy"] = read_json(pairs_dir / "pairs_audit.json")["truly_better_fraction"]
        elif cell.method == "pseudo-label":
            _, bank, _ = self.bank(cell.seed)
            _, scores, _ = self.scores(cell.seed, cell.judge)
            top = np.nanargmax(scores, axis=1)
            inputs.targets = np.stack([bank.masks(i)[k] for i, k in enumerate(top)])
        elif cell.method == "oracle":
            inputs.targets = base.pool.masks
        elif cell.method == "mean-teacher":
            inputs.labeled = base.labeled
        model = _load(base.checkpoint)
        start = time.perf_counter()
        eval_sets = {"val": base.val, "test": base.test}
        initial = self._base_eval(base, eval_sets) if main else None
        records = finetune(model, cell.finetune, inputs, eval_sets, folder, progress=self.progress,
                           eval_hd95=self.cfg.eval.hd95, initial_eval=initial)
        if not main:
            return None
        final = evaluate(model, base.test, hd95=True)
        summary = self._summarise(cell, records, final, time.perf_counter() - start, extra)
        write_per_case(folder / PER_CASE_FILE, final["per_case"])
        write_json(done, summary)
        return summary

    def ensure_per_case(self, cell: Cell) -> Path | None:
        """The final model's per-case test metrics of a finished cell, ``cells/<id>/test_per_case.csv``.

        Cells run before this file existed get it here from their final weights (``state.safetensors``
        saved at the last step; the base checkpoint for cells without fine-tuning steps). The recomputed
        mean Dice must equal the cell's recorded final test Dice (to 1e-4), else nothing is written.

        Returns:
            The file, or ``None`` when the cell is unfinished, has no final weights, or does not match.
        """
        from rndpo.training.loop import load_state

        folder = self.cell_dir(cell)
        path, done = folder / PER_CASE_FILE, folder / "done.json"
        if path.exists() or not done.exists() or not distributed.is_main():
            return path if path.exists() else None
        summary = read_json(done)
        base = self.base(cell.seed)
        model = _load(base.checkpoint)
        state = folder / "state.safetensors"
        if state.exists():
            saved = load_state(state)
            if int(saved["step"]) != int(summary.get("steps") or 0):
                self.log(f"cell {cell.cell_id}: state.safetensors is from step {saved['step']}, not the final "
                         f"step {summary.get('steps')}; no per-case results")
                return None
            model.load_state_dict(saved["model"])
        elif int(summary.get("steps") or 0) != 0:
            self.log(f"cell {cell.cell_id}: no final weights (state.safetensors); no per-case results")
            return None
        final = evaluate(model, base.test, hd95=True)
        if abs(final["dice"] - float(summary["final"])) > 1e-4:
            self.log(f"cell {cell.cell_id}: recomputed test Dice {final['dice']:.5f} differs from the recorded "
                     f"final {float(summary['final']):.5f}; no per-case results")
            return None
        write_per_case(path, final["per_case"])
        return path

    def _base_eval(self, base: BaseStage, eval_sets: dict) -> dict:
        """The step-0 evaluation, shared by every cell of the seed (computed once, kept in the base stage)."""
        from rndpo.training.finetune import evaluate_all

        path = base.dir / f"eval_step0{'_hd95' if self.cfg.eval.hd95 else ''}.json"
        if path.exists():
            return {k: (float("nan") if v is None else v) for k, v in read_json(path).items()}
        evaluation = evaluate_all(_load(base.checkpoint), eval_sets, self.cfg.eval.hd95)
        write_json(path, evaluation)
        return evaluation

    def _summarise(self, cell: Cell, records: list[dict], final: dict, wall: float, extra: dict) -> dict:
        steps = [r["step"] for r in records]
        test = curve_summary(steps, [r["test/dice"] for r in records])
        val = curve_summary(steps, [r["val/dice"] for r in records])
        return {
            "cell_id": cell.cell_id, "dataset": self.dataset_name, "method": cell.method, "beta": cell.beta,
            "lr": cell.finetune.lr, "seed": cell.seed,
            "judge": cell.judge.label if cell.judge else None,
            "mining": cell.mining.strategy if cell.mining else None,
            "peak": test["peak"], "final": test["final"], "sustained": test["sustained"], "drop": test["drop"],
            "auc": test["auc"], "val_peak": val["peak"], "val_sustained": val["sustained"], "val_final": val["final"],
            "final_iou": final["iou"], "final_hd95": final["hd95"], "steps": steps[-1], "wall_s": round(wall, 2),
            "pairs": extra.get("pairs"), "pair_accuracy": extra.get("pair_accuracy"),
        }

    # ------------------------------------------------------------------ the whole grid
    def run(self, indices: Iterable[int] | None = None, *, write_results: bool = True) -> list[dict]:
        """Run the cells (all, or those at ``indices``), skipping finished ones; write ``results.csv``."""
        cells = self.cells()
        chosen = cells if indices is None else [cells[i] for i in indices]
        for number, cell in enumerate(chosen, 1):
            status = "done" if (self.cell_dir(cell) / "done.json").exists() else "run"
            self.log(f"cell {number}/{len(chosen)} {cell.describe()} [{status}]")
            self.run_cell(cell)
            self.ensure_per_case(cell)
            if write_results:
                self.write_results()
        return self.write_results() if write_results else []

    def write_results(self) -> list[dict]:
        """Collect every finished cell into ``results.csv`` (one row per regime, β selected on val)."""
        from rndpo.stats import select_beta

        if not distributed.is_main():
            return []
        rows = []
        for cell in self.cells():
            done = self.cell_dir(cell) / "done.json"
            if not done.exists():
                continue
            summary = read_json(done)
            regimes = [(j, m) for j in self.cfg.judges for m in self.cfg.mining]
            for judge, mining in regimes:
                if cell.judge is not None and cell.judge.label != judge.label:
                    continue
                if cell.mining is not None and cell.mining != mining:
                    continue
                audit_path = self._audit_path(cell.seed, judge)
                accuracy = read_json(audit_path)["pairwise_accuracy"] if audit_path else None
                rows.append({**summary, "judge": judge.label, "mining": mining.strategy, "judge_accuracy": accuracy})
        rows = select_beta(rows) if rows else rows
        with atomic_path(self.run_dir / "results.csv") as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in RESULT_COLUMNS})
        return rows

    def _audit_path(self, seed: int, judge: JudgeConfig) -> Path | None:
        key = config_hash(*self._parts(seed, judge=judge))
        path = self.run_dir / "stages" / f"scores-{key}" / "audit.json"
        return path if path.exists() else None


def write_per_case(path: Path, per_case: list[dict]) -> None:
    """Write :func:`~rndpo.metrics.evaluate`'s ``per_case`` records as CSV (atomically)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=PER_CASE_COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(per_case)


def read_per_case(path: str | Path) -> dict[str, float]:
    """``case_id → Dice`` from a ``test_per_case.csv``."""
    with open(path, newline="") as handle:
        return {row["case_id"]: float(row["dice"]) for row in csv.DictReader(handle)}


def _link_stages(link: Path, target: Path) -> None:
    """Make ``link`` (``RUN/stages``) point at the shared stage folder ``target`` (created)."""
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        raise RndpoError(f"run folder {link.parent} already keeps its stages in {link.resolve()}, not in {target}; "
                         "use another run folder or the same stages folder")
    target.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target.resolve(), target_is_directory=True)
    except FileExistsError:  # another process linked it meanwhile
        if link.resolve() != target.resolve():
            raise RndpoError(f"run folder {link.parent} already keeps its stages in {link.resolve()}") from None


def _load(path: Path) -> torch.nn.Module:
    from rndpo.training.checkpoint import load_model

    model, _ = load_model(path)
    return model
