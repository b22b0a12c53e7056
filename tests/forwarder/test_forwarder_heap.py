"""The forwarder's heap thresholds (vmcluster.forwarder.heap), each run in a process of its own
(they are process-wide)."""

import subprocess
import sys

# What the forwarder does for each 1 MiB read: the reply comes in 256 KiB socket reads and is
# assembled by the client codec, while the last reply is still held (being written to QEMU).
_PROBE = """
import ctypes, resource, struct, sys
from vmcluster.forwarder import heap
from vmcluster.protocols.nbdclient import ClientConnection
from vmcluster.protocols.nbdserver import ServerConnection
from vmcluster.protocols.nbdwire import Cmd, ExportInfo, TransmissionFlag

if sys.argv[1] == "tuned":
    tuned = heap.keep_freed_memory()
else:  # glibc's initial thresholds, held there (by default glibc moves them as it goes)
    tuned = False
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 128 << 10) and libc.mallopt(-1, 128 << 10)
info = ExportInfo(name="d", size=1 << 30, flags=TransmissionFlag.HAS_FLAGS, max_payload=2 << 20)
client, server = ClientConnection("d"), ServerConnection(lambda name: info)
while not client.ready:
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
payload, held = bytes(1 << 20), None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for cookie in range(1, 101):
    client.request(Cmd.READ, 0, 1 << 20, cookie=cookie)
    client.data_to_send()
    header = struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, cookie, (1 << 20) + 8, 0)
    wire = header + payload
    for start in range(0, len(wire), 256 << 10):
        events = client.receive_data(wire[start : start + (256 << 10)])
        held = events or held
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(tuned, faults // 100)
"""


def _faults_per_read(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    tuned, faults = out.split()
    return tuned, int(faults)


def test_tuned_thresholds_let_freed_buffers_be_reused_without_page_faults() -> None:
    tuned, with_tuning = _faults_per_read("tuned")
    assert tuned == "True"
    # Tuned, the heap keeps freed memory and the next buffers reuse it: a 1 MiB buffer is 256
    # pages, and hardly any of them faults.
    assert with_tuning < 32
    # With glibc's initial thresholds each buffer over 128 KiB is fresh mapped memory, and
    # nearly every page of it faults (by default glibc raises them as it goes, by a history
    # of its own: somewhere between the two).
    untouched, without = _faults_per_read("small")
    assert untouched == "False"
    assert without > 128
