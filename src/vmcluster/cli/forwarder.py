"""``vmcluster forwarder``: the node's block forwarder (systemd runs ``serve`` this way)."""

from pathlib import Path

import click

from vmcluster.forwarder import service
from vmcluster.logs import configure_agent_logging


@click.group()
def forwarder() -> None:
    """The node's block forwarder: NBD between the local QEMU and the arrays, with multipath."""


@forwarder.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    default=Path("/run/vmcluster/forwarder.sock"),
    show_default=True,
    help="The control socket (the agent's).",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=Path("/run/vmcluster/fwd"),
    show_default=True,
    help="Where the disks' NBD sockets for QEMU go.",
)
@click.option("--loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop",
              show_default=True, help="The event loop (uvloop: about twice as fast).")  # fmt: skip
@click.option("--malloc", type=click.Choice(["tuned", "default"]), default="tuned",
              show_default=True,
              help="glibc malloc's thresholds (tuned: freed buffers are reused).")  # fmt: skip
def serve(socket_path: Path, run_dir: Path, loop: str, malloc: str) -> None:
    """Run the forwarder in the foreground until SIGTERM (its disks go with it)."""
    configure_agent_logging()
    service.run(socket_path, run_dir, loop=loop, malloc=malloc)
