"""Unit tests for vmcluster.core.quarantine: which nodes are kept out, and until when.

Pure: exit times and ``now`` are explicit wall-clock seconds. With the defaults, 3 unclean exits
within 1 h quarantine a node for 2 h after the last of them, at most 25 % of the nodes at once.
"""

from math import floor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcluster.core.cluster import NodeState
from vmcluster.core.quarantine import (
    QuarantineSettings,
    effective_state,
    quarantined,
    record_exit,
)
from vmcluster.errors import InvalidInput

T = 1_000_000.0  # the first exit in most tests
MINUTE = 60.0
HOUR = 3600.0
THREE = ("n1", "n2", "n3")
EIGHT = tuple(f"n{i}" for i in range(1, 9))


def failing(at: float = T, count: int = 3, every: float = 10 * MINUTE) -> tuple[float, ...]:
    """``count`` unclean exits ``every`` apart from ``at``."""
    return tuple(at + i * every for i in range(count))


# --- threshold and window ---------------------------------------------------------------------


def test_three_exits_within_an_hour_quarantine_a_node_for_two_hours_after_the_last() -> None:
    exits = failing()  # T, T+10 min, T+20 min
    last = exits[-1]
    assert quarantined({"n1": exits}, last, THREE) == {"n1": last + 2 * HOUR}
    assert QuarantineSettings() == QuarantineSettings(
        threshold=3, window_s=3600, duration_s=7200, max_fraction=0.25
    )


def test_two_exits_are_not_enough() -> None:
    assert quarantined({"n1": failing(count=2)}, T + HOUR, THREE) == {}


def test_three_exits_spread_over_more_than_the_window_are_not_enough() -> None:
    spread = failing(count=3, every=31 * MINUTE)  # the first is 62 min before the last
    assert quarantined({"n1": spread}, spread[-1], THREE) == {}


def test_the_window_is_strict() -> None:
    edge = (T, T + 30 * MINUTE, T + HOUR)  # the first is exactly 1 h before the last
    assert quarantined({"n1": edge}, T + HOUR, THREE) == {}
    inside = (T + 1, T + 30 * MINUTE, T + HOUR)
    assert quarantined({"n1": inside}, T + HOUR, THREE) == {"n1": T + 3 * HOUR}


def test_old_exits_do_not_count_towards_a_new_quarantine() -> None:
    exits = (T - 5 * HOUR, T - 4 * HOUR, T, T + MINUTE)
    assert quarantined({"n1": exits}, T + MINUTE, THREE) == {}


def test_the_exits_may_be_in_any_order() -> None:
    exits = (T + 20 * MINUTE, T, T + 10 * MINUTE)
    assert quarantined({"n1": exits}, T + 20 * MINUTE, THREE) == {"n1": T + 20 * MINUTE + 2 * HOUR}


# --- expiry -----------------------------------------------------------------------------------


def test_a_quarantine_ends_duration_after_the_last_exit() -> None:
    exits = failing()
    end = exits[-1] + 2 * HOUR
    assert quarantined({"n1": exits}, end - 1, THREE) == {"n1": end}
    assert quarantined({"n1": exits}, end, THREE) == {}
    assert quarantined({"n1": exits}, end + HOUR, THREE) == {}


def test_another_exit_during_the_quarantine_extends_it() -> None:
    exits = failing(count=4)  # the fourth (T + 30 min) still has 3 exits within 1 h before it
    assert quarantined({"n1": exits}, T + HOUR, THREE) == {"n1": T + 30 * MINUTE + 2 * HOUR}


def test_a_lone_exit_during_the_quarantine_does_not_lift_it() -> None:
    # Quarantined until T + 20 min + 2 h; a later exit that is not a third within 1 h (the node
    # failed again while kept out) neither lifts nor extends it.
    exits = (*failing(), T + 90 * MINUTE)
    end = T + 20 * MINUTE + 2 * HOUR
    assert quarantined({"n1": exits}, T + 100 * MINUTE, THREE) == {"n1": end}
    assert quarantined({"n1": exits}, end, THREE) == {}


