"""The agent config's ``[timings]``: every timing the self-fence depends on is a setting, each is
range-checked, and together they must satisfy the timing invariant (docs/operations.md): a node's
VMs are killed, by the agent or by the watchdog, before its lease can expire, and a node whose
store answers in time never fences itself. A config that breaks it is refused in one line."""

import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import vmcluster.agent.config as config_module
from vmcluster.agent.config import AgentConfig, TimingBound, Timings, load_config, timing_bounds
from vmcluster.errors import InvalidInput

BASE = """\
cluster = "prod"
node = "n1"
secrets_file = "{dir}/secrets.json"
etcd = ["http://127.0.0.1:1"]
api_socket = "{dir}/run/api.sock"
data_dir = "{dir}/data"

[networks]
cluster1 = "10.0.1.11"
"""

OPERATIONS_MD = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

AGENT_KILL = "self_fence_check_s + kill_allowance_s"
WATCHDOG_KILL = "watchdog_check_s + kill_allowance_s"
RENEWED = "keepalive_interval_s + 3 * store_timeout_s"
WATCHDOG_TOLD = "keepalive_interval_s + 3 * store_timeout_s + self_fence_check_s"


def refused(**values: object) -> str:
    with pytest.raises(InvalidInput) as info:
        Timings(**values)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, message
    return message


def bounds_of(**overrides: float) -> tuple[TimingBound, ...]:
    """``timing_bounds`` called directly, on the default values with ``overrides``."""
    values: dict[str, float] = {
        "lease_ttl_s": 5, "keepalive_interval_s": 1.25, "store_timeout_s": 0.5,
        "self_fence_margin_s": 0.5, "self_fence_check_s": 0.05, "watchdog_check_s": 0.05,
        "kill_allowance_s": 0.1,
    }  # fmt: skip
    values.update(overrides)
    return timing_bounds(**values)


def toml(tmp_path: Path, timings: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(dir=tmp_path) + "\n[timings]\n" + timings)
    return path


# ----- the defaults -----


def test_the_defaults_are_todays_values() -> None:
    t = Timings()
    assert t.heartbeat_interval_s == 0.2
    assert t.heartbeat_threshold == 5
    assert t.cross_site_threshold == 20
    assert t.lease_ttl_s == 5
    assert t.keepalive_interval_s == 1.25  # lease_ttl_s / 4 (agent.py's _keep_lease)
    assert t.store_timeout_s == 0.5  # cli/agent.py STORE_TIMEOUT_S
    assert t.self_fence_margin_s == 0.5
    assert t.self_fence_check_s == 0.05  # vms.py SELF_FENCE_CHECK_S
    assert t.watchdog_check_s == 0.05  # watchdog.py CHECK_S
    assert t.kill_allowance_s == 0.1
    assert t.resiliency_period_s == 0
    assert t.restart_grace_s == 30


def test_the_defaults_satisfy_the_invariant_with_room() -> None:
    sides = [(b.left, round(b.left_s, 9), b.right, b.right_s) for b in Timings().bounds()]
    assert sides == [
        (AGENT_KILL, 0.15, "self_fence_margin_s", 0.5),
        (WATCHDOG_KILL, 0.15, "self_fence_margin_s / 2", 0.25),
        (RENEWED, 2.75, "lease_ttl_s - self_fence_margin_s", 4.5),
        (WATCHDOG_TOLD, 2.8, "lease_ttl_s - self_fence_margin_s / 2", 4.75),
    ]
    assert all(b.holds for b in Timings().bounds())


def test_the_keepalive_follows_the_lease_unless_set() -> None:
    assert Timings(lease_ttl_s=8).keepalive_interval_s == 2.0
    assert Timings(lease_ttl_s=8, keepalive_interval_s=0).keepalive_interval_s == 2.0
    assert Timings(lease_ttl_s=8, keepalive_interval_s=0.5).keepalive_interval_s == 0.5
    assert Timings(lease_ttl_s=8) == Timings(lease_ttl_s=8, keepalive_interval_s=2.0)


def test_an_absent_section_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(dir=tmp_path))
    assert load_config(path).timings == Timings()


def test_the_lab_configuration_is_valid(tmp_path: Path) -> None:
    # The lab (lab.py _agent_tracked) writes AgentConfig(...).to_toml() with default timings.
    written = AgentConfig(cluster="lab", node="n1", networks={"cluster1": "10.0.1.11"},
                          etcd=("http://127.0.0.1:2379",), secrets_file="/unused",
                          api_socket="/unused/api.sock")  # fmt: skip
    path = tmp_path / "agent.toml"
    path.write_text(written.to_toml())
    loaded = load_config(path)
    assert loaded == written
    assert all(b.holds for b in loaded.timings.bounds())


