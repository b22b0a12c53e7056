#!/usr/bin/env bash
# The vmcluster showcase (run by `make demo`): a probe VM boots under QEMU, its durable-write
# counter rises, it powers off cleanly, and nothing is left behind.
set -euo pipefail

VM=demo-probe
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

cleanup() {
    if vmcluster vm show "$VM" >/dev/null 2>&1; then
        vmcluster vm stop "$VM" --force >/dev/null 2>&1 || true
        vmcluster vm delete "$VM" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
cleanup  # a previous demo that was interrupted

step "build the guest image (Debian cloud kernel + busybox probe; cached after the first run)"
vmcluster image build
vmcluster image list

step "create and start a VM: 128 MiB, 1 vCPU, a 256 MiB disk, a user-mode NIC"
vmcluster vm create "$VM" --memory 128 --vcpus 1 --disk 256M --nic user
vmcluster -v vm start "$VM"
pid=$(vmcluster vm show "$VM" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')

step "the guest boots (serial console)"
for _ in $(seq 1 100); do
    grep -q '^ACK ' "$(vmcluster vm show "$VM" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["console_log"])')" && break
    sleep 0.2
done
vmcluster vm console "$VM" | grep -v '^ACK ' || true

step "the probe writes a record, syncs it, then prints ACK <seq>: the counter rises"
url=$(vmcluster vm show "$VM" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["http"][0])')
for _ in 1 2 3 4 5 6; do
    last=$(vmcluster vm console "$VM" | grep '^ACK ' | tail -n 1)
    http=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())' "$url" 2>/dev/null || echo "(http not up yet)")
    printf '  console: %-10s  guest http: %s\n' "$last" "$http"
    sleep 1
done

step "vmcluster vm list"
vmcluster vm list

step "stop it gracefully (ACPI power button), then delete it"
vmcluster vm stop "$VM"
vmcluster vm delete "$VM"
vmcluster vm list

trap - EXIT
if kill -0 "$pid" 2>/dev/null; then
    echo "demo: QEMU pid $pid is still running" >&2
    exit 1
fi
step "done: no VM left, and QEMU (pid $pid) has exited"
