"""The root `polyreward` command, and the option types its sub-commands share.

The root knows no sub-command: every package registers its own through the `polyreward.commands` entry-point
group (pyproject.toml), so `polyreward.models` never imports training or service, and a serving install lists
only what it can run. Errors that are the user's to fix print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer

from polyreward.models import __version__
from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.session import AUTO_PRECISION_TEXT

app = typer.Typer(
    name="polyreward",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Errors that are the user's to fix: printed as one line, exit code 2, no traceback.
USER_ERRORS = (PolyrewardError, FileNotFoundError, IsADirectoryError, PermissionError)


class PrecisionChoice(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    int8 = "int8"
    int8_dynamic = "int8-dynamic"
    fp16 = "fp16"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"


def default_is(text: str) -> str:
    """A help-text suffix for a default that is computed, not a literal (`[default: 512 on CPU, ...]`)."""
    return f" \\[default: {text}]"  # escaped: Rich would read [default: ...] as markup


PRECISION_HELP = f"which graph to run ({AUTO_PRECISION_TEXT})"
DEVICE_HELP = "auto: CUDA when onnxruntime-gpu sees a GPU, else the CPU"
PrecisionOption = Annotated[PrecisionChoice, typer.Option(help=PRECISION_HELP)]
DeviceOption = Annotated[DeviceChoice, typer.Option(help=DEVICE_HELP)]
RulesOption = Annotated[
    Path | None,
    typer.Option(
        help="rule objectives (YAML): format, length, JSON and correctness checks, reasoning-trace stripping; "
        "their values follow the learned objectives (README, rule objectives; serve: also POLYREWARD_RULES)",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"polyreward {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Multi-objective reward models: export to ONNX, score, train and serve vector rewards."""


def _load_commands() -> None:
    for ep in sorted(entry_points(group="polyreward.commands"), key=lambda ep: ep.name):
        command = ep.load()
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=ep.name)
        else:
            app.command(ep.name)(command)


def main() -> None:
    # Our progress at INFO; libraries (ORT's quantizer is chatty on the root logger) at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("polyreward").setLevel(logging.INFO)
    _load_commands()
    try:
        app()
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
