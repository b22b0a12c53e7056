"""Hundreds of random seeds on every change, as a user runs them (``vmcluster sim run``), and the
command's input and output."""

import json

import pytest

from tests.support import run_cli

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize(
    ("args", "seeds"),
    [(["--seeds", "500", "--duration", "12s"], 500),
     (["--seeds", "40", "--duration", "12s", "--nodes", "2", "--witness", "--vms", "3"], 40)],
    ids=["3-nodes", "2-nodes-and-a-witness"],
)  # fmt: skip
def test_random_seeds_break_no_invariant(args: list[str], seeds: int) -> None:
    result = run_cli("sim", "run", *args, "-o", "json", timeout=900)
    summary = json.loads(result.out)
    assert result.code == 0, (summary["failed"], result.err[-2000:])
    assert summary["seeds"] == summary["passed"] == seeds
    assert summary["failed"] == []
    assert summary["failovers"] > seeds  # the faults did move VMs
    assert all(count > 0 for count in summary["faults"].values()), summary["faults"]


def test_one_seed_replays_with_its_timeline() -> None:
    first = run_cli("sim", "run", "--seed", "7", "--duration", "10s")
    again = run_cli("sim", "run", "--seed", "7", "--duration", "10s")
    assert first.code == 0, first.err
    lines = first.out.splitlines()
    timeline = [line for line in lines if "seeds:" not in line]  # the summary has the wall time
    assert timeline == [line for line in again.out.splitlines() if "seeds:" not in line]
    assert any("leader.elected" in line for line in lines)
    assert "1 seeds: 1 passed, 0 failed" in first.out


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--nodes", "1"], "--nodes 1: use 2 to 16"),
     (["--nodes", "2"], "--nodes 2 needs --witness"),
     (["--vms", "0"], "--vms 0: use 1 to 200"),
     (["--duration", "5x"], "invalid --duration '5x'"),
     (["--duration", "1s"], "--duration 1s: use 5 s to 1 h"),
     (["--seeds", "0"], "--seeds 0: use 1 to 1000000"),
     (["--jobs", "-1"], "--jobs -1: use 0")],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli("sim", "run", *args)
    assert result.code == 2, (result.code, result.err)
    assert result.err.count("\n") == 1, result.err
    assert message in result.err
    assert result.out == ""
