#!/bin/sh
# PID 1 of the lab guest, after the initramfs switched into the overlay of the host's root.
# Prepares everything lab commands rely on (modules, cgroups, the NFS server with its shares,
# a checked CRIU), then runs the command the host put in the run dir with its output on a
# virtio port, records its exit status and powers off. See README "The lab".
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

mount -t proc proc /proc
RUN=""; KROOT=""; CHECKOUT=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        spfs.run=*) RUN="${arg#spfs.run=}" ;;
        spfs.kernel=*) KROOT="${arg#spfs.kernel=}" ;;
        spfs.checkout=*) CHECKOUT="${arg#spfs.checkout=}" ;;
    esac
done
# The checkout must stay at its path even where the guest mounts its own tmpfs (a clone
# under /tmp or /run): hold it aside, mount those, and put it back.
mkdir -p /.spfs-checkout
mount --bind "$CHECKOUT" /.spfs-checkout

mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p "$CHECKOUT"
mount --move /.spfs-checkout "$CHECKOUT"

stamp() {  # boot timeline, on the console and in the run dir
    echo "spfs-lab: [$(cut -d' ' -f1 /proc/uptime)] $*" > /dev/console
    [ -w "$RUN" ] && echo "$(cut -d' ' -f1 /proc/uptime) $*" >> "$RUN/boot-timeline"
}
die() {
    stamp "BOOT FAILED: $*"
    [ -w "$RUN" ] && echo "boot failed: $*" > "$RUN/boot-error"
    sync; poweroff -f; sleep 10
}

mkdir -p "$RUN"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none runshare "$RUN" \
    || { echo "cannot mount run dir" > /dev/console; poweroff -f; }
stamp "userspace started"

# Kernel modules come from the extracted Debian package in the build dir.
KVER=$(uname -r)
mkdir -p "/lib/modules/$KVER"
mount --bind "$KROOT/lib/modules/$KVER" "/lib/modules/$KVER" || die "modules dir $KROOT"
# One modprobe for all: each separate call re-reads modules.dep over 9p (seconds under TCG).
modprobe -a virtio_console fuse veth tun nfsd nfsv3 nfsv4 nf_tables nft_chain_nat \
    ip_tables iptable_filter iptable_mangle xt_mark xt_tcpudp nf_conntrack \
    af_packet_diag unix_diag inet_diag tcp_diag netlink_diag || die "modprobe"
stamp "modules loaded"

hostname lab
ip link set lo up
: > /etc/resolv.conf   # no DNS in a guest without a network: fail lookups at once

# cgroups: the same hybrid layout as our hosts (v1 freezer + cgroup2 "unified"), so code and
# tests see identical paths on the host and in the guest.
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/unified /sys/fs/cgroup/freezer
mount -t cgroup2 none /sys/fs/cgroup/unified || die "cgroup2"
mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer || die "v1 freezer"

# criu check runs while the NFS server starts; both must succeed before the command.
criu check > /tmp/criu-check.log 2>&1 &
CRIU_CHECK=$!

# NFS server in the root netns: a tmpfs pseudo-root (fsid=0) and independent tmpfs shares.
. "$(dirname "$0")/nfs-server.sh"
start_nfs_server || die "NFS server"
stamp "NFS server up"
wait $CRIU_CHECK || { cat /tmp/criu-check.log > /dev/console; die "criu check"; }
stamp "criu check: $(tail -n1 /tmp/criu-check.log)"


# The command's output goes to the host over a virtio serial port named spfs.out.
OUT=/dev/console
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = spfs.out ] && OUT="/dev/$(basename "$p")"
done

export SPFS_LAB=1 SPFS_LAB_RESULTS="$RUN/results" HOME=/root
. "$(dirname "$0")/lab-env.sh"
mkdir -p "$SPFS_LAB_RESULTS"
stamp "running command"
sh "$RUN/cmd.sh" < /dev/null > "$OUT" 2>&1
status=$?
stamp "command exited with status $status"
echo "$status" > "$RUN/exit-status"
sync
poweroff -f
