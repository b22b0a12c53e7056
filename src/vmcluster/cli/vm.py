"""``vmcluster vm``: create, start, stop, delete, list, show VMs and read their consoles.

By default every command works on the cluster's VMs, through any node's agent (``--via NODE``
picks one). ``--local`` works on this machine's single-host VMs instead (no cluster needed): the
foundation's mode, kept for development and for the probe workload on its own.
"""

import contextlib
import datetime
import sys
import time

import click

from vmcluster.cli import clustervm
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

local_option = click.option(
    "--local", is_flag=True, help="This machine's single-host VMs instead of the cluster's."
)


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
    help="Disk size (K, M, G, T), or VOLUME/DISK: a disk of a shared volume; repeat for more.",
)
@click.option(
    "--nic",
    "nics",
    multiple=True,
    type=click.Choice([str(m) for m in NicMode]),
    help="With --local: add a NIC; 'user' forwards the guest's HTTP to a port on 127.0.0.1.",
)
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Guest image.")
@click.option(
    "--probe-interval", default=100, show_default=True, type=int, help="Probe write interval, ms."
)
@click.option("--priority", type=click.Choice(["high", "medium", "low", "none"]),
              default="medium", show_default=True,
              help="Failover order; none: never started automatically.")  # fmt: skip
@click.option("--preferred", default="", metavar="N1,N2", help="Preferred owners, in order.")
@click.option("--possible", default="", metavar="N1,N2,N3",
              help="Possible owners (default: every node).")  # fmt: skip
@click.option("--anti-affinity", default="", metavar="CLASS[:hard]",
              help="Keep apart from VMs of the same class (hard: never together).")  # fmt: skip
@click.option("--failback", default="never", metavar="never|immediate|HH-HH",
              help="Back to the preferred owner: never, at once, or in a UTC window.")  # fmt: skip
@click.option("--array", default=None, help="The array for its disks (default: the first).")
@click.option("--volume", "volume_name", default=None, metavar="VOLUME",
              help="Make its new disks (--disk SIZE) in this shared volume.")  # fmt: skip
@click.option("--start", "start_now", is_flag=True, help="Start it right away.")
@click.option("--via", metavar="NODE", help="Ask this node's agent (default: any).")
@local_option
@output_option
def create(
    name: str, memory: str, vcpus: int, disks: tuple[str, ...], nics: tuple[str, ...],
    image: str, probe_interval: int, priority: str, preferred: str, possible: str,
    anti_affinity: str, failback: str, array: str | None, volume_name: str | None,
    start_now: bool, via: str | None, local: bool, output: str,
) -> None:  # fmt: skip
    """Create a VM (stopped unless --start): in the cluster, its disks LUNs on an array."""
    memory_bytes = parse_size(memory, what="memory size", default_unit="M")
    if memory_bytes % MIB:
        raise InvalidInput(f"invalid memory size {memory!r}: use whole MiB")
    if local:
        cluster_only = {"--priority": priority != "medium", "--preferred": preferred,
                        "--possible": possible, "--anti-affinity": anti_affinity,
                        "--failback": failback != "never", "--array": array,
                        "--volume": volume_name, "--start": start_now, "--via": via,
                        "--disk VOLUME/DISK": any("/" in d for d in disks)}  # fmt: skip
        given = [option for option, value in cluster_only.items() if value]
        if given:
            raise InvalidInput(f"{given[0]} is for clustered VMs: drop it or drop --local")
    else:
        if nics:
            raise InvalidInput("--nic needs --local: clustered VMs have no NICs yet")
        clustervm.create(
            name=name, memory_mib=memory_bytes // MIB, vcpus=vcpus,
            disks=[d if "/" in d else parse_size(d, what="disk size") for d in disks],
            image=image, volume=volume_name,
            probe_interval=probe_interval, priority=priority, preferred=preferred,
            possible=possible, anti_affinity=anti_affinity, failback=failback, array=array,
            start=start_now, via=via, output=output,
        )  # fmt: skip
        return
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
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the VM runs.")  # fmt: skip
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait.")  # fmt: skip
@click.option("--via", metavar="NODE", help="Ask this node's agent (default: any).")
@local_option
@output_option
def start(name: str, wait: bool, timeout: float, via: str | None, local: bool, output: str) -> None:
    """Start a VM (in the cluster: the leader places it; waits until it runs)."""
    if not local:
        clustervm.start(name, wait=wait, timeout=timeout, via=via, output=output)
        return
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
@click.option("--no-wait", "no_wait", is_flag=True, help="Return once the stop is requested.")
@click.option("--via", metavar="NODE", help="Ask this node's agent (default: any).")
@local_option
def stop(
    name: str, force: bool, timeout: float, no_wait: bool, via: str | None, local: bool
) -> None:
    """Stop a VM: press its power button, kill QEMU if it does not power off in time."""
    if not local:
        if force:
            raise InvalidInput("--force needs --local (the cluster kills a VM after 30 s)")
        clustervm.stop(name, wait=not no_wait, timeout=max(timeout, 60.0), via=via)
        return
    status = run(_host().stop(name, force=force, timeout_s=timeout))
    stdout.print(f"stopped VM {name}: {status.detail}", markup=False)


@vm.command()
@click.argument("name")
@click.option("--via", metavar="NODE", help="Ask this node's agent (default: any).")
@local_option
def delete(name: str, via: str | None, local: bool) -> None:
    """Delete a stopped VM and its disks."""
    if not local:
        clustervm.delete(name, via=via)
        return
    _host().delete(name)
    stdout.print(f"deleted VM {name}", markup=False)


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


@vm.command("list")
@click.option("--via", metavar="NODE", help="Ask this node's agent (default: any).")
@local_option
@output_option
def list_(via: str | None, local: bool, output: str) -> None:
    """List VMs with their state, owner node and generation."""
    if not local:
        clustervm.list_(via=via, output=output)
        return
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
@click.option("--via", metavar="NODE", help="Ask this node's agent (default: any).")
@local_option
@output_option
def show(name: str, via: str | None, local: bool, output: str) -> None:
    """Show one VM in detail."""
    if not local:
        clustervm.show(name, via=via, output=output)
        return
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
@click.option("--boot", type=int, help="With --local: instance N's console (default: latest).")
@click.option("--generation", type=int, help="The console of generation N (default: current).")
@click.option("--node", default=None, help="The node that ran that generation (default: owner).")
@local_option
def console(
    name: str, follow: bool, boot: int | None, generation: int | None, node: str | None,
    local: bool,
) -> None:  # fmt: skip
    """Print a VM's serial console output (in the cluster: of its current instance)."""
    if not local:
        clustervm.console(name, follow=follow, generation=generation, node=node)
        return
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
