#!/usr/bin/env bash
# The vmcluster showcase (run by `make demo`):
#   1. a probe VM boots under QEMU, its durable-write counter rises, it powers off cleanly;
#   2. a lab cluster (namespaces, etcd, NBD arrays, node agents) is built; a network link fails
#      and the leader is power-cut: the survivors see it, keep quorum, elect a new leader, heal.
# Nothing is left behind.
set -euo pipefail

VM=demo-probe
LAB=demo
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

cleanup() {
    vmcluster lab down --name "$LAB" >/dev/null 2>&1 || true
    if vmcluster vm show --local "$VM" >/dev/null 2>&1; then
        vmcluster vm stop --local "$VM" --force >/dev/null 2>&1 || true
        vmcluster vm delete --local "$VM" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
cleanup  # a previous demo that was interrupted

step "build the guest image (Debian cloud kernel + busybox probe; cached after the first run)"
vmcluster image build
vmcluster image list

step "create and start a VM: 128 MiB, 1 vCPU, a 256 MiB disk, a user-mode NIC"
vmcluster vm create --local "$VM" --memory 128 --vcpus 1 --disk 256M --nic user
vmcluster -v vm start --local "$VM"
pid=$(vmcluster vm show --local "$VM" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')

step "the guest boots (serial console)"
for _ in $(seq 1 100); do
    grep -q '^ACK ' "$(vmcluster vm show --local "$VM" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["console_log"])')" && break
    sleep 0.2
done
vmcluster vm console --local "$VM" | grep -v '^ACK ' || true

step "the probe writes a record, syncs it, then prints ACK <seq>: the counter rises"
url=$(vmcluster vm show --local "$VM" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["http"][0])')
for _ in 1 2 3 4 5 6; do
    last=$(vmcluster vm console --local "$VM" | grep '^ACK ' | tail -n 1)
    http=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())' "$url" 2>/dev/null || echo "(http not up yet)")
    printf '  console: %-10s  guest http: %s\n' "$last" "$http"
    sleep 1
done

step "vmcluster vm list"
vmcluster vm list

step "stop it gracefully (ACPI power button), then delete it"
vmcluster vm stop --local "$VM"
vmcluster vm delete --local "$VM"
vmcluster vm list

# A process that has exited but is not yet reaped by its parent (a zombie) does not count.
if [ -e "/proc/$pid" ] && ! grep -q '^State:.*zombie' "/proc/$pid/status" 2>/dev/null; then
    echo "demo: QEMU pid $pid is still running" >&2
    exit 1
fi
echo "no VM left, and QEMU (pid $pid) has exited"

step "build a lab: 3 nodes and 2 arrays as network namespaces, etcd, NBD arrays, node agents"
vmcluster lab up --name "$LAB"

step "every node reaches array a1 over both storage paths (real NBD clients)"
for node in n1 n2 n3; do
    for addr in 10.77.11.101 10.77.12.101; do
        printf '  %s -> nbd://%s/lab-probe: %s bytes\n' "$node" "$addr" \
            "$(vmcluster lab exec "$node" -- nbdinfo --size "nbd://$addr:10809/lab-probe")"
    done
done

step "the cluster: an agent per node, heartbeats on both cluster networks, one leader"
vmcluster node list
vmcluster cluster status
leader=$(vmcluster node list -o json | python3 -c 'import json,sys; print([n["name"] for n in json.load(sys.stdin) if n["leader"]][0])')
survivor=$( [ "$leader" = n1 ] && echo n2 || echo n1 )

step "cut node $survivor's cluster1 link: cluster1 is partitioned for it, it stays up via cluster2"
vmcluster lab fault link "$survivor" cluster1 down
for _ in $(seq 1 50); do
    vmcluster node list -o json | grep -q partitioned && break
    sleep 0.2
done
vmcluster node list
vmcluster lab fault link "$survivor" cluster1 up

step "power-cut the leader ($leader): the others see it isolated, then down, and elect a new leader"
vmcluster lab fault crash "$leader"
for _ in $(seq 1 100); do
    state=$(vmcluster node list --via "$survivor" -o json | python3 -c "import json,sys; print({n['name']: n['state'] for n in json.load(sys.stdin)}['$leader'])")
    [ "$state" = down ] && break
    sleep 0.2
done
vmcluster node list --via "$survivor"
for _ in $(seq 1 50); do  # the new leader's controller records the change as events
    vmcluster events --via "$survivor" -o json | grep -q '"kind": "leader.changed", "subject": "[^'"$leader"']' && break
    sleep 0.2
done
echo
vmcluster events --via "$survivor" --limit 8

step "restart $leader: its etcd member and agent rejoin"
vmcluster lab fault restart "$leader"
for _ in $(seq 1 100); do
    vmcluster node list --via "$survivor" -o json | python3 -c "import json,sys; sys.exit(0 if all(n['state'] == 'up' for n in json.load(sys.stdin)) else 1)" && break
    sleep 0.2
done
vmcluster node list --via "$survivor"

step "remove the lab"
vmcluster lab down --name "$LAB"
if ip netns list | grep -q "^vmc-$LAB-"; then
    echo "demo: namespaces of lab $LAB are left" >&2
    exit 1
fi

trap - EXIT
step "done: no VM, no lab namespace and no process left"
