"""``vmcluster lab``: a whole multi-host cluster on this machine, built from network namespaces."""

import datetime
import os
import sys
from typing import Any

import click

from vmcluster.cli.common import data_dir, output_option, print_json, print_table, stdout
from vmcluster.errors import InvalidInput, NotFound
from vmcluster.lab import faults as lab_faults
from vmcluster.lab.lab import Lab, list_labs, resolve_lab
from vmcluster.lab.plan import parse_network

name_option = click.option("--name", help="Lab name (default: the current lab).")


@click.group()
def lab() -> None:
    """A multi-host lab cluster on this machine (needs root)."""


@lab.command()
@click.option("--name", default="lab", show_default=True, help="Lab name (1-10 letters/digits).")
@click.option("--nodes", default=3, show_default=True, type=int, help="Cluster nodes (1-8).")
@click.option("--arrays", default=2, show_default=True, type=int, help="Storage arrays (0-4).")
@click.option("--witness", is_flag=True, help="Add a witness host running an etcd member.")
def up(name: str, nodes: int, arrays: int, witness: bool) -> None:
    """Build a lab: namespaces, networks, an etcd cluster and NBD arrays."""
    started = datetime.datetime.now()
    the_lab = Lab(data_dir(), name)
    the_lab.up(nodes=nodes, arrays=arrays, witness=witness)
    status = the_lab.status()
    seconds = (datetime.datetime.now() - started).total_seconds()
    stdout.print(f"lab {name} is up in {seconds:.1f} s (now the current lab)", markup=False)
    _print_hosts(status)
    stdout.print(f"etcd: {', '.join(status['etcd_endpoints'])}", markup=False)
    for array in status["arrays"]:
        stdout.print(f"array {array['host']}: nbd {' '.join(array['nbd'].values())}  "
                     f"service {' '.join(array['service'])}", markup=False)  # fmt: skip


def _print_hosts(status: dict[str, object]) -> None:
    hosts = status["hosts"]
    assert isinstance(hosts, list)
    networks = ["cluster1", "cluster2", "storage-a", "storage-b", "vm"]
    rows = []
    for host in hosts:
        cells = []
        for net in networks:
            if net not in host["addresses"]:
                cells.append("")
                continue
            address = host["addresses"][net] or "bridge"
            down = host["links"][net] == "down"
            cells.append(f"{address} (down)" if down else address)
        rows.append([host["name"], host["role"], *cells])
    print_table(["HOST", "ROLE", *(n.upper() for n in networks)], rows)


@lab.command()
@name_option
@output_option
def status(name: str | None, output: str) -> None:
    """Hosts, addresses, processes, links and faults of a lab."""
    result = resolve_lab(data_dir(), name).status()
    if output == "json":
        print_json(result)
        return
    stdout.print(f"lab {result['name']}: {result['status']}", markup=False)
    _print_hosts(result)
    stdout.print("")
    print_table(
        ["ROLE", "HOST", "PID", "ALIVE"],
        [(p["role"], p["host"], p["pid"], "yes" if p["alive"] else "NO")
         for p in result["processes"]],
    )  # fmt: skip
    stdout.print("")
    faults = result["faults"]
    stdout.print("faults: " + ("none" if not faults else ""), markup=False)
    for fault in faults:
        stdout.print(f"  {lab_faults.describe(fault)}", markup=False)


@lab.command()
@name_option
@click.option("--vm", "vm_names", multiple=True, help="Only this VM (repeatable).")
@output_option
def check(name: str | None, vm_names: tuple[str, ...], output: str) -> None:
    """Check every probe VM: lost acknowledged writes (I2) and writes of retired generations (I1).

    Exits 1 if any VM has a lost ACK or a stale write.
    """
    from vmcluster.lab.probecheck import check_lab

    the_lab = resolve_lab(data_dir(), name)
    vms = the_lab.api().get("/v1/vms")
    if vm_names:
        missing = sorted(set(vm_names) - {v["name"] for v in vms})
        if missing:
            raise NotFound(f"lab {the_lab.name} has no VM {missing[0]!r}")
        vms = [v for v in vms if v["name"] in vm_names]
    results = check_lab(the_lab, vms)
    if output == "json":
        print_json([r.to_json() for r in results])
    else:
        print_table(["VM", "ACKED", "ON DISK", "INSTANCES", "GENERATIONS", "LOST ACKS",
                     "STALE WRITES", "OK"],
                    [(r.vm, r.highest_acked, r.highest_on_disk, r.instances,
                      ",".join(map(str, r.generations)), r.lost_acks, r.stale_writes,
                      "yes" if r.ok else "NO") for r in results])  # fmt: skip
        for r in results:
            for example in (*r.lost_ack_examples, *r.stale_write_examples):
                stdout.print(f"  {r.vm}: {example}", markup=False)
    if not all(r.ok for r in results):
        sys.exit(1)


