"""``vmcluster array``: the array service (on an array host) and a look at one (from anywhere on
the storage networks)."""

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import click

from vmcluster.arrays.client import ServiceArray
from vmcluster.arrays.driver import ArrayStatus
from vmcluster.arrays.service import serve as serve_array
from vmcluster.arrays.serviceconfig import load_service_config
from vmcluster.cli.common import output_option, print_fields, print_json, print_table, run
from vmcluster.errors import ArrayUnavailable
from vmcluster.logs import configure_agent_logging

name_option = click.option("--name", "array_name", required=True, help="The array's name.")
addresses_argument = click.argument("addresses", nargs=-1, required=True, metavar="HOST:PORT...")


@click.group()
def array() -> None:
    """Array services: run one, or ask one (at its addresses on the storage networks)."""


@array.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="Array service configuration file (TOML).")  # fmt: skip
def serve(config_path: Path) -> None:
    """Run the array service in the foreground, beside the array's qemu-storage-daemon."""
    config = load_service_config(config_path)
    configure_agent_logging()

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_array(config)

    asyncio.run(main())


@array.command()
@name_option
@addresses_argument
@click.option("--wait", "wait_s", default=0.0, show_default=True, type=float,
              help="Seconds to keep asking while the array does not answer.")  # fmt: skip
@output_option
def status(array_name: str, addresses: tuple[str, ...], wait_s: float, output: str) -> None:
    """Whether the array answers (its service and its daemon), and what it holds."""
    driver = ServiceArray(name=array_name, addresses=addresses)

    async def ask() -> ArrayStatus:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return await driver.status()
            except ArrayUnavailable:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.1)

    answer = run(ask())
    if output == "json":
        print_json({"name": answer.name, "luns": answer.luns, "exports": answer.exports})
    else:
        print_fields([("array", answer.name), ("luns", answer.luns), ("exports", answer.exports)])


@array.command()
@name_option
@addresses_argument
@output_option
def luns(array_name: str, addresses: tuple[str, ...], output: str) -> None:
    """The array's LUNs with their size and generation mark."""
    found = run(ServiceArray(name=array_name, addresses=addresses).luns())
    if output == "json":
        print_json([{"name": x.name, "size_bytes": x.size_bytes, "generation": x.generation}
                    for x in found])  # fmt: skip
    else:
        print_table(["LUN", "SIZE_BYTES", "GENERATION"],
                    [(x.name, x.size_bytes, x.generation) for x in found])  # fmt: skip


@array.command()
@name_option
@addresses_argument
@click.option("--lun", default=None, help="Only this LUN's exports.")
@output_option
def exports(array_name: str, addresses: tuple[str, ...], lun: str | None, output: str) -> None:
    """The NBD exports the array serves now."""
    found = run(ServiceArray(name=array_name, addresses=addresses).exports(lun))
    if output == "json":
        print_json(found)
    else:
        for name in found:
            click.echo(name)
