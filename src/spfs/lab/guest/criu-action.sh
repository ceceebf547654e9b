#!/bin/sh
# The lab's own CRIU action script, the part a container manager (vzctl's role) plays; it
# runs next to criu-spfs's action script (src/spfs/criu/action-script.sh), which handles the
# network lock. Shell, not Python: CRIU calls it at every stage.
#
# post-dump: optional probe for tests (SPFS_LAB_NETLOCK_PROBE=FILE): with CRIU's network lock
#   in place, try a plain TCP connection and a synced NFS write from inside the container.
# post-restore: configure the guest end of the restored veth.
# pre-resume: (NFSv3 containers, SPFS_LAB_NFS_HELPERS=1) restart rpcbind and rpc.statd in the
#   container's netns: the NFS client's lockd there needs them once NFS is mounted again.
PID=${CRTOOLS_INIT_PID:-}
in_ct_net() { nsenter -t "$PID" -n "$@"; }

probe() {
    out=$SPFS_LAB_NETLOCK_PROBE
    if in_ct_net timeout 4 python3 -c "
import socket, sys
s = socket.create_connection(('$SPFS_LAB_CT_HOST_ADDR', int('$SPFS_LAB_NETLOCK_PROBE_PORT')), 3)
s.sendall(b'probe'); sys.exit(0)" 2>/dev/null; then
        echo "tcp=connected" >> "$out"
    else
        echo "tcp=blocked" >> "$out"
    fi
    if nsenter -t "$PID" -m -n -r -w timeout 20 dd if=/dev/zero \
            of="$SPFS_LAB_NETLOCK_PROBE_FILE" bs=4096 count=64 conv=fsync 2>/dev/null; then
        echo "nfs=ok" >> "$out"
    else
        echo "nfs=failed" >> "$out"
    fi
}

# For failure tests: SPFS_LAB_FAIL_AT=STAGE makes this stage fail (CRIU aborts a restore
# whose pre-restore or post-restore script fails).
if [ -n "${SPFS_LAB_FAIL_AT:-}" ] && [ "$SPFS_LAB_FAIL_AT" = "${CRTOOLS_SCRIPT_ACTION:-}" ]; then
    echo "spfs-lab action: failing $SPFS_LAB_FAIL_AT on request" >&2
    exit 1
fi

# For failure tests: SPFS_LAB_STALL_AT=STAGE stops criu-spfs (SIGSTOP) at that stage and lets
# it go on after SPFS_LAB_STALL_SECONDS, as a starved or stuck criu-spfs would be. CRIU runs
# this script before criu-spfs's, whose wait for the stage's answer must then end alone.
if [ -n "${SPFS_LAB_STALL_AT:-}" ] && [ "$SPFS_LAB_STALL_AT" = "${CRTOOLS_SCRIPT_ACTION:-}" ] &&
        [ -n "${SPFS_CRIU_PID:-}" ]; then
    echo "spfs-lab action: stopping criu-spfs ($SPFS_CRIU_PID) at $SPFS_LAB_STALL_AT for" \
        "${SPFS_LAB_STALL_SECONDS:-30} s" >&2
    kill -STOP "$SPFS_CRIU_PID"
    (sleep "${SPFS_LAB_STALL_SECONDS:-30}"; kill -CONT "$SPFS_CRIU_PID") \
        </dev/null >/dev/null 2>&1 &
fi

case "${CRTOOLS_SCRIPT_ACTION:-}" in
    post-dump)
        [ -n "${SPFS_LAB_NETLOCK_PROBE:-}" ] && probe
        exit 0 ;;
    post-restore)
        ip addr add "$SPFS_LAB_CT_HOST_ADDR/24" dev "$SPFS_LAB_CT_HOST_VETH" 2>/dev/null
        ip link set "$SPFS_LAB_CT_HOST_VETH" up ;;
    pre-resume)
        if [ "${SPFS_LAB_NFS_HELPERS:-}" = 1 ]; then
            "$SPFS_LAB_PYTHON" -m spfs.lab.ct.nfs_helpers "$PID" || exit 1
        fi ;;
esac
exit 0
