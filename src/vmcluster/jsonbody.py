"""Request bodies as JSON objects, decoded strictly and safely (the API's and the array
service's): UTF-8 text, nested no deeper than a bound (checked in one pass before decoding, so
hostile input cannot recurse), every key once, no NaN or Infinity, no number of thousands of
digits. Each problem is one InvalidInput line."""

import json
import re
from typing import Any

from vmcluster.errors import InvalidInput

_JSON_MARKS = re.compile(r'["\\\[\]{}]')


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays and objects deeper than ``limit`` (strings skipped).
    One pass over the marks, no recursion: safe on any input, valid or not."""
    depth = 0
    in_string = False
    escaped_at = -1  # the position a backslash in a string escapes
    for mark in _JSON_MARKS.finditer(text):
        at, char = mark.start(), mark.group()
        if in_string:
            if at == escaped_at:
                continue
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _no_constant(name: str) -> Any:
    raise InvalidInput(f"the request body is not JSON: {name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidInput(f"the request body gives field {shown(key)} twice")
        result[key] = value
    return result


def shown(value: object, limit: int = 40) -> str:
    """``value`` (from a request) as JSON, cut short, for a one-line error."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else f"{text[: limit - 4]}..."


def decode_object(raw: bytes, *, max_depth: int, too_deep: str | None = None) -> dict[str, Any]:
    """``raw`` as a JSON object (else InvalidInput, one line; ``too_deep``: the message for
    nesting beyond ``max_depth``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the request body is not UTF-8 text") from None
    if not text.strip():
        raise InvalidInput("the request body is empty: send a JSON object")
    if _nesting_exceeds(text, max_depth):
        raise InvalidInput(too_deep or f"the request body is nested deeper than {max_depth} levels")
    try:
        body = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc.msg} (line {exc.lineno}, "
                           f"column {exc.colno})") from None  # fmt: skip
    except ValueError:  # the one other failure: an integer of thousands of digits
        raise InvalidInput("the request body has a number with too many digits") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"the request body must be a JSON object, not {shown(body)}")
    return body
