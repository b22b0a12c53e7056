"""``python -m vmcluster.forwarder --socket S --run-dir D [--loop uvloop|asyncio]
[--malloc tuned|default]``: the block forwarder with nothing else imported (the ``vmcluster``
command imports every command: about 35 MiB more memory and a slower start). systemd and the
lab start it this way."""

import argparse
from pathlib import Path

from vmcluster.forwarder import service
from vmcluster.logs import configure_agent_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vmcluster.forwarder",
                                     description="the node's block forwarder")  # fmt: skip
    parser.add_argument("--socket", type=Path, default=Path("/run/vmcluster/forwarder.sock"))
    parser.add_argument("--run-dir", type=Path, default=Path("/run/vmcluster/fwd"))
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc malloc's thresholds: tuned (freed buffers reused) or default",
    )
    args = parser.parse_args()
    configure_agent_logging()
    service.run(args.socket, args.run_dir, loop=args.loop, malloc=args.malloc)


if __name__ == "__main__":
    main()
