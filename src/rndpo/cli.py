"""The ``rndpo`` command: parses arguments, calls the library, prints. No logic of its own.

Every command turns a user error (:class:`rndpo.errors.RndpoError`, a config validation error, a
missing file) into one readable line on stderr and a non-zero exit code; ``RNDPO_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from rndpo import __version__
from rndpo.config import format_validation_error
from rndpo.errors import RndpoError

app = typer.Typer(
    name="rndpo",
    help="Preference fine-tuning (DPO / RN-DPO) of segmentation models from noisy QC judges.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Preference fine-tuning (DPO / RN-DPO) of segmentation models from noisy QC judges."""
    if threads is not None:
        if threads < 1:
            raise RndpoError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


@app.command()
def version() -> None:
    """Print the rndpo version."""
    typer.echo(f"rndpo {__version__}")


@app.command("data-info")
def data_info(
    data: str = typer.Option(..., "--data", help="Data folder (images/+masks/ or nnU-Net v2 raw) or 'synthetic'."),
    size: int = typer.Option(128, "--size", help="Training size the data is read at."),
    max_cases: int | None = typer.Option(None, "--max-cases", help="Read only the first N cases (sorted by id)."),
) -> None:
    """Read a data set and print cases, channels, dimensions, classes, original sizes and groups."""
    from rich.console import Console
    from rich.table import Table

    from rndpo.config import DataConfig
    from rndpo.data import load_dataset

    info = load_dataset(DataConfig(path=data, size=size, max_cases=max_cases)).summary()
    table = Table(title=f"{data} ({info['format']})", show_header=False)
    table.add_row("cases", str(info["cases"]) + ("" if info["labeled"] else " (no masks)"))
    table.add_row("channels", str(info["channels"]))
    table.add_row("spatial dims", f"{info['spatial_dims']}D, training size {'x'.join(map(str, info['training_size']))}")
    table.add_row("classes", f"{info['num_classes']} ({', '.join(info['label_names'] or [])})")
    def dims_text(shape: tuple[int, ...]) -> str:  # 2D as width x height, volumes in array order
        return "x".join(map(str, shape[::-1] if len(shape) == 2 else shape))

    unit = " (width x height)" if info["spatial_dims"] == 2 else ""
    table.add_row("original size", f"{dims_text(info['original_size_min'])} .. {dims_text(info['original_size_max'])}{unit}")
    table.add_row("groups", f"{info['groups']}" + (f" (by {info['group_column']})" if info["group_column"] else " (one per case)"))
    Console().print(table)


