"""The agent's side of the watchdog (agent/watchdog.py, a process of its own): its state file
kept up to date with the deadline (half a self-fence margin after the agent's own), the
instances, and the QEMU processes being launched; the process started when the first instance
is about to run."""

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from vmcluster.agent import watchdog
from vmcluster.agent.config import AgentConfig
from vmcluster.agent.hosting import VmHost
from vmcluster.agent.lease import QuorumState
from vmcluster.clusterstate.handover import DeadAgentTerms
from vmcluster.clusterstate.keys import Keys
from vmcluster.logs import event, get_logger

log = get_logger(__name__)


class WatchdogLink:
    def __init__(
        self, *, config: AgentConfig, host: VmHost, quorum: QuorumState, incarnation: int = 0
    ) -> None:
        """``incarnation``: the agent's (0: no hand-over by the watchdog if the agent dies)."""
        self.config = config
        self.incarnation = incarnation
        self.host = host
        self.quorum = quorum
        self._told: tuple[float, frozenset[Any], frozenset[Any], Any] | None = None
        self._child: subprocess.Popen[bytes] | None = None
        # A previous run's instances, kept covered until this run has adopted them.
        self._inherited: frozenset[Any] = frozenset()
        self._adopted = False

    def tighten(self, valid_until: float) -> None:
        """Before the lease claims the node (``valid_until``: the new lease's validity): the
        watchdog's deadline is brought forward to this lease's, and the instances it lists
        stay covered (renewed with the lease) until :meth:`adopted`."""
        try:
            listed = watchdog.tighten(
                Path(self.config.vms.run_dir),
                valid_until - self.config.timings.self_fence_margin_s / 2,
            )
        except OSError as exc:  # an earlier run's longer deadline may stand: no claim yet
            log.warning(event("watchdog.update.failed", reason=str(exc)))
            raise
        if not self._adopted and listed:
            self._inherited = frozenset(listed)

    def adopted(self) -> None:
        """This run's host has adopted what runs here: its instances are the whole list."""
        self._adopted = True
        self._inherited = frozenset()

    async def run(self) -> None:
        """Keep the watchdog process told of the deadline and the instances (once VMs run)."""
        while True:
            await asyncio.sleep(self.config.timings.self_fence_check_s)
            if self._child is not None:
                self._child.poll()  # reap it if it died
            self.tell()

    def terms(self) -> DeadAgentTerms | None:
        """The terms on which the watchdog hands the node over if this agent dies: while the
        node is this agent's (its lease, not handed over), restarts have a grace, and every
        QEMU here is known by VM and generation (not while an earlier run's are adopted)."""
        quorum, grace = self.quorum, self.config.timings.restart_grace_s
        if grace <= 0 or not self.incarnation or not quorum.lease_id:
            return None
        if quorum.handed_over_until is not None:
            return None
        if self._inherited:
            return None
        keys = Keys(self.config.cluster)
        running = set(self.host.instances) | set(self.host.launching) | set(self.host.unwatched)
        return DeadAgentTerms(
            node=self.config.node, alive_key=keys.node(self.config.node, "alive"),
            lease=quorum.lease_id, incarnation=self.incarnation, grace_s=grace,
            vms=tuple((keys.vm(vm, "placement"), vm, gen) for vm, gen in sorted(running)),
        )  # fmt: skip

    def deadline(self) -> float:
        """The watchdog is the backstop: its deadline is half a margin after the agent's own,
        still before the lease (or, handed over for a restart, the restart lease) can end."""
        return self.quorum.covered_until() - self.config.timings.self_fence_margin_s / 2

    def tell(self) -> None:
        """Write the watchdog's state if it changed: the deadline, the instances, and the QEMU
        processes being launched (by pid file: a launch covered before its pid is known).
        Called by the loop, and by a start just before it launches QEMU."""
        run_dir = Path(self.config.vms.run_dir)
        t = self.config.timings
        instances = frozenset(i.proc for i in self.host.instances.values()) | self._inherited
        instances |= frozenset(self.host.unwatched.values())
        launching = frozenset(self.host.launching.items())
        if not instances and not launching and self._told is None:
            return
        terms = self.terms()
        state = (self.deadline(), instances, launching, terms)
        if state == self._told:
            return
        handover = None
        if terms is not None:
            handover = watchdog.handover_terms(terms, etcd=self.config.etcd,
                                               timeout_s=t.store_timeout_s,
                                               margin_s=t.self_fence_margin_s)  # fmt: skip
        try:
            watchdog.write_state(
                run_dir, state[0], sorted(instances, key=lambda p: p.pid),
                resiliency_s=t.resiliency_period_s, check_s=t.watchdog_check_s,
                launching=[(str(path), vm, gen) for (vm, gen), path in sorted(launching)],
                handover=handover,
            )  # fmt: skip
            self._told = state
            child = self._child
            starting = child is not None and child.poll() is None
            if (instances or launching) and not starting and watchdog.running(run_dir) is None:
                self._child = self._start(run_dir)
        except OSError as exc:
            log.warning(event("watchdog.update.failed", reason=str(exc)))

    def _start(self, run_dir: Path) -> "subprocess.Popen[bytes]":
        log_path = Path(self.config.data_dir) / "watchdog.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "vmcluster.agent.watchdog", str(run_dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # it must outlive a crashed or killed agent
            )  # fmt: skip
        log.info(event("watchdog.started", pid=child.pid, run_dir=str(run_dir)))
        return child