@lab.command()
@name_option
@click.option("--duration", default="10m", show_default=True,
              help="How long faults and operations come (90s, 10m, 1h).")  # fmt: skip
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the plan (default: random, printed to repeat the run).")  # fmt: skip
@click.option("--vms", "vm_count", type=int, default=3, show_default=True,
              help="Probe VMs to create (128 MiB, 16M disk) if the cluster has none.")  # fmt: skip
@click.option("--converge-timeout", default="120s", show_default=True,
              help="How long to wait, after healing, for the cluster to converge.")  # fmt: skip
@output_option
def chaos(name: str | None, duration: str, seed: int | None, vm_count: int,
          converge_timeout: str, output: str) -> None:  # fmt: skip
    """Random faults and admin operations, one at a time; then heal, converge and check.

    Faults: crash and restart of a node, a link down, a partition, a frozen agent, a crash and
    restart of an array, a slow link; operations: vm stop/start, node drain --wait/resume.
    Exits 1 (with the reason) unless the cluster converged and the probe check found no lost
    ACK and no stale write.
    """
    import secrets

    from vmcluster.core.units import parse_duration
    from vmcluster.lab import chaos as lab_chaos

    duration_s = lab_chaos.parse_chaos_duration(duration)
    lab_chaos.check_vm_count(vm_count)
    converge_s = parse_duration(converge_timeout, what="--converge-timeout")
    if not 1 <= converge_s <= 3600:
        raise InvalidInput(f"invalid --converge-timeout {converge_timeout!r}: use 1 s to 1 h")
    the_lab = resolve_lab(data_dir(), name)
    the_lab.load()  # a lab that does not exist: one line, before anything else
    seed = secrets.randbelow(1_000_000) if seed is None else seed
    progress = lab_chaos.Progress(sys.stderr)
    repeat = lab_chaos.repeat_command(the_lab.name, duration, seed, vm_count)
    progress.note(f"chaos: seed {seed}; repeat with: {repeat}")
    report = lab_chaos.run_chaos(the_lab, duration_s=duration_s, seed=seed, vm_count=vm_count,
                                 converge_timeout_s=converge_s, progress=progress)  # fmt: skip
    report["repeat"] = repeat
    if output == "json":
        print_json(report)
    else:
        _print_chaos(report)
    if not report["passed"]:
        click.echo(f"error: chaos run failed: {report['reason']}", err=True)
        sys.exit(1)


def _print_chaos(report: dict[str, Any]) -> None:
    from vmcluster.lab import chaos as lab_chaos

    vms = report["vms"]
    which = (f"created {', '.join(vms['created'])}" if vms["created"]
             else f"existing {', '.join(vms['existing'])}")  # fmt: skip
    stdout.print(f"chaos on lab {report['lab']}: seed {report['seed']}, "
                 f"{report['duration_s']:g} s, {report['steps_run']} of "
                 f"{report['planned_steps']} planned steps, VMs {which}", markup=False)  # fmt: skip
    print_table(["T (s)", "STEP", "HELD (s)", "REACTION"], lab_chaos.print_order(report))
    heal = report["heal"]
    stdout.print(f"heal at {heal['at_s']:.1f} s: {heal['did'] or '-'}; "
                 f"{heal['reaction']['summary']}", markup=False)  # fmt: skip
    conv = report["convergence"]
    if conv["converged"]:
        stdout.print(f"converged {conv['after_s']:.1f} s after healing: nodes "
                     f"{', '.join(f'{n} {s}' for n, s in conv['nodes'].items())}, leader "
                     f"{conv['leader']}", markup=False)  # fmt: skip
    else:
        stdout.print(f"NOT converged after {conv['after_s']:.1f} s: "
                     f"{'; '.join(conv['problems'])}", markup=False)  # fmt: skip
    check = report["check"]
    if check is not None:
        print_table(["VM", "ACKED", "ON DISK", "GENERATIONS", "LOST ACKS", "STALE WRITES", "OK"],
                    [(v["vm"], v["highest_acked"], v["highest_on_disk"],
                      ",".join(map(str, v["generations"])), v["lost_acks"], v["stale_writes"],
                      "yes" if v["ok"] else "NO") for v in check["vms"]])  # fmt: skip
    for error in report["errors"]:
        stdout.print(f"error during the run: {error}", markup=False)
    stdout.print(f"verdict: {'PASS' if report['passed'] else 'FAIL'}: {report['reason']}",
                 markup=False)  # fmt: skip


