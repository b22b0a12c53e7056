"""Admin operations on the cluster's HA record: arm, disarm, settings."""

import time
from collections.abc import Mapping
from typing import Any

from vmcluster.clusterstate.keys import dumps
from vmcluster.clusterstate.store import Commit, Put
from vmcluster.clusterstate.vmrecords import HA_SETTINGS, ha_settings_from_json, ha_settings_to_json
from vmcluster.errors import InvalidInput, InvalidState
from vmcluster.jsonbody import shown
from vmcluster.service.context import NodeContext


def ha_json(ctx: NodeContext) -> dict[str, Any]:
    """``GET /v1/ha``: armed, and the settings in force (defaults filled in)."""
    record = ctx.cache.json(ctx.keys.ha) or {}
    return {"armed": bool(record.get("armed", True)),
            **ha_settings_to_json(ctx.records.ha_settings())}  # fmt: skip


async def _update_ha(ctx: NodeContext, changes: Mapping[str, Any], kind: str, why: str) -> None:
    ctx.require_quorum()
    entry = ctx.cache.entries.get(ctx.keys.ha)
    record = {**(ctx.cache.json(ctx.keys.ha) or {}), **changes, "at": time.time()}
    key, value = ctx.event_record(kind, ctx.config.cluster, why)
    applied = await ctx.store.commit(Commit(
        expect={ctx.keys.ha: entry.mod_revision if entry else 0},
        puts={ctx.keys.ha: Put(value=dumps(record)), key: Put(value=value)},
    ))  # fmt: skip
    if not applied:
        raise InvalidState("the HA settings changed meanwhile; try again")


async def set_armed(ctx: NodeContext, armed: bool) -> dict[str, Any]:
    await _update_ha(ctx, {"armed": armed}, "ha.armed" if armed else "ha.disarmed",
                     f"by an admin through {ctx.config.node}")  # fmt: skip
    return {"armed": armed}


async def set_ha_settings(ctx: NodeContext, body: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - set(HA_SETTINGS))
    if unknown:
        raise InvalidInput(f"unknown HA setting {shown(unknown[0])} "
                           f"(known: {', '.join(HA_SETTINGS)})")  # fmt: skip
    current = ha_settings_to_json(ctx.records.ha_settings())
    try:
        settings = ha_settings_from_json({**current, **body})
    except ValueError as exc:
        raise InvalidInput(f"HA settings: {exc}") from None
    changed = ", ".join(f"{k}={v}" for k, v in body.items()) or "no change"
    why = f"{changed} (by an admin through {ctx.config.node})"
    await _update_ha(ctx, ha_settings_to_json(settings), "ha.settings", why)
    return ha_settings_to_json(settings)
