"""The hand-over of a dead agent's node by its watchdog (clusterstate/handover.py): the
transaction exists only while the cluster still counts the node alive on the agent's lease and
has moved none of its VMs, and it holds exactly those conditions."""

from vmcluster.clusterstate.handover import DeadAgentTerms, dead_agent_commit, restart_record
from vmcluster.clusterstate.keys import dumps, loads
from vmcluster.clusterstate.store import Entry

ALIVE = "/c/nodes/n1/alive"
PLACEMENT = "/c/vms/web/placement"
TERMS = DeadAgentTerms(node="n1", alive_key=ALIVE, lease=77, incarnation=5, grace_s=30,
                       vms=((PLACEMENT, "web", 3),))  # fmt: skip


def _entry(key: str, value: object, *, rev: int, lease: int = 0) -> Entry:
    return Entry(key=key, value=dumps(value), create_revision=1, mod_revision=rev, lease=lease)


ALIVE_ENTRY = _entry(ALIVE, {"incarnation": 5, "since": 1.0, "agent_id": "x"}, rev=10, lease=77)
PLACED = {PLACEMENT: _entry(PLACEMENT, {"owner": "n1", "generation": 3}, rev=12)}


def test_the_node_is_handed_over_on_exactly_the_conditions_it_was_seen_under() -> None:
    commit = dead_agent_commit(TERMS, ALIVE_ENTRY, PLACED, restart_lease=99, until=1000.0)
    assert not isinstance(commit, str), commit
    assert commit.expect == {ALIVE: 10, PLACEMENT: 12}
    put = commit.puts[ALIVE]
    assert put.lease == 99
    record = loads(put.value)
    assert record["restarting"] == {"lease": 99, "until": 1000.0, "by": "watchdog"}
    assert record["incarnation"] == 5
    assert record["agent_id"] == "x"  # the next run knows the node as its own


def test_no_hand_over_once_the_cluster_may_have_acted() -> None:
    moved = {PLACEMENT: _entry(PLACEMENT, {"owner": "n2", "generation": 4}, rev=13)}
    other_run = _entry(ALIVE, {"incarnation": 6}, rev=11, lease=77)
    other_lease = _entry(ALIVE, {"incarnation": 5}, rev=11, lease=78)
    handed = _entry(ALIVE, restart_record({"incarnation": 5}, lease=77, until=1.0, by="agent"),
                    rev=11, lease=77)  # fmt: skip
    cases = {
        "alive key is gone": (None, PLACED),
        "on another lease": (other_lease, PLACED),
        "another run of the agent": (other_run, PLACED),
        "handed over already": (handed, PLACED),
        "VM web was moved (generation 4 on n2)": (ALIVE_ENTRY, moved),
        "VM web has no placement": (ALIVE_ENTRY, {PLACEMENT: None}),
    }
    for reason, (alive, placements) in cases.items():
        refused = dead_agent_commit(TERMS, alive, placements, restart_lease=99, until=1.0)
        assert isinstance(refused, str), reason
        assert reason in refused, (reason, refused)


def test_terms_round_trip_through_the_state_file_and_bad_ones_are_none() -> None:
    assert DeadAgentTerms.from_json(TERMS.to_json()) == TERMS
    assert DeadAgentTerms.from_json(None) is None
    assert DeadAgentTerms.from_json({"node": "n1"}) is None
    assert DeadAgentTerms.from_json(TERMS.to_json() | {"grace_s": 0}) is None
    assert DeadAgentTerms.from_json(TERMS.to_json() | {"vms": [["k", "v"]]}) is None
