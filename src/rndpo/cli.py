"""The ``rndpo`` command: parses arguments, calls the library, prints. No logic of its own.

Every command turns a user error (:class:`rndpo.errors.RndpoError`, a config validation error, a
missing file) into one readable line on stderr and a non-zero exit code; ``RNDPO_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import os
import sys

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
def _root() -> None:
    """Preference fine-tuning (DPO / RN-DPO) of segmentation models from noisy QC judges."""


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
