"""Admin operations on nodes: pause, drain, resume (with failback)."""

import time
from typing import Any

from vmcluster.clusterstate.keys import dumps
from vmcluster.service.context import NodeContext

FAILBACK_WINDOW_S = 60.0  # 'node resume --failback': how long VMs may move back to the node


async def set_paused(
    ctx: NodeContext, node: str, paused: bool, *, drain: bool = False, failback: bool = False
) -> None:
    """Pause (optionally draining: its VMs move away) or resume (optionally failing back the
    VMs that prefer it, for FAILBACK_WINDOW_S) a node."""
    admin: dict[str, Any] = {"paused": paused, "draining": paused and drain}
    if failback and not paused:
        admin["failback_until"] = time.time() + FAILBACK_WINDOW_S
    await ctx.store.put(ctx.keys.node(node, "admin"), dumps(admin))
    kind = ("node.draining" if drain else "node.paused") if paused else "node.resumed"
    extra = ", failing back its VMs" if failback and not paused else ""
    await ctx.emit(kind, node, f"by an admin through {ctx.node}{extra}")
