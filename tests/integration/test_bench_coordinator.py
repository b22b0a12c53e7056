"""bench/coordinator.py with one run of each kind, as root with a real lab (no VM): it runs to
the end, prints one JSON object of the bench's shape (every figure, the reference, the goals)
and leaves no namespace of its lab behind. The figures belong to the bench: no timing is
asserted here."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmcluster.lab.netns import namespaces_with_prefix

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the bench needs root (it builds a lab)"),
]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "coordinator.py"
RUN_S = 240.0


def test_the_coordinator_bench_measures_every_kind_and_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, str(BENCH), "--runs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench takes its lab down
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"bench/coordinator.py did not end within {RUN_S:g} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["benchmark"] == "coordinator"
    assert result["errors"] == []
    assert set(result["goals"]) == {"planned_served_s", "crash_served_after_detection_s"}
    figure = result["figure"]
    crash = ("detected_s", "moved_s", "served_s", "moved_after_detection_s",
             "served_after_detection_s")  # fmt: skip
    for kind, keys in (("planned", ("moved_s", "served_s")), ("crash", crash)):
        assert len(figure[kind]["per_run"]) == 1
        for key in keys:
            assert figure[kind][key]["runs"] == 1, (kind, key)
    run = figure["crash"]["per_run"][0]
    assert run["victim"] != run["to"]
    assert result["reference"]["op_s"]["runs"] == 1
    assert set(result["met"]) == {"planned", "crash"}
    assert namespaces_with_prefix("vmc-bcoord-") == []
