"""bench/controlplane.py at a tiny scale: it runs, its checks hold, and it prints one JSON
object shaped like the other benchmarks' (the figures themselves belong to the bench)."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "controlplane.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_controlplane", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_prints_one_json_object_with_figure_reference_and_ratio(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    argv = ["controlplane.py", "--nodes", "4", "--vms", "40", "--failover-vms", "8",
            "--runs", "2", "--shell-runs", "1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "controlplane"
    assert {"unit", "goals", "met", "figure", "reference", "ratio", "environment"} <= set(out)
    figure = out["figure"]
    assert (figure["nodes"], figure["vms"], figure["failover_vms"]) == (4, 40, 8)
    assert (out["reference"]["nodes"], out["reference"]["vms"]) == (3, 30)
    for what in ("cycle", "failover_down", "failover_isolated"):
        assert len(figure[what]["total_ms"]["values"]) == 2
    assert figure["store"]["vms"] == 8
    assert figure["store"]["calls"]["commit"] == 8  # one compare-and-swap per VM at least
    assert figure["store"]["fence_calls_per_vm"] == figure["store"]["disks_per_vm"]
    assert isinstance(out["met"]["cycle_ms"], bool)
    assert figure["profile"]["cycle"]["top_by_own_time"]
    assert out["ratio"]["scale"]["vms"] == round(40 / 30, 2)


def test_the_failover_check_passes_on_the_failover_and_fails_loudly_otherwise() -> None:
    bench = _bench()
    cluster = bench.Cluster(bench.Shape(nodes=3, vms=6, failover_vms=2))
    down = cluster.facts(down=cluster.victim)
    failover = bench.decide(cluster.snapshot(down, down=cluster.victim), bench.NOW)
    bench.check_failover(failover, cluster, "down")
    steady = bench.decide(cluster.snapshot(cluster.facts()), bench.NOW)
    assert steady.actions == ()
    with pytest.raises(SystemExit, match="expected 2 failover actions off n3, got 0"):
        bench.check_failover(steady, cluster, "steady")
