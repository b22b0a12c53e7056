"""``vmcluster vm``: create, start, stop, delete, list, show VMs and read their consoles."""

import contextlib
import datetime
import sys
import time

import click

from vmcluster.cli.common import (
    data_dir,
    output_option,
    print_fields,
    print_json,
    print_table,
    run,
    stdout,
)
from vmcluster.core.model import DEFAULT_IMAGE, DiskSpec, NicMode, NicSpec, VmSpec, default_mac
from vmcluster.core.units import MIB, format_size, parse_size
from vmcluster.errors import InvalidInput, NotFound
from vmcluster.local.host import LocalHost, VmStatus


def _host() -> LocalHost:
    return LocalHost(data_dir())


@click.group()
def vm() -> None:
    """Virtual machines."""


@vm.command()
@click.argument("name")
@click.option("--memory", default="128", show_default=True, help="Memory, MiB (or 1G, 512M).")
@click.option("--vcpus", default=1, show_default=True, type=int, help="Virtual CPUs.")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    default=["256M"],
    show_default=True,
    help="Disk size (K, M, G, T); repeat for more disks.",
)
@click.option(
    "--nic",
    "nics",
    multiple=True,
    type=click.Choice([str(m) for m in NicMode]),
    help="Add a NIC: 'user' forwards the guest's HTTP to a port on 127.0.0.1.",
)
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Guest image.")
@click.option(
    "--probe-interval", default=100, show_default=True, type=int, help="Probe write interval, ms."
)
@output_option
def create(
    name: str, memory: str, vcpus: int, disks: tuple[str, ...], nics: tuple[str, ...],
    image: str, probe_interval: int, output: str,
) -> None:  # fmt: skip
    """Create a VM (stopped)."""
    memory_bytes = parse_size(memory, what="memory size", default_unit="M")
    if memory_bytes % MIB:
        raise InvalidInput(f"invalid memory size {memory!r}: use whole MiB")
    spec = VmSpec(
        name=name,
        vcpus=vcpus,
        memory_mib=memory_bytes // MIB,
        disks=tuple(
            DiskSpec(name=f"disk{i}", size_bytes=parse_size(size, what="disk size"))
            for i, size in enumerate(disks)
        ),
        nics=tuple(
            NicSpec(mode=NicMode(mode), mac=default_mac(name, i)) for i, mode in enumerate(nics)
        ),
        image=image,
        probe_interval_ms=probe_interval,
    )
    status = _host().create(spec)
    if output == "json":
        print_json(status.to_dict())
    else:
        stdout.print(f"created VM {name}", markup=False)


@vm.command()
@click.argument("name")
@output_option
def start(name: str, output: str) -> None:
    """Start a VM."""
    status = run(_host().start(name))
    if output == "json":
        print_json(status.to_dict())
        return
    stdout.print(
        f"started VM {name}: QEMU pid {status.pid}, accelerator {status.accel}, "
        f"console {status.console_log}",
        markup=False,
    )
    for url in status.http_urls:
        stdout.print(f"  http: {url}", markup=False)


@vm.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Kill QEMU at once instead of a guest power-off.")
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait for the guest to power off before killing QEMU.",
)
def stop(name: str, force: bool, timeout: float) -> None:
    """Stop a VM: press its power button, kill QEMU if it does not power off in time."""
    status = run(_host().stop(name, force=force, timeout_s=timeout))
    stdout.print(f"stopped VM {name}: {status.detail}", markup=False)


@vm.command()
@click.argument("name")
def delete(name: str) -> None:
    """Delete a stopped VM and its disks."""
    _host().delete(name)
    stdout.print(f"deleted VM {name}", markup=False)


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


@vm.command("list")
@output_option
def list_(output: str) -> None:
    """List VMs with their observed state."""
    statuses = run(_host().list())
    if output == "json":
        print_json([s.to_dict() for s in statuses])
        return
    print_table(
        ["NAME", "STATE", "PID", "VCPUS", "MEMORY", "BOOT", "DETAIL"],
        [
            (s.spec.name, s.state, s.pid, s.spec.vcpus, f"{s.spec.memory_mib}M", s.boot, s.detail)
            for s in statuses
        ],
    )


@vm.command()
@click.argument("name")
@output_option
def show(name: str, output: str) -> None:
    """Show one VM in detail."""
    status: VmStatus = run(_host().status(name))
    if output == "json":
        print_json(status.to_dict())
        return
    spec = status.spec
    print_fields([
        ("name", spec.name),
        ("state", status.state),
        ("detail", status.detail),
        ("pid", status.pid),
        ("accelerator", status.accel),
        ("vcpus", spec.vcpus),
        ("memory", f"{spec.memory_mib} MiB"),
        ("disks", ", ".join(f"{d.name} {format_size(d.size_bytes)}" for d in spec.disks)),
        ("nics", ", ".join(f"{n.mode} {n.mac}" for n in spec.nics)),
        ("http", " ".join(status.http_urls)),
        ("image", spec.image),
        ("boot", status.boot),
        ("generation", status.generation),
        ("started", _when(status.started_at)),
        ("console log", status.console_log),
    ])  # fmt: skip


@vm.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the VM stops.")
@click.option("--boot", type=int, help="Show instance N's console (default: the latest).")
def console(name: str, follow: bool, boot: int | None) -> None:
    """Print a VM's serial console output."""
    host = _host()
    path = host.console_log(name, boot)
    if path is None:
        if boot is not None:
            raise NotFound(f"VM {name!r} has no instance {boot}")
        raise NotFound(f"VM {name!r} has never been started: no console output yet")
    out = sys.stdout.buffer
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        out.write(f.read())
        out.flush()
        while follow:
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not host.is_running(name):
                break
            time.sleep(0.2)