def test_the_documented_example_is_valid() -> None:
    doc = config_module.__doc__
    assert doc is not None
    example = doc.split("\n\nTimings are validated")[0].split("\n\n", 1)[1]
    timings = tomllib.loads(example)["timings"]
    assert Timings(**timings) == Timings()


def test_round_trip_of_every_timing(tmp_path: Path) -> None:
    timings = Timings(heartbeat_interval_s=0.1, lease_ttl_s=10, keepalive_interval_s=1.5,
                      store_timeout_s=0.25, self_fence_margin_s=1.0, self_fence_check_s=0.02,
                      watchdog_check_s=0.03, kill_allowance_s=0.2,
                      resiliency_period_s=30.0)  # fmt: skip
    original = AgentConfig(cluster="prod", node="n1", networks={"cluster1": "10.0.1.11"},
                           etcd=("http://10.0.1.11:2379",), secrets_file="/s",
                           api_socket="/a.sock", timings=timings)  # fmt: skip
    path = tmp_path / "agent.toml"
    path.write_text(original.to_toml())
    assert load_config(path).timings == timings


# ----- each relation, refused with its message -----


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"self_fence_margin_s": 0.3, "self_fence_check_s": 0.25},
            f"timings: {AGENT_KILL} (0.35 s) must be below self_fence_margin_s (0.3 s), "
            "or the agent may kill the VMs after the lease can expire",
        ),
        (
            {"self_fence_margin_s": 0.5, "watchdog_check_s": 0.2},
            f"timings: {WATCHDOG_KILL} (0.3 s) must be below self_fence_margin_s / 2 (0.25 s), "
            "or the watchdog may kill the VMs after the lease can expire",
        ),
        (
            {"lease_ttl_s": 2},
            f"timings: {RENEWED} (2 s) must be below lease_ttl_s - self_fence_margin_s (1.5 s), "
            "or a node whose store answers in time may fence itself",
        ),
        (
            {"self_fence_margin_s": 1.0, "self_fence_check_s": 0.75, "keepalive_interval_s": 2.25},
            f"timings: {WATCHDOG_TOLD} (4.5 s) must be below lease_ttl_s - self_fence_margin_s / 2"
            " (4.5 s), or the watchdog may kill the VMs of a node that renews in time",
        ),
    ],
    ids=["agent-kill", "watchdog-kill", "renewal", "watchdog-told"],
)
def test_a_broken_relation_is_refused(values: dict[str, float], message: str) -> None:
    assert refused(**values) == message


def test_the_brief_lease_of_the_design_needs_a_shorter_store_timeout() -> None:
    # DESIGN's 2 s lease: with 0.5 s requests a node may fence itself right after a grant
    # (grant, commit, 0.5 s wait, keepalive: 2 s > 1.5 s); with 0.25 s requests it may not.
    assert "lease_ttl_s - self_fence_margin_s (1.5 s)" in refused(lease_ttl_s=2)
    assert Timings(lease_ttl_s=2, store_timeout_s=0.25).keepalive_interval_s == 0.5


@pytest.mark.parametrize(("ttl", "margin"), [(3, 0.35), (3, 0.7), (10, 5.9), (60, 43.0)])
def test_margins_that_keep_the_invariant(ttl: int, margin: float) -> None:
    assert Timings(lease_ttl_s=ttl, self_fence_margin_s=margin).self_fence_margin_s == margin


@pytest.mark.parametrize(("ttl", "margin"), [(2, 0.05), (2, 1.49), (10, 7.4), (5, 0.3)])
def test_margins_in_range_that_break_the_invariant(ttl: int, margin: float) -> None:
    message = refused(lease_ttl_s=ttl, self_fence_margin_s=margin)
    assert message.startswith("timings: ")
    assert "must be below" in message


def test_the_relations_are_checked_on_the_raw_values() -> None:
    # timing_bounds is pure: the simulator (or a test) may ask it about any values.
    broken = [b.left for b in bounds_of(kill_allowance_s=0.5) if not b.holds]
    assert broken == [AGENT_KILL, WATCHDOG_KILL]
    broken = [b.left for b in bounds_of(store_timeout_s=1.5) if not b.holds]
    assert broken == [RENEWED, WATCHDOG_TOLD]
    assert all(b.holds for b in bounds_of())


# ----- boundaries: "below" is strict (values exact in binary) -----


@dataclass(frozen=True)
class Edge:
    relation: str
    at: dict[str, float]  # the two sides equal
    under: dict[str, float]  # the left side just below


