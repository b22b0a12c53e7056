"""``vmcluster agent``: run the node agent in the foreground (systemd runs it this way)."""

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from vmcluster.agent.agent import Agent
from vmcluster.agent.config import Secrets, load_config
from vmcluster.clusterstate.etcd import EtcdStore
from vmcluster.logs import configure_agent_logging

# How long a planned stop waits for the hand-over (a few store requests, each retried over the
# etcd endpoints); cut short, the hand-over is undone and the node's VMs fail over as after a
# crash. Well within systemd's stop timeout (90 s by default).
HAND_OVER_TIMEOUT_S = 10.0


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="Agent configuration file (TOML).")  # fmt: skip
def agent(config_path: Path) -> None:
    """Run the node agent: membership, quorum, leader election, controller and REST API."""
    config = load_config(config_path)
    secrets = Secrets.read(Path(config.secrets_file))
    configure_agent_logging()

    async def main() -> None:
        store = EtcdStore(list(config.etcd), timeout_s=config.timings.store_timeout_s)
        the_agent = Agent(config, secrets, store)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task[None]] = []

        async def stop() -> None:
            """A planned stop (systemctl restart, an upgrade): hand over, then stop."""
            # Without a hand-over the node's VMs are looked after as after a crash.
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(the_agent.prepare_restart(), HAND_OVER_TIMEOUT_S)
            task.cancel()

        def on_signal() -> None:
            if stopping:  # a second signal: stop now
                task.cancel()
                return
            stopping.append(loop.create_task(stop()))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await the_agent.run()

    asyncio.run(main())
