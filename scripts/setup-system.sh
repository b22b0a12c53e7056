#!/usr/bin/env bash
# Installs the Debian packages vmcluster needs, if any is missing. Idempotent and quick when done.
set -euo pipefail

packages=(
    qemu-system-x86      # runs the VMs
    qemu-utils           # qemu-img, qemu-io, qemu-nbd (tests and arrays)
    etcd-server          # the cluster database
    etcd-client          # etcdctl
    iproute2             # namespaces, bridges, taps (the lab)
    nftables             # the lab's network partitions
    python3-venv         # the project's virtual environment
    libnbd-bin           # nbdinfo, nbdcopy: real NBD clients for tests
    nbdkit               # a second NBD server for the forwarder's tests
    fio                  # I/O load through the forwarder (its nbd engine)
    socat                # bench/blockio.py: a byte relay in C, the cost of a hop alone
    curl                 # API tests over unix sockets
    ca-certificates
)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$pkg")
done

# The guest image is built from packages fetched with apt-get download: package lists must exist.
lists_present=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -n 1)

if [ ${#missing[@]} -eq 0 ] && [ -n "$lists_present" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        SUDO=sudo
    else
        echo "error: missing packages (${missing[*]}) and not root: run 'make setup' as root" >&2
        exit 1
    fi
else
    SUDO=
fi

echo "setup: installing ${missing[*]:-(package lists only)}"
$SUDO apt-get update -q
if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