EDGES = [
    Edge(AGENT_KILL, {"self_fence_check_s": 0.4375, "kill_allowance_s": 0.0625},
         {"self_fence_check_s": 0.4375 - 2**-20, "kill_allowance_s": 0.0625}),
    Edge(WATCHDOG_KILL, {"watchdog_check_s": 0.1875, "kill_allowance_s": 0.0625},
         {"watchdog_check_s": 0.1875 - 2**-20, "kill_allowance_s": 0.0625}),
    Edge(RENEWED, {"keepalive_interval_s": 3.0}, {"keepalive_interval_s": 3.0 - 2**-20}),
    Edge(WATCHDOG_TOLD,
         {"self_fence_margin_s": 1.0, "self_fence_check_s": 0.75, "kill_allowance_s": 0.125,
          "keepalive_interval_s": 2.25},
         {"self_fence_margin_s": 1.0, "self_fence_check_s": 0.75, "kill_allowance_s": 0.125,
          "keepalive_interval_s": 2.25 - 2**-20}),
]  # fmt: skip


@pytest.mark.parametrize("edge", EDGES, ids=lambda e: e.relation)
def test_equal_sides_are_refused_and_just_below_is_accepted(edge: Edge) -> None:
    assert refused(**edge.at).startswith(f"timings: {edge.relation} (")
    Timings(**edge.under)  # type: ignore[arg-type]


# ----- each setting's own range -----


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("keepalive_interval_s", 0.005,
         "timings.keepalive_interval_s must be 0.01 to 60 seconds (or 0: lease_ttl_s / 4)"),
        ("keepalive_interval_s", -1, None),
        ("keepalive_interval_s", 61, None),
        ("keepalive_interval_s", True, None),
        ("store_timeout_s", 0.0, "timings.store_timeout_s must be 0.01 to 60 seconds"),
        ("store_timeout_s", 61.0, None),
        ("store_timeout_s", "fast", None),
        ("self_fence_check_s", 0.001, "timings.self_fence_check_s must be 0.005 to 1 seconds"),
        ("self_fence_check_s", 1.5, None),
        ("watchdog_check_s", 0.0, "timings.watchdog_check_s must be 0.005 to 1 seconds"),
        ("watchdog_check_s", 2, None),
        ("kill_allowance_s", 0.0, "timings.kill_allowance_s must be 0.01 to 10 seconds"),
        ("kill_allowance_s", 11, None),
        ("kill_allowance_s", float("nan"), None),
        ("self_fence_margin_s", True,
         "timings.self_fence_margin_s must be 0.05 s to 3/4 of the lease TTL"),
        ("resiliency_period_s", -1.0, "timings.resiliency_period_s must be 0 to 3600 seconds"),
        ("heartbeat_interval_s", 0.001, "timings.heartbeat_interval_s must be 0.01 to 10 seconds"),
    ],
)  # fmt: skip
def test_a_value_out_of_its_range(name: str, bad: object, message: str | None) -> None:
    got = refused(**{name: bad})
    if message is None:
        assert got.startswith(f"timings.{name} must be ")
    else:
        assert got == message


def test_the_ranges_come_before_the_relations() -> None:
    # A margin out of its range is named as such, not through the relation it also breaks.
    assert refused(lease_ttl_s=2, self_fence_margin_s=0.01) == (
        "timings.self_fence_margin_s must be 0.05 s to 3/4 of the lease TTL"
    )


# ----- a config file with bad timings -----


def test_load_config_refuses_bad_timings_in_one_line(tmp_path: Path) -> None:
    path = toml(tmp_path, "lease_ttl_s = 5\nself_fence_margin_s = 0.2\n")
    with pytest.raises(InvalidInput) as info:
        load_config(path)
    assert str(info.value) == (
        f"timings: {WATCHDOG_KILL} (0.15 s) must be below self_fence_margin_s / 2 (0.1 s), "
        "or the watchdog may kill the VMs after the lease can expire"
    )


