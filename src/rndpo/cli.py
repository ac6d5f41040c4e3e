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