def test_a_node_can_be_quarantined_again_later() -> None:
    again = failing(T + 10 * HOUR)
    exits = (*failing(), *again)
    assert quarantined({"n1": exits}, T + 5 * HOUR, THREE) == {}
    assert quarantined({"n1": exits}, again[-1], THREE) == {"n1": again[-1] + 2 * HOUR}


def test_exits_after_now_do_not_count_yet() -> None:
    exits = failing()
    assert quarantined({"n1": exits}, exits[-1] - 1, THREE) == {}
    assert quarantined({"n1": exits}, exits[-1], THREE) == {"n1": exits[-1] + 2 * HOUR}


def test_custom_settings() -> None:
    custom = QuarantineSettings(threshold=2, window_s=10 * MINUTE, duration_s=HOUR)
    exits = (T, T + 5 * MINUTE)
    assert quarantined({"n1": exits}, T + 5 * MINUTE, THREE, custom) == {
        "n1": T + 5 * MINUTE + HOUR
    }
    assert quarantined({"n1": (T, T + 11 * MINUTE)}, T + 11 * MINUTE, THREE, custom) == {}


def test_a_duration_of_zero_quarantines_nothing() -> None:
    none = QuarantineSettings(duration_s=0)
    exits = failing()
    assert quarantined({"n1": exits}, exits[-1], THREE, none) == {}


# --- at most a fraction of the nodes ----------------------------------------------------------


@pytest.mark.parametrize(("nodes", "cap"), [(1, 1), (3, 1), (4, 1), (7, 1), (8, 2), (12, 3)])
def test_at_most_a_quarter_of_the_nodes_and_at_least_one(nodes: int, cap: int) -> None:
    assert QuarantineSettings().cap(nodes) == cap
    names = [f"n{i}" for i in range(nodes)]
    exits = {name: failing(T + i) for i, name in enumerate(names)}
    now = T + HOUR
    result = quarantined(exits, now, names)
    assert list(result) == names[:cap]  # the earliest quarantines win


def test_with_three_nodes_the_earliest_quarantine_wins() -> None:
    exits = {"n3": failing(T), "n1": failing(T + MINUTE), "n2": failing(T + 2 * MINUTE)}
    assert quarantined(exits, T + HOUR, THREE) == {"n3": T + 20 * MINUTE + 2 * HOUR}


def test_with_eight_nodes_two_are_quarantined() -> None:
    exits = {name: failing(T + (8 - i) * MINUTE) for i, name in enumerate(EIGHT)}
    result = quarantined(exits, T + HOUR, EIGHT)
    assert set(result) == {"n8", "n7"}  # the two that started earliest


def test_ties_go_by_name() -> None:
    exits = {"n2": failing(), "n3": failing(), "n1": failing()}
    assert list(quarantined(exits, T + HOUR, THREE)) == ["n1"]
    eight = {name: failing() for name in reversed(EIGHT)}
    assert list(quarantined(eight, T + HOUR, EIGHT)) == ["n1", "n2"]


def test_a_quarantine_in_force_keeps_its_place_when_it_is_extended() -> None:
    # n1 has been out since T + 20 min and fails again at T + 90 min (extending it); n2's
    # quarantine started at T + 40 min. n1 keeps its place: its quarantine started first.
    n1 = (*failing(), *failing(T + 70 * MINUTE))
    n2 = failing(T + 20 * MINUTE)
    result = quarantined({"n1": n1, "n2": n2}, T + 100 * MINUTE, THREE)
    assert result == {"n1": T + 90 * MINUTE + 2 * HOUR}


def test_when_a_quarantine_ends_the_next_node_in_line_is_quarantined() -> None:
    exits = {"n1": failing(T), "n2": failing(T + 30 * MINUTE)}
    n1_end = T + 20 * MINUTE + 2 * HOUR
    assert quarantined(exits, n1_end - 1, THREE) == {"n1": n1_end}
    assert quarantined(exits, n1_end, THREE) == {"n2": T + 50 * MINUTE + 2 * HOUR}


