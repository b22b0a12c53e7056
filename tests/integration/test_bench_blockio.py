"""bench/blockio.py in its quick mode, as root with the real things (a network namespace,
qemu-storage-daemon, the forwarder, qemu-img): it runs to the end, prints one JSON object of the
benchmarks' shape (every figure, reference, ratio and goal), and leaves no namespace or link
behind. The figures belong to the bench: no timing is asserted here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the bench needs root (namespace, veths)"),
    pytest.mark.skipif(
        shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None,
        reason="the bench needs qemu-storage-daemon and qemu-img",
    ),
]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "blockio.py"
RUN_S = 240.0  # under the suite's per-test timeout, so that the bench can still clean up
LOADS = {"seq_write", "seq_read", "rand_read_d1", "rand_write_d1", "rand_read_d32",
         "rand_write_d32"}  # fmt: skip
GOALS = {f"{load}_vs_direct" for load in ("seq_write", "seq_read", "rand_read_d1",
                                          "rand_write_d1")} | {
    "rand_read_d32_vs_unix", "rand_write_d32_vs_unix", "failover_stall_ms",
    "failover_requests_lost", "forwarder_rss_mib", "mode_change_stall_ms",
    "coordinator_move_stall_ms", "redirect_requests_lost",
} | {f"redirected_{load}_vs_direct" for load in LOADS}  # fmt: skip


def _run_quick(output: Path) -> tuple[int, str, str]:
    argv = [sys.executable, str(BENCH), "--quick", "-o", str(output)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench unwinds and removes what it made
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"bench/blockio.py --quick did not end within {RUN_S:g} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _link_exists(ifname: str) -> bool:
    show = subprocess.run(["ip", "link", "show", "dev", ifname], capture_output=True, check=False)
    return show.returncode == 0


def test_quick_run_prints_every_figure_and_goal_and_leaves_nothing(tmp_path: Path) -> None:
    output = tmp_path / "blockio.json"
    code, out, err = _run_quick(output)
    assert code in (0, 1), err[-3000:]  # 1: a check failed (lost data), reported in the JSON
    assert out.strip(), f"no JSON printed:\n{err[-3000:]}"
    result = json.loads(out)
    assert json.loads(output.read_text()) == result

    assert result["benchmark"] == "blockio"
    assert {"unit", "goals", "met", "met_asyncio", "figure", "reference", "ratio",
            "environment", "checks_passed"} <= set(result)  # fmt: skip
    environment = result["environment"]
    assert isinstance(environment["cpus"], int)
    assert environment["qemu_img"].startswith("qemu-img version")
    assert environment["quick"] is True

    figure, reference = result["figure"], result["reference"]
    tables = [figure["forwarder_uvloop"], figure["forwarder_asyncio"],
              figure["forwarder_uvloop_malloc_default"], figure["forwarder_redirected"],
              reference["direct_tcp"], reference["qsd_unix"]]  # fmt: skip
    if shutil.which("socat") is not None:
        tables.append(reference["relay"])
    for table in tables:
        assert set(table) >= LOADS
        for load in LOADS:
            assert table[load]["unit"] in ("MiB/s", "IOPS")
            assert isinstance(table[load]["value"], int | float)
            assert len(table[load]["values"]) == 1  # quick: one run each
    for loop in ("uvloop", "asyncio", "uvloop_malloc_default"):
        assert set(result["ratio"][loop]) == {"vs_direct", "vs_unix"}
        for versus in result["ratio"][loop].values():
            assert set(versus) == LOADS

    assert set(result["goals"]) == GOALS
    for goal in result["goals"].values():
        assert {"threshold", "compare", "measured", "met", "what"} <= set(goal)
        assert isinstance(goal["met"], bool)
    assert set(result["met"]) == GOALS | {"all"}
    assert result["met"]["all"] == all(g["met"] for g in result["goals"].values())
    assert all(isinstance(v, bool) for v in result["met_asyncio"].values())

    stall = figure["failover_stall"]
    (cut,) = stall["per_cut"]  # quick: one cut
    assert cut["kind"] == "link"
    assert isinstance(cut["stall_ms"], int | float)
    for count in ("requests", "requests_lost", "requests_errored", "blocks_wrong"):
        assert isinstance(stall[count], int)
    assert isinstance(result["checks_passed"], bool)

    redirect = figure["redirect"]
    (cycle,) = redirect["per_cycle"]  # quick: one cycle
    for key in ("to_redirected_stall_ms", "coordinator_move_stall_ms", "to_direct_stall_ms"):
        assert isinstance(cycle[key], int | float)
    assert set(result["ratio"]["redirected"]["vs_direct"]) == LOADS

    memory = figure["memory"]
    for size in ("64k", "1024k"):
        assert memory[size]["disks"] == 2
        assert isinstance(memory[size]["peak_rss_mib"], int | float)

    assert not Path("/run/netns/vmcb-array").exists()
    assert not _link_exists("vmcb-n1")
    assert not _link_exists("vmcb-n2")
    assert not _link_exists("vmcb-n3")