def test_the_agent_refuses_bad_timings_and_creates_nothing(tmp_path: Path) -> None:
    path = toml(tmp_path, "store_timeout_s = 1.5\n")
    before = sorted(tmp_path.rglob("*"))
    done = subprocess.run([sys.executable, "-m", "vmcluster", "agent", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == InvalidInput.exit_code
    assert done.stdout == ""
    assert done.stderr == (
        f"error: timings: {RENEWED} (5.75 s) must be below lease_ttl_s - self_fence_margin_s "
        "(4.5 s), or a node whose store answers in time may fence itself\n"
    )
    assert sorted(tmp_path.rglob("*")) == before  # no data_dir, run dir, socket or secrets


def test_the_documented_error_is_the_real_one(tmp_path: Path) -> None:
    doc = OPERATIONS_MD.read_text()
    example = doc.split("```toml\n[timings]\n", 1)[1].split("```", 1)[0]
    expected = doc.split("is refused with\n\n```\n", 1)[1].split("\n```", 1)[0]
    with pytest.raises(InvalidInput) as info:
        load_config(toml(tmp_path, example))
    assert f"error: {info.value}" == expected


# ----- property: accepted exactly when an independent worst case is safe -----


def worst_case_safe(t: dict[str, float], slack: float) -> bool:
    """Walk one node's timeline in absolute time, taking every delay at its worst: each store
    request in flight for the whole store timeout, each poll just missing the instant it looks
    for. True when nothing happens late, by ``slack`` seconds (> 0: stricter, < 0: laxer)."""
    ttl, margin, timeout = t["lease_ttl_s"], t["self_fence_margin_s"], t["store_timeout_s"]
    keepalive = t["keepalive_interval_s"] or ttl / 4

    def before(when: float, limit: float) -> bool:
        return when + slack < limit

    # The lease: granted by a request sent at 0, then renewed round after round.
    now = 0.0
    sent = now
    now += timeout  # the grant
    now += timeout  # the commit of the alive key under it
    valid_until = sent + ttl
    for _ in range(3):
        now += keepalive  # the wait before each keepalive
        sent = now
        now += timeout  # the keepalive in flight
        agent_fences_at = valid_until - margin
        watchdog_fires_at = valid_until - margin / 2
        if not before(now, agent_fences_at):
            return False  # the agent would have fenced a healthy node
        if not before(now + t["self_fence_check_s"], watchdog_fires_at):
            return False  # the watchdog would have been told too late
        valid_until = sent + ttl

    # Renewals stop. etcd received the last one at or after `sent`: it expires no earlier than
    # valid_until. The agent's look just missed its fence point; so did the watchdog's.
    lease_expires_at = valid_until
    agent_done = (valid_until - margin) + t["self_fence_check_s"] + t["kill_allowance_s"]
    watchdog_done = (valid_until - margin / 2) + t["watchdog_check_s"] + t["kill_allowance_s"]
    return before(agent_done, lease_expires_at) and before(watchdog_done, lease_expires_at)


@st.composite
def timing_values(draw: st.DrawFn) -> dict[str, float]:
    """Values inside every individual range, so that only the invariant can refuse them; some
    drawn near the edges of the relations, where a wrong term would show."""
    ttl = draw(st.integers(1, 60))
    margin = draw(st.floats(0.05, ttl * 0.75, exclude_max=True))
    timeout = draw(st.floats(0.01, max(0.02, ttl / 3)) | st.floats(0.01, 0.5))
    check = draw(st.floats(0.005, 1) | st.floats(0.005, min(1.0, margin)))
    near = st.floats(-0.5, 0.5)
    keepalive = draw(
        st.just(0.0)
        | st.floats(0.01, min(60, ttl))
        | near.map(lambda d: ttl - margin - 3 * timeout + d)  # relation 3
        | near.map(lambda d: ttl - margin / 2 - 3 * timeout - check + d)  # relation 4
    )
    return {
        "lease_ttl_s": ttl,
        "keepalive_interval_s": keepalive if keepalive == 0 else min(60, max(0.01, keepalive)),
        "store_timeout_s": timeout,
        "self_fence_margin_s": margin,
        "self_fence_check_s": check,
        "watchdog_check_s": draw(st.floats(0.005, 1) | st.floats(0.005, min(1.0, margin))),
        "kill_allowance_s": draw(
            st.floats(0.01, min(10, ttl / 2)) | st.floats(0.01, min(10, margin))
        ),
    }


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(timing_values())
@example(  # only relation 4 fails
    {
        "lease_ttl_s": 5,
        "keepalive_interval_s": 2.4,
        "store_timeout_s": 0.5,
        "self_fence_margin_s": 1.0,
        "self_fence_check_s": 0.75,
        "watchdog_check_s": 0.05,
        "kill_allowance_s": 0.125,
    }
)
def test_accepted_exactly_when_the_worst_case_is_safe(values: dict[str, float]) -> None:
    refusal: str | None = None
    try:
        timings = Timings(**values)  # type: ignore[arg-type]
    except InvalidInput as exc:
        refusal = str(exc)
    if refusal is not None:
        event("refused")
        assert refusal.startswith("timings: ")  # by a relation: every range is respected
        assert not worst_case_safe(values, slack=1e-9)
    else:
        event("accepted")
        assert worst_case_safe(values, slack=-1e-9)
        assert all(b.holds for b in timings.bounds())


@pytest.mark.parametrize("grace", [-1, 1, 601, 2.5, True, "30"])
def test_a_restart_grace_outside_its_range_is_refused_with_its_name(grace: object) -> None:
    with pytest.raises(InvalidInput, match=r"timings\.restart_grace_s"):
        Timings(restart_grace_s=grace)  # type: ignore[arg-type]


@pytest.mark.parametrize("grace", [0, 2, 600])
def test_a_restart_grace_of_0_or_2_to_600_is_accepted(grace: int) -> None:
    assert Timings(restart_grace_s=grace).restart_grace_s == grace