@app.command("mine")
def mine_command(
    bank: str = typer.Option(..., "--bank", help="Proposal bank folder (or a folder of shard_* banks)."),
    scores: str = typer.Option(..., "--scores", help="Judge scores (.npy with its .json sidecar), (N, K) in bank order."),
    model: str = typer.Option(..., "--model", help="Base model checkpoint (.safetensors) or run folder: the reference."),
    data: str = typer.Option(..., "--data", help="Data folder (or 'synthetic') the bank's pool images come from."),
    splits: str = typer.Option(..., "--splits", help="splits.json of the run: every bank case must be in its pool."),
    strategy: str = typer.Option("top-vs-rest", "--strategy", help="top-vs-rest | top-vs-bottom | random-pairs | all-pairs."),
    pairs_per_image: int = typer.Option(4, "--pairs-per-image", help="random-pairs: pairs drawn per image."),
    min_margin: float = typer.Option(0.0, "--min-margin", help="Drop pairs whose judge-score gap is below this."),
    min_region: int = typer.Option(1, "--min-region", help="Drop pairs whose |D| has fewer pixels than this."),
    flip_prob: float = typer.Option(0.0, "--flip-prob", help="flip:p judge noise: flip each pair with probability p."),
    seed: int = typer.Option(0, "--seed", help="Seed of random-pairs and flips."),
    size: int | None = typer.Option(None, "--size", help="Training size (default: the model's)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per reference forward pass."),
    out: str = typer.Option(..., "--out", help="Output folder: pairs.npz + mining.json."),
) -> None:
    """Mine preference pairs from a judged proposal bank; store reference log-ratios of the base model."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from rndpo.bank import ProposalBank, load_scores
    from rndpo.config import DataConfig, MiningConfig
    from rndpo.data import Splits, load_dataset
    from rndpo.io import write_json
    from rndpo.mining import COUNT_KEYS, mine
    from rndpo.training.checkpoint import load_model

    cfg = MiningConfig(strategy=strategy, pairs_per_image=pairs_per_image, min_margin=min_margin,
                       min_region=min_region, seed=seed)
    proposal_bank = ProposalBank.open(bank)
    judge_scores, scores_meta = load_scores(scores)
    pool = set(Splits.load(splits).pool)
    outside = [case for case in proposal_bank.case_ids if case not in pool]
    if outside:
        raise RndpoError(f"bank {bank} holds {len(outside)} cases outside the pool of {splits} (first: {outside[0]!r})")
    reference, model_meta = load_model(model)
    if size is None:
        size = model_meta.get("size")
        if not isinstance(size, int):
            raise RndpoError(f"model {model} records size {size!r}; pass --size")
    dataset = load_dataset(DataConfig(path=data, size=size)).select(proposal_bank.case_ids)
    if dataset.num_classes != proposal_bank.num_classes or tuple(dataset.images.shape[2:]) != proposal_bank.spatial_shape:
        raise RndpoError(f"data {data} (num_classes {dataset.num_classes}, size {tuple(dataset.images.shape[2:])}) does not "
                         f"match bank {bank} (num_classes {proposal_bank.num_classes}, size {proposal_bank.spatial_shape})")
    pairs = mine(proposal_bank, judge_scores, dataset.images, reference, cfg, flip_prob=flip_prob, batch_size=batch_size)
    folder = Path(out)
    pairs.save(folder / "pairs.npz")
    write_json(folder / "mining.json", {"config": cfg.model_dump(mode="json"), "flip_prob": flip_prob,
                                        "bank": str(bank), "scores": str(scores), "scores_meta": scores_meta,
                                        "model": str(model), "counts": pairs.counts})
    table = Table(title=f"pairs mined ({cfg.strategy}) → {folder / 'pairs.npz'}")
    table.add_column("count")
    table.add_column("value", justify="right")
    for key in COUNT_KEYS:
        table.add_row(key, str(pairs.counts[key]))
    if len(pairs):
        table.add_row("mean |D|", f"{pairs.region.mean():.1f}")
        table.add_row("mean ref log-ratio", f"{pairs.ref_logratio.mean():.3f}")
    Console().print(table)


# ---------------------------------------------------------------------------------------------
# proposals / judges / audit (owner: proposals & judges engineer)
# ---------------------------------------------------------------------------------------------
_JUDGES_DEFAULT = ("oracle", "oracle+gaussian:0.1", "oracle+gaussian:0.2", "agreement", "entropy", "learned-qc")


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _proposal_cfg(mc_dropout: int, tta: str, thresholds: str, morphology: str, checkpoints: bool,
                  include_base: bool, batch_size: int, seed: int):
    from rndpo.config import ProposalConfig

    return ProposalConfig(mc_dropout=mc_dropout, tta=_split_list(tta), thresholds=tuple(float(t) for t in _split_list(thresholds)),
                          morphology=_split_list(morphology), checkpoints=checkpoints, include_base=include_base,
                          batch_size=batch_size, seed=seed)


def _load_base(model: str, size: int | None):
    """``(model, meta, checkpoint path, size)`` of a base checkpoint (file or run folder)."""
    from rndpo.training.checkpoint import load_model, resolve_checkpoint

    path = resolve_checkpoint(model)
    network, meta = load_model(path)
    size = size if size is not None else meta.get("size")
    if not isinstance(size, int):
        raise RndpoError(f"model {path} records size {size!r}; pass --size")
    return network, meta, path, size


def _load_split(data: str, size: int, splits: str, split: str, model_meta: dict, *, masks: bool):
    """The cases of ``split`` (labeled/pool/val/test) of ``splits.json``, read at the model's size."""
    from rndpo.config import DataConfig
    from rndpo.data import Splits, load_dataset
    from rndpo.data.splits import SPLIT_NAMES

    if split not in SPLIT_NAMES:
        raise RndpoError(f"--split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    dataset = load_dataset(DataConfig(path=data, size=size))
    subset = dataset.select(getattr(Splits.load(splits), split))
    if len(subset) == 0:
        raise RndpoError(f"split {split!r} of {splits} is empty")
    if subset.num_classes != int(model_meta["num_classes"]) or subset.in_channels != int(model_meta["in_channels"]):
        raise RndpoError(f"data {data} ({subset.in_channels} channel(s), {subset.num_classes} classes) does not match the model "
                         f"({model_meta['in_channels']} channel(s), {model_meta['num_classes']} classes)")
    if not masks:
        subset.masks = None  # stages other than the oracle and the audit never see ground truth
    return subset


def _judge_cfg(spec: str, update: dict):
    """Parse a judge spec and apply the command-line settings to it and to its ensemble members (validated)."""
    from rndpo.config import JudgeConfig

    cfg = JudgeConfig.model_validate(spec).model_dump()
    cfg["members"] = [{**member, **update} for member in cfg["members"]]
    return JudgeConfig.model_validate({**cfg, **update})


def _judge_names(cfg) -> set[str]:
    """Names of a judge and of its ensemble members."""
    return {cfg.name, *(m.name for m in cfg.members)}


def _snapshots(checkpoint, wanted: bool) -> list:
    from rndpo.training.checkpoint import load_model

    if not wanted:
        return []
    files = sorted(checkpoint.parent.glob("snap_*.safetensors"))
    if not files:
        raise RndpoError(f"--checkpoints: no snap_*.safetensors next to {checkpoint} (train the base with snapshots > 0)")
    return [load_model(f)[0] for f in files]


def _stats_table(title: str, stats: dict):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("proposals")
    table.add_column("value", justify="right")
    for key in ("images", "proposals", "duplicates", "seconds", "proposals_per_second"):
        value = stats[key]
        table.add_row(key.replace("_", " "), f"{value:.1f}" if isinstance(value, float) else str(value))
    for generator, count in sorted(stats["duplicates_by_generator"].items()):
        table.add_row(f"  duplicates from {generator}", str(count))
    return table


@app.command("propose")
def propose_command(
    model: str = typer.Option(..., "--model", help="Base model checkpoint (.safetensors) or its run folder."),
    data: str = typer.Option(..., "--data", help="Data folder (or 'synthetic') the split's images come from."),
    splits: str = typer.Option(..., "--splits", help="splits.json of the run."),
    split: str = typer.Option("pool", "--split", help="Split to propose for (pool; val for audits)."),
    out: str = typer.Option(..., "--out", help="Output folder: the proposal bank."),
    mc_dropout: int = typer.Option(3, "--mc-dropout", help="MC-dropout passes (0: off)."),
    tta: str = typer.Option("hflip,vflip", "--tta", help="Comma list of hflip,vflip,rot90,rot180,rot270 ('' : off)."),
    thresholds: str = typer.Option("0.3,0.7", "--thresholds", help="Comma list of probability cut-offs ('' : off)."),
    morphology: str = typer.Option("erode:2,dilate:2", "--morphology", help="Comma list of erode|dilate|open|close:radius."),
    checkpoints: bool = typer.Option(False, "--checkpoints/--no-checkpoints", help="Add the snap_* snapshots next to the model."),
    include_base: bool = typer.Option(True, "--base/--no-base", help="Include the base prediction itself."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the MC-dropout passes."),
    size: int | None = typer.Option(None, "--size", help="Training size (default: the model's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bank at --out."),
) -> None:
    """Generate K proposals per image of a split with the base model; write a proposal bank (no ground truth read)."""
    from rich.console import Console

    from rndpo.proposals import generate_proposals

    cfg = _proposal_cfg(mc_dropout, tta, thresholds, morphology, checkpoints, include_base, batch_size, seed)
    network, meta, checkpoint, size = _load_base(model, size)
    subset = _load_split(data, size, splits, split, meta, masks=False)
    from rndpo.training import distributed

    dist_info = distributed.init()  # torchrun: one bank shard per rank, read back as one bank
    shard = (dist_info.rank, dist_info.world_size) if dist_info.enabled else None
    bank = generate_proposals(network, subset.images, cfg, snapshots=_snapshots(checkpoint, checkpoints), bank_path=out,
                              case_ids=subset.case_ids, overwrite=overwrite, shard=shard, progress=dist_info.rank == 0,
                              meta={"model": str(checkpoint), "data": data, "splits": str(splits), "split": split, "size": size})
    distributed.barrier()
    if dist_info.rank != 0:
        return
    if shard is not None:
        from rndpo.bank import ProposalBank

        bank = ProposalBank.open(out)
    Console().print(_stats_table(f"{len(bank)} images, K = {bank.k_max} → {out}", bank.meta["proposal_stats"]))


@app.command("judge")
def judge_command(
    bank: str = typer.Option(..., "--bank", help="Proposal bank folder (from rndpo propose)."),
    judge: str = typer.Option(..., "--judge", help="Judge: oracle[+gaussian:σ|+flip:p|+size-bias:b], agreement, entropy, "
                                                   "learned-qc, 'ensemble(agreement,entropy)'."),
    out: str = typer.Option(..., "--out", help="Scores file (.npy + .json sidecar)."),
    model: str | None = typer.Option(None, "--model", help="Base model (entropy, learned-qc); default: the bank's."),
    data: str | None = typer.Option(None, "--data", help="Data folder; default: the bank's."),
    splits: str | None = typer.Option(None, "--splits", help="splits.json; default: the bank's."),
    agreement_mode: str = typer.Option("mean-dice", "--agreement-mode", help="agreement: mean-dice | majority."),
    entropy_passes: int = typer.Option(8, "--entropy-passes", help="entropy: MC-dropout passes."),
    entropy_region: str = typer.Option("foreground", "--entropy-region", help="entropy: foreground | boundary."),
    qc_model: str | None = typer.Option(None, "--qc-model", help="learned-qc: a trained regressor instead of training one."),
    qc_epochs: int = typer.Option(30, "--qc-epochs", help="learned-qc: training epochs (early stopping on val)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the judge (gaussian noise, learned-qc)."),
) -> None:
    """Score every proposal of a bank with a judge; the oracle alone reads the ground truth."""
    from pathlib import Path

    from rich.console import Console

    from rndpo.bank import ProposalBank, save_scores
    from rndpo.judges import run_judge

    proposal_bank = ProposalBank.open(bank)
    provenance = proposal_bank.meta
    update = {"agreement_mode": agreement_mode, "entropy_passes": entropy_passes, "entropy_region": entropy_region,
              "qc_model": qc_model, "qc_epochs": qc_epochs, "seed": seed}
    cfg = _judge_cfg(judge, update)
    names = _judge_names(cfg)
    inputs: dict = {}
    if names & {"oracle", "entropy", "learned-qc"}:
        model, data, splits = model or provenance.get("model"), data or provenance.get("data"), splits or provenance.get("splits")
        missing = [flag for flag, value in (("--model", model), ("--data", data), ("--splits", splits)) if not value]
        if missing:
            raise RndpoError(f"judge {cfg.label} needs {', '.join(missing)} (the bank {bank} does not record them)")
        network, meta, _, size = _load_base(model, provenance.get("size"))
        split = provenance.get("split", "pool")
        subset = _load_split(data, size, splits, split, meta, masks="oracle" in names).select(proposal_bank.case_ids)
        inputs.update(images=subset.images, model=network, truth=subset.masks)
        if "learned-qc" in names and not qc_model:
            inputs["labeled_data"] = (_load_split(data, size, splits, "labeled", meta, masks=True),
                                      _load_split(data, size, splits, "val", meta, masks=True))
    qc_out = Path(out).with_suffix("").with_name(Path(out).with_suffix("").name + ".qc.safetensors")
    report = run_judge(cfg, proposal_bank, **inputs, qc_out=qc_out if "learned-qc" in names else None, progress=True)
    path = save_scores(out, report.scores, meta={**report.summary(), "judge_config": cfg.model_dump(mode="json"), "bank": str(bank)})
    console = Console()
    console.print(f"judge {report.label}: scores {report.scores.shape} → {path} ({report.seconds:.1f} s)")
    if report.flip_prob:
        console.print(f"flip:p noise is applied at mining: rndpo mine ... --flip-prob {report.flip_prob}")
    for problem in report.warnings.values():
        console.print(f"[yellow]warning:[/yellow] {problem['message']}")


@app.command("audit")
def audit_command(
    model: str = typer.Option(..., "--model", help="Base model checkpoint (.safetensors) or its run folder."),
    data: str = typer.Option(..., "--data", help="Data folder (or 'synthetic')."),
    splits: str = typer.Option(..., "--splits", help="splits.json of the run (labeled + val are used)."),
    out: str = typer.Option(..., "--out", help="Output folder: val bank, audit.json, audit_regions.png."),
    judges: list[str] = typer.Option(list(_JUDGES_DEFAULT), "--judge", help="Judge to audit (repeat the option)."),
    split: str = typer.Option("val", "--split", help="Labeled split the audit runs on."),
    strategy: str = typer.Option("top-vs-rest", "--strategy", help="Mining strategy of the audited pairs."),
    mc_dropout: int = typer.Option(3, "--mc-dropout", help="MC-dropout passes (0: off)."),
    tta: str = typer.Option("hflip,vflip", "--tta", help="Comma list of test-time augmentations."),
    thresholds: str = typer.Option("0.3,0.7", "--thresholds", help="Comma list of probability cut-offs."),
    morphology: str = typer.Option("erode:2,dilate:2", "--morphology", help="Comma list of erode|dilate|open|close:radius."),
    checkpoints: bool = typer.Option(False, "--checkpoints/--no-checkpoints", help="Add the snap_* snapshots next to the model."),
    entropy_passes: int = typer.Option(8, "--entropy-passes", help="entropy: MC-dropout passes."),
    entropy_region: str = typer.Option("foreground", "--entropy-region", help="entropy: foreground | boundary."),
    qc_epochs: int = typer.Option(30, "--qc-epochs", help="learned-qc: training epochs."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of proposals, noise, mining."),
    size: int | None = typer.Option(None, "--size", help="Training size (default: the model's)."),
) -> None:
    """Audit judges on a labeled split: proposals → each judge → Spearman, pairwise accuracy, top-1 regret,
    mined-pair correctness and |D| of right vs wrong pairs (table, audit.json, audit_regions.png)."""
    from pathlib import Path

    from rich import box
    from rich.console import Console
    from rich.table import Table

    from rndpo.config import MiningConfig
    from rndpo.io import write_json
    from rndpo.judges import audit_judge, pair_outcomes, plot_region_histogram, proposal_dice, run_judge
    from rndpo.mining import mine_pairs
    from rndpo.proposals import generate_proposals

    folder = Path(out)
    cfg = _proposal_cfg(mc_dropout, tta, thresholds, morphology, checkpoints, True, batch_size, seed)
    mining = MiningConfig(strategy=strategy, seed=seed)
    update = {"seed": seed, "entropy_passes": entropy_passes, "entropy_region": entropy_region, "qc_epochs": qc_epochs}
    configs = [_judge_cfg(spec, update) for spec in judges]
    network, meta, checkpoint, size = _load_base(model, size)
    evaluated = _load_split(data, size, splits, split, meta, masks=True)
    if evaluated.masks is None:
        raise RndpoError(f"the {split} split of {data} has no masks: the audit needs a labeled split")
    bank = generate_proposals(network, evaluated.images, cfg, snapshots=_snapshots(checkpoint, checkpoints),
                              bank_path=folder / f"{split}_bank", case_ids=evaluated.case_ids, overwrite=True,
                              meta={"model": str(checkpoint), "data": data, "splits": str(splits), "split": split, "size": size})
    true_dice = proposal_dice(bank, evaluated.masks)
    labeled = _load_split(data, size, splits, "labeled", meta, masks=True) if any("learned-qc" in _judge_names(c) for c in configs) else None
    results, outcomes = {}, {}
    for judge_cfg in configs:
        truth = evaluated.masks if "oracle" in _judge_names(judge_cfg) else None
        report = run_judge(judge_cfg, bank, images=evaluated.images, model=network, truth=truth,
                           labeled_data=(labeled, evaluated) if labeled is not None else None, progress=True)
        pairs = mine_pairs(report.scores, bank, mining, flip_prob=report.flip_prob)
        audit = audit_judge(report.scores, true_dice, pairs)
        audit["judge_seconds"] = report.seconds
        audit["judge"] = report.summary()
        results[report.label] = audit
        outcomes[report.label] = pair_outcomes(pairs, true_dice)
        Console(stderr=True).print(f"judge {report.label}: {report.seconds:.1f} s", highlight=False)
    summary = {"model": str(checkpoint), "data": data, "splits": str(splits), "split": split, "size": size,
               "proposal_config": cfg.model_dump(mode="json"), "proposal_stats": bank.meta["proposal_stats"],
               "mining": mining.model_dump(mode="json"), "judges": results,
               "note": "learned-qc is trained on the labeled split and early-stopped on this split"}
    write_json(folder / "audit.json", summary)
    plot_region_histogram(outcomes, folder / "audit_regions.png")

    first = next(iter(results.values()))
    table = Table(title=f"judge audit on {split}: {len(bank)} images, {int(bank.num_proposals.sum())} proposals, "
                        f"{first['pairs']['count']} {strategy} pairs", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("judge", "ρ all", "ρ img", "acc", "regret", "pairs ok", "|D| ok", "|D| bad", "s"):
        table.add_column(column, justify="left" if column == "judge" else "right", no_wrap=True)
    for label, audit in results.items():
        pairs = audit["pairs"]
        table.add_row(label, f"{audit['spearman_pooled']:.3f}", f"{audit['spearman_within']:.3f}",
                      f"{audit['pairwise_accuracy']:.3f}", f"{audit['top1_regret']:.3f}", f"{pairs['fraction_correct']:.3f}",
                      f"{pairs['region_right'].get('median', float('nan')):.0f}",
                      f"{pairs['region_wrong'].get('median', float('nan')):.0f}", f"{audit['judge_seconds']:.0f}")
    console = Console()
    if not console.is_terminal:  # a log file: no need to squeeze the table into 80 columns
        console = Console(width=120)
    console.print(table)
    console.print(f"ρ all / ρ img: Spearman with true Dice, pooled / mean within image; acc: within-image pairs ordered "
                  f"right; regret: top-1 Dice regret; pairs ok: mined pairs whose chosen is truly better; |D| ok / bad: "
                  f"median pixels of right / wrong pairs. Mean true Dice "
                  f"{first['mean_dice']:.3f}, best per image {first['best_dice']:.3f} → {folder / 'audit.json'}", highlight=False)


@app.command("report")
def report_command(
    run_dir: str = typer.Argument(..., help="Run folder (holds results.csv, cells/, stages/, config.yaml)."),
) -> None:
    """Write RUN/report/index.html (tables, curves, β grids, judge audit, |D| histograms, gallery),
    RUN/results.md, results_agg.csv and comparisons.csv; print the page's path and the main table."""
    from rndpo.report import format_results_table, read_results, write_report

    index = write_report(run_dir)
    typer.echo(format_results_table(read_results(run_dir)))
    typer.echo(f"report: {index}")


# ---------------------------------------------------------------------------------------------
# train-base / evaluate (owner: model & training engineer)
# ---------------------------------------------------------------------------------------------
def _metrics_table(title: str, results: dict[str, dict]):
    """One row per evaluated split: cases, Dice ± std, IoU, HD95."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("split", "cases", "Dice", "IoU", "HD95 (px)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, result in results.items():
        table.add_row(name, str(result["n_cases"]), f"{result['dice']:.4f} ± {result['dice_std']:.4f}",
                      f"{result['iou']:.4f}", f"{result['hd95']:.2f}")
    return table


@app.command("train-base")
def train_base_command(
    data: str = typer.Option(..., "--data", help="Data folder (images/+masks/ or nnU-Net v2 raw) or 'synthetic'."),
    out: str = typer.Option(..., "--out", help="Run folder: splits.json, config.yaml and base/ (checkpoints, train_log.jsonl)."),
    labeled: float = typer.Option(0.1, "--labeled", help="Label budget: a fraction (< 1) of the non-val/test cases or a count."),
    size: int = typer.Option(128, "--size", help="Training size per side."),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the labeled split (default: BaseTrainConfig)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps in total (overrides --epochs)."),
    arch: str = typer.Option("unet", "--arch", help="unet | basicunet | dynunet | segresnet."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of training."),
    val: float = typer.Option(0.1, "--val", help="Validation fraction (model selection)."),
    test: float = typer.Option(0.2, "--test", help="Test fraction (evaluation only)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step (default: BaseTrainConfig)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default: BaseTrainConfig)."),
    snapshots: int | None = typer.Option(None, "--snapshots", help="Evenly spaced snapshots to keep (checkpoints proposals)."),
    max_cases: int | None = typer.Option(None, "--max-cases", help="Read only the first N cases (sorted by id)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Split the data, train the base segmenter on the labeled split (resumes in RUN/base/), print val and test Dice."""
    import time
    from pathlib import Path

    from rich.console import Console

    from rndpo.config import BaseTrainConfig, DataConfig, ModelConfig, SplitConfig
    from rndpo.data import Splits, load_dataset, make_splits
    from rndpo.io import read_yaml, write_json, write_yaml
    from rndpo.metrics import evaluate
    from rndpo.training.base import train_base
    from rndpo.training.checkpoint import load_model

    started = time.perf_counter()
    run = Path(out)
    data_cfg = DataConfig(path=data, size=size, max_cases=max_cases)
    split_cfg = SplitConfig(labeled=int(labeled) if labeled >= 1 else labeled, val=val, test=test, seed=seed)
    model_cfg = ModelConfig(arch=arch)
    overrides = {"epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr, "snapshots": snapshots}
    train_cfg = BaseTrainConfig(seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    resolved = {"data": data_cfg.model_dump(mode="json"), "split": split_cfg.model_dump(mode="json"),
                "model": model_cfg.model_dump(mode="json"), "base": train_cfg.model_dump(mode="json")}
    config_path = run / "config.yaml"
    if config_path.exists() and (read_yaml(config_path) or {}).get("base") not in (None, resolved["base"]):
        raise RndpoError(f"{config_path} holds another base configuration; use a new --out or delete {run}")
    dataset = load_dataset(data_cfg)
    splits = make_splits(dataset, split_cfg)
    splits_path = run / "splits.json"
    if splits_path.exists() and Splits.load(splits_path).to_dict() != splits.to_dict():
        raise RndpoError(f"{splits_path} was made with other split settings or data; use a new --out or delete {run}")
    run.mkdir(parents=True, exist_ok=True)
    splits.save(splits_path)
    write_yaml(config_path, resolved)
    console = Console()
    counts = splits.counts
    console.print(f"{dataset.meta.get('source', data)}: {len(dataset)} cases at {size}px → labeled {counts['labeled']}, "
                  f"pool {counts['pool']}, val {counts['val']}, test {counts['test']}")
    from rndpo.training import distributed

    dist_info = distributed.init()  # torchrun: every rank trains its share of each batch (DDP)
    best = train_base(dataset.select(splits.labeled), dataset.select(splits.val) if splits.val else None,
                      model_cfg, train_cfg, run / "base", progress=progress and dist_info.rank == 0,
                      dist_info=dist_info)
    if dist_info.rank != 0:
        return
    model, meta = load_model(best)
    results = {name: evaluate(model, dataset.select(getattr(splits, name)))
               for name in ("val", "test") if getattr(splits, name)}
    write_json(run / "base" / "eval.json", {"checkpoint": str(best), "step": meta.get("step"), **results})
    console.print(_metrics_table(f"base model {best} (step {meta.get('step')})", results))
    console.print(f"wall time {time.perf_counter() - started:.1f} s")


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Option(..., "--model", help="Model checkpoint (.safetensors) or a run folder holding best.safetensors."),
    data: str = typer.Option(..., "--data", help="Data folder (or 'synthetic') the model is evaluated on."),
    split: str = typer.Option("test", "--split", help="labeled | pool | val | test | all (every case of --data)."),
    splits: str | None = typer.Option(None, "--splits", help="splits.json (default: the one of the model's run folder)."),
    json_out: str | None = typer.Option(None, "--json", help="Write means and per-case values to this JSON file."),
    size: int | None = typer.Option(None, "--size", help="Size to read the data at (default: the model's training size)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    worst: int = typer.Option(5, "--worst", help="Also list the N cases with the lowest Dice (0: none)."),
) -> None:
    """Evaluate a model on a split: mean Dice / IoU / HD95 (table), per case in --json."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from rndpo.config import DataConfig
    from rndpo.data import Splits, load_dataset
    from rndpo.data.splits import SPLIT_NAMES
    from rndpo.io import write_json
    from rndpo.metrics import evaluate
    from rndpo.training.checkpoint import load_model, resolve_checkpoint

    if split not in (*SPLIT_NAMES, "all"):
        raise RndpoError(f"--split must be one of {', '.join(SPLIT_NAMES)}, all; got {split!r}")
    checkpoint = resolve_checkpoint(model)
    network, meta = load_model(checkpoint)
    size = size if size is not None else meta.get("size")
    if not isinstance(size, int):
        raise RndpoError(f"model {checkpoint} records size {size!r}; pass --size")
    dataset = load_dataset(DataConfig(path=data, size=size))
    if dataset.in_channels != int(meta["in_channels"]) or dataset.num_classes != int(meta["num_classes"]):
        raise RndpoError(f"data {data} ({dataset.in_channels} channel(s), {dataset.num_classes} classes) does not match model "
                         f"{checkpoint} ({meta['in_channels']} channel(s), {meta['num_classes']} classes)")
    splits_path = None
    if split != "all":
        candidates = [Path(splits)] if splits else [p / "splits.json" for p in (checkpoint.parent, checkpoint.parent.parent)]
        splits_path = next((p for p in candidates if p.is_file()), None)
        if splits_path is None:
            raise RndpoError(f"no splits file: {', '.join(map(str, candidates))} not found (pass --splits or --split all)")
        dataset = dataset.select(getattr(Splits.load(splits_path), split))
    if len(dataset) == 0:
        raise RndpoError(f"split {split!r} of {splits_path} is empty")
    if dataset.masks is None:
        raise RndpoError(f"data {data} has no masks to evaluate against")
    result = evaluate(network, dataset, batch_size=batch_size)
    console = Console()
    console.print(_metrics_table(f"{checkpoint} on {data}", {split: result}))
    if worst > 0:
        table = Table(title=f"{min(worst, len(dataset))} lowest-Dice cases")
        for column in ("case", "Dice", "IoU", "HD95 (px)"):
            table.add_column(column, justify="left" if column == "case" else "right")
        for case in sorted(result["per_case"], key=lambda c: c["dice"])[:worst]:
            table.add_row(case["case_id"], f"{case['dice']:.4f}", f"{case['iou']:.4f}", f"{case['hd95']:.2f}")
        console.print(table)
    if json_out:
        write_json(json_out, {"model": str(checkpoint), "data": data, "split": split,
                              "splits": None if splits_path is None else str(splits_path), "size": size, **result})
        console.print(f"per-case results → {json_out}")


def _console_log(message: str) -> None:
    typer.echo(message, err=True)


def _run_experiment(cfg, out: str | None, *, cells: list[int] | None, report: bool, progress: bool,
                    stages: str | None = None) -> None:
    from rndpo.experiment import Experiment
    from rndpo.report import format_results_table, write_report

    from rndpo.training import distributed

    dist_info = distributed.init()  # a process group when launched by torchrun, else nothing
    run_dir = Path(out or Path("runs") / cfg.name)
    main_rank = dist_info.rank == 0
    experiment = Experiment(cfg, run_dir, log=_console_log if main_rank else None, progress=progress and main_rank,
                            stages_dir=stages)
    total = len(experiment.cells())
    if cells:
        bad = [i for i in cells if not 0 <= i < total]
        if bad:
            raise RndpoError(f"cell index {bad[0]} out of range: this config has {total} cells (0..{total - 1})")
    start = time.perf_counter()
    rows = experiment.run(cells)
    if not main_rank:
        return
    typer.echo(format_results_table(rows))
    typer.echo(f"results: {run_dir / 'results.csv'}  ({time.perf_counter() - start:.0f} s)")
    if report:
        typer.echo(f"report: {write_report(run_dir)}")


@app.command("run")
def run_command(
    config: str = typer.Argument(..., help="Experiment YAML (see configs/ and `rndpo demo --print-config`)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/<name>)."),
    list_cells: bool = typer.Option(False, "--list", help="Print the cells with their indices and exit."),
    cell: Optional[list[int]] = typer.Option(None, "--cell", help="Run only these cell indices (repeatable)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report/ when done."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    stages: Optional[str] = typer.Option(
        None, "--stages", help="Shared stage folder (default RUN/stages): reuse the base models, proposals, "
                               "scores and pairs of another run whose config parts match."),
) -> None:
    """Run every cell of an experiment (finished cells and cached stages are skipped)."""
    from rndpo.experiment import plan_cells, read_config

    cfg = read_config(config)
    if list_cells:
        for item in plan_cells(cfg):
            typer.echo(item.describe())
        return
    _run_experiment(cfg, out, cells=cell, report=report, progress=progress, stages=stages)


@app.command("demo")
def demo_command(
    quick: bool = typer.Option(False, "--quick", help="A smaller demo (under a minute; used by the tests)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/demo or runs/demo-quick)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the demo's config as YAML and exit."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """The whole pipeline on synthetic data: base model, proposals, judges, mining, DPO vs RN-DPO, report."""
    import yaml

    from rndpo.demo import demo_config

    cfg = demo_config(quick=quick)
    if print_config:
        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return
    _run_experiment(cfg, out, cells=None, report=True, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (also used by tests)."""
    try:
        result = app(args=argv, standalone_mode=False)
        return int(result) if isinstance(result, int) else 0
    except SystemExit as exit_:  # typer/click --help and usage errors
        return int(exit_.code or 0)
    except Exception as error:  # noqa: BLE001
        if hasattr(error, "format_message") and hasattr(error, "exit_code"):  # click usage errors
            print(f"error: {error.format_message()}", file=sys.stderr)
            return int(error.exit_code)
        # everything else: one readable line (the traceback with RNDPO_DEBUG=1)
        if os.environ.get("RNDPO_DEBUG"):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        return f"invalid config: {format_validation_error(error)}"
    if isinstance(error, (RndpoError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return " ".join(str(error).split())
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