def test_only_members_count() -> None:
    exits = {"gone": failing(T - MINUTE), "n2": failing()}
    assert quarantined(exits, T + HOUR, THREE) == {"n2": T + 20 * MINUTE + 2 * HOUR}
    assert quarantined(exits, T + HOUR, ()) == {}


def test_a_fraction_of_one_allows_every_node() -> None:
    everyone = QuarantineSettings(max_fraction=1)
    exits = {name: failing() for name in THREE}
    assert set(quarantined(exits, T + HOUR, THREE, everyone)) == set(THREE)


# --- recording exits --------------------------------------------------------------------------


def test_record_exit_adds_sorts_and_prunes() -> None:
    assert record_exit((), T, HOUR) == (T,)
    assert record_exit((T + 5, T), T + 2, HOUR) == (T, T + 2, T + 5)
    assert record_exit((T - 2 * HOUR, T - HOUR, T - 1), T, HOUR) == (T - 1, T)


def test_recorded_exits_quarantine_a_node() -> None:
    keep = HOUR + 2 * HOUR
    exits: tuple[float, ...] = ()
    for at in failing():
        exits = record_exit(exits, at, keep)
    assert quarantined({"n1": exits}, exits[-1], THREE) == {"n1": exits[-1] + 2 * HOUR}


# --- states and settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        (NodeState.UP, NodeState.QUARANTINED),
        (NodeState.PAUSED, NodeState.QUARANTINED),
        (NodeState.JOINING, NodeState.QUARANTINED),
        (NodeState.QUARANTINED, NodeState.QUARANTINED),
        (NodeState.DOWN, NodeState.DOWN),
        (NodeState.ISOLATED, NodeState.ISOLATED),
        (NodeState.NO_QUORUM, NodeState.NO_QUORUM),
    ],
)
def test_a_quarantined_node_shows_as_quarantined_only_while_it_is_alive(
    state: NodeState, shown: NodeState
) -> None:
    assert effective_state(state, True) is shown
    if state is not NodeState.QUARANTINED:
        assert effective_state(state, False) is state


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"threshold": 0}, "invalid quarantine threshold 0"),
        ({"threshold": True}, "invalid quarantine threshold True"),
        ({"window_s": 0}, "invalid quarantine window 0 s"),
        ({"duration_s": -1}, "invalid quarantine duration -1 s"),
        ({"max_fraction": 1.5}, "invalid quarantine fraction 1.5"),
        ({"max_fraction": float("nan")}, "invalid quarantine fraction nan"),
    ],
)
def test_settings_are_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        QuarantineSettings(**fields)
    assert "\n" not in str(caught.value)


# --- properties -------------------------------------------------------------------------------

NAMES = tuple(f"n{i}" for i in range(1, 10))
OFFSETS = st.sampled_from((0.0, 1.0, 10 * MINUTE, 30 * MINUTE, HOUR, 2 * HOUR, 3 * HOUR))


@settings(max_examples=300)
@given(
    size=st.integers(1, len(NAMES)),
    exits=st.dictionaries(st.sampled_from(NAMES), st.lists(OFFSETS, max_size=6)),
    now=OFFSETS,
    fraction=st.sampled_from((0.0, 0.25, 0.5, 1.0)),
)
def test_quarantine_respects_the_cap_and_the_threshold(
    size: int, exits: dict[str, list[float]], now: float, fraction: float
) -> None:
    nodes = NAMES[:size]
    rules = QuarantineSettings(max_fraction=fraction)
    timed = {name: [T + t for t in offsets] for name, offsets in exits.items()}
    result = quarantined(timed, T + now, nodes, rules)
    assert len(result) <= max(1, floor(size * fraction))
    for name, end in result.items():
        assert name in nodes
        assert end > T + now
        assert end - rules.duration_s in timed[name]  # it ends 2 h after an exit of its own
        assert end - rules.duration_s <= T + now
        assert len(timed[name]) >= rules.threshold
    assert quarantined(dict(reversed(list(timed.items()))), T + now, nodes, rules) == result