@lab.command("list")
@output_option
def list_(output: str) -> None:
    """Labs on this machine."""
    names = list_labs(data_dir())
    if output == "json":
        print_json(names)
    else:
        for lab_name in names:
            stdout.print(lab_name, markup=False)


@lab.command()
@name_option
def down(name: str | None) -> None:
    """Stop every process of the lab and remove its namespaces and state."""
    data = data_dir()
    the_lab = Lab(data, name) if name else resolve_lab(data, None)
    removed = the_lab.down()
    processes = sum(1 for r in removed if r.startswith("process"))
    namespaces = sum(1 for r in removed if r.startswith("namespace"))
    if removed:
        stdout.print(f"lab {the_lab.name} removed: {processes} processes stopped, "
                     f"{namespaces} namespaces deleted", markup=False)  # fmt: skip
    else:
        stdout.print(f"lab {the_lab.name}: nothing to remove", markup=False)


@lab.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@name_option
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec(name: str | None, host: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside HOST's network namespace: vmcluster lab exec n1 -- ip addr."""
    the_lab = resolve_lab(data_dir(), name)
    namespace = the_lab.plan().host(host).namespace
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError("no command given: vmcluster lab exec HOST -- COMMAND...")
    argv = ["ip", "netns", "exec", namespace, *command]
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@lab.group()
def fault() -> None:
    """Inject faults: crash, restart, link, partition, freeze, thaw, slow, heal."""


def _done(message: str) -> None:
    stdout.print(message, markup=False)


@fault.command()
@name_option
@click.argument("host")
def crash(name: str | None, host: str) -> None:
    """Power-cut HOST: SIGKILL all its processes at once; its links go down."""
    _done(lab_faults.crash(resolve_lab(data_dir(), name), host))


@fault.command()
@name_option
@click.argument("host")
def restart(name: str | None, host: str) -> None:
    """Bring a crashed HOST back: links up, its processes started again."""
    _done(lab_faults.restart(resolve_lab(data_dir(), name), host))


@fault.command()
@name_option
@click.argument("host")
@click.argument("network")
@click.argument("state", type=click.Choice(["down", "up"]))
def link(name: str | None, host: str, network: str, state: str) -> None:
    """Take HOST's link on NETWORK down or up."""
    _done(lab_faults.set_link(resolve_lab(data_dir(), name), host, parse_network(network),
                              up=state == "up"))  # fmt: skip


@fault.command(context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("groups", nargs=-1, required=True)
def partition(name: str | None, groups: tuple[str, ...]) -> None:
    """Cut cluster traffic between two groups: partition n1 / n2 n3."""
    if groups.count("/") != 1:
        raise click.UsageError("write two groups separated by '/': partition n1 / n2 n3")
    split = groups.index("/")
    _done(lab_faults.partition(resolve_lab(data_dir(), name), list(groups[:split]),
                               list(groups[split + 1 :])))  # fmt: skip


@fault.command("agent-restart")
@name_option
@click.option("--kill", "kill_it", is_flag=True,
              help="SIGKILL (a crash of the agent alone) instead of SIGTERM.")  # fmt: skip
@click.argument("host")
def agent_restart(name: str | None, kill_it: bool, host: str) -> None:
    """Restart HOST's agent: SIGTERM (a planned restart: its VMs stay), then start it again."""
    _done(lab_faults.restart_agent(resolve_lab(data_dir(), name), host, kill_it=kill_it))


@fault.command()
@name_option
@click.option("--role", default="agent", show_default=True, help="Which process to freeze.")
@click.argument("host")
def freeze(name: str | None, role: str, host: str) -> None:
    """SIGSTOP HOST's agent (or another --role: etcd, array)."""
    _done(lab_faults.freeze(resolve_lab(data_dir(), name), host, role))


@fault.command()
@name_option
@click.option("--role", default="agent", show_default=True, help="Which process to thaw.")
@click.argument("host")
def thaw(name: str | None, role: str, host: str) -> None:
    """SIGCONT a frozen process of HOST."""
    _done(lab_faults.thaw(resolve_lab(data_dir(), name), host, role))


@fault.command()
@name_option
@click.argument("host")
@click.argument("network")
@click.argument("rate")
def slow(name: str | None, host: str, network: str, rate: str) -> None:
    """Limit HOST's link on NETWORK to RATE (e.g. 1mbit, 500kbit) both ways (tbf)."""
    _done(lab_faults.slow(resolve_lab(data_dir(), name), host, parse_network(network), rate))


@fault.command()
@name_option
def heal(name: str | None) -> None:
    """Undo every fault: restart crashed hosts, links up, partitions and limits gone, thaw."""
    _done(lab_faults.heal(resolve_lab(data_dir(), name)))
