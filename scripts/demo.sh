#!/usr/bin/env bash
# The vmcluster showcase (run by `make demo`; `make demo KEEP=1` leaves the lab up):
#   1. a lab cluster: 3 nodes and 2 NBD arrays as network namespaces, etcd, a node agent per node;
#   2. a shared volume on array a1, with a coordinator node, and three highly available probe VMs
#      on it, one per node (each disk a LUN of the volume, reached over NBD); each probe writes
#      a durable record every 100 ms and prints ACK <seq> only once it is on disk;
#   3. multipath and redirected I/O: web's node loses storage-a (its block forwarder goes on
#      over storage-b in milliseconds), then storage-b too (its I/O goes through the volume's
#      coordinator over the cluster network: redirected), then gets storage-a back (direct);
#   4. db's disk is grown while db runs, and its guest sees the new size;
#      a network link fails: the cluster sees it and keeps going on the other network;
#   5. web's node, now the volume's coordinator, is power-cut: web is fenced at the array and
#      runs again on another node within seconds, the coordinator moves, and the VMs on the
#      other nodes never stop; the probe checker proves that no acknowledged write was lost and
#      that the dead instance wrote nothing after it was fenced.
# Without KEEP=1 nothing is left behind.
set -euo pipefail

LAB=demo
KEEP=${KEEP:-}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

cleanup() { vmcluster lab down --name "$LAB" >/dev/null 2>&1 || true; }
[ -n "$KEEP" ] || trap cleanup EXIT
cleanup  # a previous demo that was interrupted or kept

step "build the guest image (Debian cloud kernel + busybox probe; cached after the first run)"
vmcluster image build
vmcluster image list

step "build a lab: 3 nodes and 2 arrays as network namespaces, etcd, NBD arrays, node agents"
vmcluster lab up --name "$LAB"

step "the cluster: an agent per node, heartbeats on both cluster networks, one leader"
vmcluster node list
vmcluster cluster status

step "a shared volume on array a1: the leader gives it a coordinator; disks are made through it"
vmcluster volume create vol1 --array a1 --size 512M
for _ in $(seq 1 50); do
    [ "$(vmcluster volume show vol1 -o json | json 'd["coordinator"] or ""')" ] && break
    sleep 0.2
done
vmcluster disk create vol1/db --size 64M --via n3   # asked of any node: the coordinator makes it
vmcluster disk create vol1/big --size 1G || true    # refused: the free space is named

step "three HA probe VMs on the volume: web (high priority), db (prefers n2), app (prefers n3)"
vmcluster vm create web --memory 128 --disk 64M --volume vol1 --priority high --anti-affinity front:hard
vmcluster vm create db --memory 128 --disk vol1/db --preferred n2 --anti-affinity front:hard
vmcluster vm create app --memory 128 --disk 64M --volume vol1 --preferred n3
vmcluster vm start web
vmcluster vm start db
vmcluster vm start app
vmcluster vm list
vmcluster vm show web
vmcluster disk list

owner=$(vmcluster vm show web -o json | json 'd["owner"]')
gen=$(vmcluster vm show web -o json | json 'd["generation"]')
step "web runs on $owner (generation $gen): its console shows the probe's acknowledged writes"
for _ in $(seq 1 100); do
    [ "$(vmcluster vm console web | grep -c '^ACK ')" -ge 5 ] && break
    sleep 0.2
done
vmcluster vm console web | grep -v '^ACK ' | tail -n 4 || true
vmcluster vm console web | grep '^ACK ' | tail -n 3

last_ack() { vmcluster vm console web | grep '^ACK ' | tail -n 1 | cut -d' ' -f2; }
wait_path() {  # node path state
    for _ in $(seq 1 100); do
        vmcluster path list --node "$1" -o json | python3 -c "import json,sys; sys.exit(0 if any(r['path'] == '$2' and r['state'] == '$3' for r in json.load(sys.stdin)) else 1)" && return 0
        sleep 0.2
    done
    echo "demo: path $2 of $1 is not $3" >&2
    return 1
}
wait_mode() {  # node mode
    for _ in $(seq 1 150); do
        [ "$(vmcluster volume show vol1 -o json | json "d['nodes']['$1']['mode']")" = "$2" ] && return 0
        sleep 0.2
    done
    echo "demo: $1 is not $2 on vol1" >&2
    return 1
}
coordinator=$(vmcluster volume show vol1 -o json | json 'd["coordinator"]')
if [ "$coordinator" = "$owner" ]; then  # redirected I/O goes through another node
    other=$( [ "$owner" = n1 ] && echo n2 || echo n1 )
    vmcluster volume move vol1 --coordinator "$other"
