"""The golden scenarios (scenarios/*/): each gives exactly its expected log, as ``vmcluster sim
scenario`` runs it; and the cmds format refuses bad input with the file and line."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support import run_cli
from vmcluster.errors import InvalidInput, NotFound
from vmcluster.sim.faults import Injector
from vmcluster.sim.model import Lun
from vmcluster.sim.runner import simulate
from vmcluster.sim.scenario import compare, parse
from vmcluster.sim.world import SimWorld

pytestmark = pytest.mark.timeout(300)

SCENARIOS = sorted((Path(__file__).parents[2] / "scenarios").glob("*/cmds"))


def test_there_is_a_scenario_for_each_failure_kind_and_policy() -> None:
    names = {path.parent.name for path in SCENARIOS}
    assert {"two-nodes-witness", "double-crash", "hung-agent", "leader-partitioned",
            "quarantine", "failback-window", "failover-threshold", "drain", "anti-affinity",
            "qemu-crash", "storage-cut", "volume-coordinator-crash"} <= names  # fmt: skip


@pytest.mark.parametrize("cmds", SCENARIOS, ids=[p.parent.name for p in SCENARIOS])
def test_a_scenario_gives_its_expected_log(cmds: Path) -> None:
    passed, lines = compare(cmds.parent, update=False)
    assert passed, "\n".join(lines[:80])


def test_a_changed_log_fails_with_the_difference_and_update_rewrites_it(tmp_path: Path) -> None:
    directory = tmp_path / "qemu-crash"
    shutil.copytree(Path(__file__).parents[2] / "scenarios" / "qemu-crash", directory)
    expected = directory / "expected"
    good = expected.read_text()
    expected.write_text(good.replace("restart a on", "restart a somewhere on"))
    failed = run_cli("sim", "scenario", str(directory))
    assert failed.code == 1, failed.err
    assert "the log differs from expected" in failed.out
    assert "restart a somewhere on" in failed.out
    updated = run_cli("sim", "scenario", str(directory), "--update")
    assert updated.code == 0, updated.err
    assert expected.read_text() == good
    assert run_cli("sim", "scenario", str(directory)).code == 0


@pytest.mark.parametrize(
    ("cmds", "problem"),
    [("options nodes=three", "cmds:1: option nodes='three' is not a int"),
     ("options colour=red", "cmds:1: unknown option 'colour'"),
     ("\nfly away", "cmds:2: unknown command 'fly'"),
     ("at soon crash n1", "cmds:1: 'at' needs a time in seconds"),
     ("at 10 explode n1", "cmds:1: unknown step 'explode'"),
     ("at 10 hang n1", "cmds:1: hang takes 2 arguments"),
     ("create web {not json}", "cmds:1: '{not json}' is not JSON"),
     ("create web [1]", "cmds:1: create web: the body must be a JSON object"),
     ("volume vol1 a1", "cmds:1: volume takes NAME ARRAY SIZE"),
     ("disk d1 64M", "cmds:1: disk takes VOLUME/DISK SIZE"),
     ("at 10 disk-create vol1/d1", "cmds:1: disk-create takes 2 arguments")],
)  # fmt: skip
def test_bad_cmds_name_the_file_and_line(tmp_path: Path, cmds: str, problem: str) -> None:
    (tmp_path / "cmds").write_text(cmds + "\n")
    with pytest.raises(InvalidInput, match=problem.replace("(", r"\(").replace("[", r"\[")):
        parse(tmp_path)


def test_a_directory_without_cmds_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no cmds file"):
        parse(tmp_path)
    result = run_cli("sim", "scenario", str(tmp_path))
    assert result.code == 3
    assert result.err.startswith("error: scenario ")


def test_the_volume_check_finds_a_leaked_lun_and_a_lost_one() -> None:
    """The end-of-run check of shared volumes can fail: a LUN named like a volume's disk that no
    disk has (leaked), and a disk whose LUN is gone (half-made). (The scenario's setup only: a
    spare disk that no VM uses is the one whose LUN goes.)"""
    scenario = parse(Path(__file__).parents[2] / "scenarios" / "volume-coordinator-crash")

    def plant(change: str) -> list[str]:
        def plan(world: SimWorld, injector: Injector) -> None:
            def go() -> None:
                luns = world.arrays["a1"].luns
                if change == "leak":
                    luns["vol1-ghost-0123456789"] = Lun(size_bytes=1 << 20)
                else:
                    del luns[next(n for n in luns if n.startswith("vol1-spare-"))]

            world.schedule(40.0, "plant", go)

        result = simulate(scenario.seed, replace(scenario.options, failed_ok=True), plan=plan,
                          creates=scenario.creates, ha=scenario.ha, volumes=scenario.volumes,
                          disks=[*scenario.disks, ("vol1/spare", 32 << 20)])  # fmt: skip
        return [f"{v.invariant}: {v.text}" for v in result.violations]

    leaked = plant("leak")
    assert any("vol1-ghost-0123456789" in v and "leaked" in v for v in leaked), leaked
    lost = plant("lose")
    assert any(v.startswith("volumes: disk vol1/spare: its LUN") for v in lost), lost
