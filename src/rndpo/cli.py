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