fi
step "multipath: web's disk goes through $owner's block forwarder, over storage-a and storage-b"
vmcluster path list --node "$owner"
before=$(last_ack)
step "cut $owner's storage-a link under web (last ACK: $before): direct over storage-b"
vmcluster lab fault link "$owner" storage-a down
wait_path "$owner" storage-a down
sleep 2
vmcluster path list --node "$owner"
echo "web's probe went on: ACK $before -> $(last_ack) with storage-a down"
before=$(last_ack)
step "cut storage-b too: $owner has no path left, web's I/O goes through the coordinator"
vmcluster lab fault link "$owner" storage-b down
wait_mode "$owner" redirected
sleep 2
vmcluster volume show vol1
echo "web's probe went on: ACK $before -> $(last_ack), redirected"
step "storage-a back: direct again"
vmcluster lab fault link "$owner" storage-a up
wait_mode "$owner" direct
vmcluster lab fault link "$owner" storage-b up
wait_path "$owner" storage-b up
vmcluster volume show vol1
vmcluster events --limit 10

step "grow db's disk while db runs: the array grows its LUN, the forwarder and QEMU follow"
vmcluster disk resize vol1/db --size 96M
for _ in $(seq 1 150); do
    vmcluster vm console db | grep -q "disk size now $((96 * 2048)) sectors" && break
    sleep 0.2
done
vmcluster vm console db | grep "disk size now" || { echo "demo: db did not see its disk grow" >&2; exit 1; }
vmcluster disk list --volume vol1

survivor=$( [ "$owner" = n1 ] && echo n2 || echo n1 )
step "cut node $survivor's cluster1 link: cluster1 is partitioned for it, it stays up via cluster2"
vmcluster lab fault link "$survivor" cluster1 down
for _ in $(seq 1 50); do
    [[ "$(vmcluster node list -o json)" == *partitioned* ]] && break
    sleep 0.2
done
vmcluster node list
vmcluster lab fault link "$survivor" cluster1 up

step "make $owner, web's node, the volume's coordinator: its crash will move the coordinator too"
vmcluster volume move vol1 --coordinator "$owner"
others=$(vmcluster vm list -o json | json "' '.join(v['name'] + ':' + str(v['generation']) for v in d if v['owner'] != '$owner')")

last=$(vmcluster vm console web | grep '^ACK ' | tail -n 1)
step "power-cut $owner, the node of web and the coordinator of vol1 (last console line: $last)"
crashed_at=$(date +%s.%N)
vmcluster lab fault crash "$owner"
for _ in $(seq 1 300); do
    now=$(vmcluster vm show web -o json | json '(d["state"], d["owner"], d["generation"])')
    case "$now" in *running*) [[ "$now" != *"'$owner'"* ]] && break ;; esac
    sleep 0.1
done
took=$(python3 -c "import time; print(f'{time.time() - $crashed_at:.1f}')")
echo "web is running again after ${took} s: $now"
vmcluster vm list
for _ in $(seq 1 100); do
    c=$(vmcluster volume show vol1 -o json | json 'd["coordinator"] or ""')
    [ -n "$c" ] && [ "$c" != "$owner" ] && break
    sleep 0.2
done
echo "vol1's coordinator moved to $c"
for entry in $others; do  # the VMs of the other nodes never stopped
    name=${entry%%:*}
    gen_now=$(vmcluster vm show "$name" -o json | json 'd["generation"]')
    [ "$name:$gen_now" = "$entry" ] || { echo "demo: $name restarted ($entry -> $gen_now)" >&2; exit 1; }
    echo "$name ran on, same instance (generation $gen_now)"
done
echo
vmcluster events --limit 12

step "the new instance continues the sequence on the same disk"
for _ in $(seq 1 100); do
    [ "$(vmcluster vm console web | grep -c '^ACK ')" -ge 3 ] && break
    sleep 0.2
done
vmcluster vm console web | grep -v '^ACK ' | grep resuming || true
vmcluster vm console web | grep '^ACK ' | tail -n 3

step "the probe checker: every console of every instance against the disk at the array"
vmcluster vm stop web  # quiet disks to read
vmcluster vm stop db
vmcluster vm stop app
vmcluster lab check

step "restart $owner: it rejoins; web starts again wherever the policy says"
vmcluster lab fault restart "$owner"
for _ in $(seq 1 100); do
    vmcluster node list -o json | python3 -c "import json,sys; sys.exit(0 if all(n['state'] == 'up' for n in json.load(sys.stdin)) else 1)" && break
    sleep 0.2
done
vmcluster vm start web
vmcluster node list
vmcluster vm list

if [ -n "$KEEP" ]; then
    step "the lab stays up (KEEP=1): 'vmcluster lab down --name $LAB' removes it"
    exit 0
fi
step "remove the lab"
vmcluster lab down --name "$LAB"
trap - EXIT
if ip netns list | grep -q "^vmc-$LAB-"; then
    echo "demo: namespaces of lab $LAB are left" >&2
    exit 1
fi
step "done: no VM, no lab namespace and no process left"
