"""The root of the ``vmcluster`` command and its error handling."""

import sys
from typing import Any

import click

from vmcluster import __version__, logs
from vmcluster.cli.agent import agent
from vmcluster.cli.array import array
from vmcluster.cli.cluster import cluster, events, node
from vmcluster.cli.forwarder import forwarder
from vmcluster.cli.image import image
from vmcluster.cli.lab import lab
from vmcluster.cli.path import path
from vmcluster.cli.sim import sim
from vmcluster.cli.vm import vm
from vmcluster.cli.volume import disk, volume
from vmcluster.errors import VmclusterError


class _Root(click.Group):
    """Turns vmcluster errors into one line on stderr and a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmclusterError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmcluster")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """vmcluster: failover clustering for KVM/QEMU virtual machines.

    The data directory is $VMCLUSTER_HOME (default ~/.local/share/vmcluster).
    """
    logs.configure(verbose)
    ctx.obj = {"debug": debug}


cli.add_command(vm)
cli.add_command(image)
cli.add_command(lab)
cli.add_command(agent)
cli.add_command(array)
cli.add_command(cluster)
cli.add_command(node)
cli.add_command(events)
cli.add_command(sim)
cli.add_command(forwarder)
cli.add_command(path)
cli.add_command(volume)
cli.add_command(disk)


def main() -> None:
    cli(prog_name="vmcluster")
