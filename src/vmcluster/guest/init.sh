#!/bin/sh
# vmcluster probe guest: PID 1 of the initramfs.
#
# Kernel command line settings (all optional):
#   vmcluster.name=NAME         VM name written into every record (default: probe)
#   vmcluster.gen=N             placement generation of this instance (default: 0)
#   vmcluster.interval_ms=MS    time between records (default: 100)
#   vmcluster.ip=A.B.C.D/P      configure eth0 and serve HTTP on port 80
#   vmcluster.gw=A.B.C.D        default route
#   vmcluster.mode=accel-probe  print the boot marker and power off (accelerator probe)
#
# The constants below are filled in by the image builder from vmcluster.guest.record.
MAGIC=@MAGIC@
BASE=@RECORD_BASE_SECTOR@
DISK=/dev/vda

export PATH=/bin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run

say() { echo "vmcluster-probe: $*"; }

NAME=probe GEN=0 INTERVAL_MS=100 IP="" GW="" MODE=run
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmcluster.name=*) NAME=${arg#*=} ;;
        vmcluster.gen=*) GEN=${arg#*=} ;;
        vmcluster.interval_ms=*) INTERVAL_MS=${arg#*=} ;;
        vmcluster.ip=*) IP=${arg#*=} ;;
        vmcluster.gw=*) GW=${arg#*=} ;;
        vmcluster.mode=*) MODE=${arg#*=} ;;
    esac
done

if [ "$MODE" = accel-probe ]; then
    echo "VMCLUSTER-ACCEL-PROBE-OK"
    poweroff -f
fi

while read -r module; do
    insmod "/lib/modules/$module.ko" || say "insmod $module failed"
done < /etc/vmcluster/modules

# Graceful stop: the ACPI power button (QMP system_powerdown) powers the guest off.
(
    for dev in /sys/class/input/input*; do
        if [ "$(cat "$dev/name" 2>/dev/null)" = "Power Button" ]; then
            for ev in "$dev"/event*; do
                dd if="/dev/input/${ev##*/}" bs=24 count=1 >/dev/null 2>&1
                say "power button pressed, powering off"
                sync
                poweroff -f
            done
        fi
    done
) &

BOOT=$(cut -c1-8 /proc/sys/kernel/random/boot_id)
say "booted name=$NAME gen=$GEN boot=$BOOT kernel=$(uname -r)"

if [ -n "$IP" ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add "$IP" dev eth0
    [ -n "$GW" ] && ip route add default via "$GW"
    mkdir -p /www/cgi-bin
    cat > /www/cgi-bin/status <<CGI
#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "name=$NAME gen=$GEN boot=$BOOT seq=\$(cat /run/seq 2>/dev/null || echo 0)"
CGI
    chmod 755 /www/cgi-bin/status
    echo '<html><body>vmcluster probe <a href="/cgi-bin/status">status</a></body></html>' \
        > /www/index.html
    httpd -p 80 -h /www && say "http on ${IP%/*} port 80"
fi

if [ ! -b "$DISK" ]; then
    say "no disk at $DISK: probe idle"
    while :; do sleep 3600; done
fi

SECTORS=$(cat /sys/block/vda/size)
MAXSEQ=$((SECTORS - BASE - 1))

# A valid record for seq $1 sits in sector BASE + $1.
valid() {
    dd if=$DISK bs=512 skip=$((BASE + $1)) count=1 iflag=direct 2>/dev/null | {
        read -r magic _name _gen _boot seq
        [ "$magic" = "$MAGIC" ] && [ "$seq" = "$1" ]
    }
}

# Records form a prefix 1..N: binary search for N.
lo=0 hi=$((MAXSEQ + 1))
while [ $((hi - lo)) -gt 1 ]; do
    mid=$(((lo + hi) / 2))
    if valid $mid; then lo=$mid; else hi=$mid; fi
done
seq=$lo
say "resuming after seq $seq"

usec=$((INTERVAL_MS * 1000))
while [ "$seq" -lt "$MAXSEQ" ]; do
    read -r now < /sys/block/vda/size
    if [ "$now" != "$SECTORS" ]; then  # the disk was grown (or shrunk) while the guest runs
        SECTORS=$now MAXSEQ=$((now - BASE - 1))
        say "disk size now $SECTORS sectors"
    fi
    next=$((seq + 1))
    if printf '%s %s %s %s %s\n' "$MAGIC" "$NAME" "$GEN" "$BOOT" "$next" |
        dd of=$DISK bs=512 seek=$((BASE + next)) count=1 conv=notrunc,sync,fsync oflag=direct \
            2>/dev/null; then
        seq=$next
        echo "ACK $seq"
        [ -n "$IP" ] && echo "$seq" > /run/seq.new && mv /run/seq.new /run/seq
    else
        say "write of seq $next failed, retrying"
    fi
    usleep $usec
done
say "disk full at seq $seq: probe stopped"
while :; do sleep 3600; done
