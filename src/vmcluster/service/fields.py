"""Request fields checked for their JSON type and names for the object-name rule: the admin
operations' input checks, shared by every noun."""

from collections.abc import Callable, Mapping
from typing import Any

from vmcluster.core.model import NAME_RE, NAME_RULE
from vmcluster.errors import InvalidInput
from vmcluster.jsonbody import shown


def check_name(value: object, *, what: str) -> str:
    """``value`` if it is a valid name of a ``what`` (a VM, a node, ...), else InvalidInput.

    Like :func:`vmcluster.core.model.check_name`, but a long or odd value is shown cut short."""
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise InvalidInput(f"invalid {what} name {shown(value)}: {NAME_RULE}")
    return value


_KINDS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
_WANTED = {"string": "a string", "integer": "a whole number", "boolean": "true or false",
           "list": "a list", "object": "a JSON object"}  # fmt: skip
MAX_INTEGER = 2**63 - 1  # beyond any bound in a spec: refused before a message would print it


def field_of(data: Mapping[str, Any], key: str, kind: str, default: Any, *, where: str,
             prefix: str = "") -> Any:  # fmt: skip
    """``data[key]`` (``default`` when absent) if it has the JSON type ``kind`` ("string",
    "integer", "boolean", "list", "object", each optionally "... or null"), else InvalidInput
    naming the field: ``VM web: start must be true or false, not "false"``."""
    if key not in data:
        return default
    value = data[key]
    base, _, nullable = kind.partition(" or ")
    if value is None and nullable == "null":
        return value
    if not _KINDS[base](value):
        wanted = _WANTED[base] + (" or null" if nullable else "")
        raise InvalidInput(f"{where}: {prefix}{key} must be {wanted}, not {shown(value)}")
    if base == "integer" and not -MAX_INTEGER <= value <= MAX_INTEGER:
        raise InvalidInput(f"{where}: {prefix}{key} {shown(value)} is out of range")
    return value
