#!/usr/bin/env bash
# The vmcluster showcase (run by `make demo`):
#   1. a probe VM boots under QEMU, its durable-write counter rises, it powers off cleanly;
#   2. a lab cluster (namespaces, etcd, NBD arrays) is built, loses a node, keeps quorum, heals.
# Nothing is left behind.
set -euo pipefail

VM=demo-probe
LAB=demo
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

cleanup() {
    vmcluster lab down --name "$LAB" >/dev/null 2>&1 || true
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

# A process that has exited but is not yet reaped by its parent (a zombie) does not count.
if [ -e "/proc/$pid" ] && ! grep -q '^State:.*zombie' "/proc/$pid/status" 2>/dev/null; then
    echo "demo: QEMU pid $pid is still running" >&2
    exit 1
fi
echo "no VM left, and QEMU (pid $pid) has exited"

etcdctl_in() {
    local host=$1; shift
    vmcluster lab exec "$host" -- etcdctl --endpoints http://127.0.0.1:2379 \
        --dial-timeout 2s --command-timeout 3s "$@"
}

step "build a lab: 3 nodes and 2 arrays as network namespaces, an etcd cluster, NBD arrays"
vmcluster lab up --name "$LAB"

step "every node reaches array a1 over both storage paths (real NBD clients)"
for node in n1 n2 n3; do
    for addr in 10.77.11.101 10.77.12.101; do
        printf '  %s -> nbd://%s/lab-probe: %s bytes\n' "$node" "$addr" \
            "$(vmcluster lab exec "$node" -- nbdinfo --size "nbd://$addr:10809/lab-probe")"
    done
done

step "power-cut node n2: the other two etcd members keep quorum"
vmcluster lab fault crash n2
for _ in $(seq 1 30); do
    etcdctl_in n1 put /demo/written-while-n2-down yes >/dev/null 2>&1 && break
    sleep 0.5
done
echo "  n1 wrote /demo/written-while-n2-down"
vmcluster lab status | sed -n '/ROLE/,$p'

step "restart n2: its etcd member rejoins and has caught up"
vmcluster lab fault restart n2
printf '  n2 reads /demo/written-while-n2-down = %s\n' \
    "$(etcdctl_in n2 get /demo/written-while-n2-down --print-value-only)"

step "remove the lab"
vmcluster lab down --name "$LAB"
if ip netns list | grep -q "^vmc-$LAB-"; then
    echo "demo: namespaces of lab $LAB are left" >&2
    exit 1
fi

trap - EXIT
step "done: no VM, no lab namespace and no process left"
