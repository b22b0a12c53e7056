"""Structured logs: stable event names with key=value context.

    vm.started vm=web1 pid=1234 accel=tcg

Event names are part of vmcluster's interface (users grep for them); keep them stable.
"""

import logging
import sys


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def _value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def event(name: str, **context: object) -> str:
    """Format an event line: the name, then key=value pairs in the order given."""
    parts = [name, *(f"{key}={_value(value)}" for key, value in context.items())]
    return " ".join(parts)


def configure(verbosity: int) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("vmcluster")
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbosity >= 3:
        logging.getLogger("qemu.qmp").setLevel(logging.DEBUG)
        logging.getLogger("qemu.qmp").addHandler(handler)


def configure_agent_logging() -> None:
    """The agent logs every event at info level to stderr (journald or the lab's log file)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("vmcluster")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
