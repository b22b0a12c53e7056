"""What every command shares: the data directory, output formats, errors, async entry."""

import asyncio
import json
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from vmcluster.paths import DataDir

T = TypeVar("T")

# Piped output is not cut to 80 columns: tables take the width they need.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)

output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def data_dir() -> DataDir:
    return DataDir.from_env()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("-" if cell is None or cell == "" else str(cell) for cell in row))
    stdout.print(table)


def print_fields(fields: Sequence[tuple[str, object]]) -> None:
    width = max(len(key) for key, _ in fields)
    for key, value in fields:
        shown = "-" if value is None or value == "" else value
        stdout.print(f"{key + ':':<{width + 1}} {shown}", markup=False)
