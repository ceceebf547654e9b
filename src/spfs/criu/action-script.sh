#!/bin/sh
# criu-spfs's CRIU action script (CRIU runs it at every stage with CRTOOLS_SCRIPT_ACTION set,
# in the root namespaces of the host). Shell, not Python: CRIU calls it up to ten times per
# restore and a Python start costs 0.6 s under emulation. Plain sh (dash) and builtins only:
# a bash start, or a helper like timeout or head, costs 30-70 ms each under emulation, at
# every stage CRIU runs.
#
# network-lock (dump): runs before CRIU locks the container's network. CRIU's lock (iptables
#   or nftables, 3.17 and 4.x alike) accepts packets marked 0xC114 (SOCCR_MARK), so we mark
#   exactly the container's NFS traffic (NFS, portmapper, NLM, NSM, mountd ports of each
#   server in its mounts, and its own rpcbind/statd on loopback) and nothing else: dump can
#   flush dirty NFS pages (else it hangs unkillably in nfs_getattr), every other connection
#   stays locked. The rules live in a mangle chain of their own.
# post-resume (restore): drop that chain, which the dump image carried along, in the
#   background: its four iptables runs take ~0.8 s under emulation and would hold the
#   processes' resume (CRIU waits for network-unlock scripts); the marks are harmless
#   meanwhile, CRIU's own lock rules being gone. A chain still there at the next dump is
#   rebuilt.
# setup-namespaces, post-restore, network-unlock, pre-resume, post-resume (restore): handed
#   to the criu-spfs restore that runs CRIU (src/spfs/criu/stages.py) through the FIFOs in
#   $SPFS_CRIU_CONTROL: CRIU waits for SPFS to be mounted before it builds the container's
#   mount namespace, SPFS goes to stub before the processes resume, and the replace by the
#   real NFS is released after (post-restore, network-unlock and post-resume are not waited
#   for: what they start, pre-resume checks, or the processes already run). The waits are
#   bounded: criu-spfs answers each stage within its limit, and a timer here answers for it
#   if it cannot (SPFS_CRIU_STAGE_TIMEOUTS); a failed stage names itself in CRIU's log.
#   network-unlock also comes at the end of a dump, without $SPFS_CRIU_CONTROL: a no-op then.
PID=${CRTOOLS_INIT_PID:-}
MARK=0xC114
CHAIN=SPFS-NFS

in_ct_net() { nsenter -t "$PID" -n "$@"; }

nfs_servers() {  # addr= of every NFS mount in the container's mount namespace
    sed -n 's/.* - nfs4\{0,1\} [^ ]* .*addr=\([0-9.]*\).*/\1/p' "/proc/$PID/mountinfo" | sort -u
}

rpc_ports() {  # NFS, portmapper, lockd and statd ports the server offers
    { echo 2049; echo 111
      in_ct_net timeout 5 rpcinfo -p "$1" 2>/dev/null |
          awk '$5 == "nfs" || $5 == "nlockmgr" || $5 == "status" || $5 == "mountd" {print $4}'
    } | sort -un | paste -sd, -
}

local_nsm() {  # the container's own rpcbind/statd (NFSv3 locks), if it has them
    in_ct_net timeout 5 rpcinfo -p 127.0.0.1 >/dev/null 2>&1 && echo 127.0.0.1
}

mark_nfs() {
    if ! in_ct_net iptables -w -t mangle -N $CHAIN 2>/dev/null; then
        unmark_nfs  # left over by a restore whose clean-up did not run
        in_ct_net iptables -w -t mangle -N $CHAIN || return 1
    fi
    # The lock stays in the netns after a successful dump; the kernel's NFSv3 teardown there
    # (lockd unregister, NSM unmonitor over loopback) must still get through, or the exit of
    # the netns's last task hangs in lockd_down and blocks lockd for the whole guest.
    for s in $(nfs_servers) $(local_nsm); do
        ports=$(rpc_ports "$s")
        echo "spfs-lab action: marking NFS traffic to $s ports $ports" >&2
        for proto in tcp udp; do
            in_ct_net iptables -w -t mangle -A $CHAIN -d "$s" -p $proto -m multiport \
                --dports "$ports" -j MARK --set-mark $MARK || return 1
            in_ct_net iptables -w -t mangle -A $CHAIN -s "$s" -p $proto -m multiport \
                --sports "$ports" -j MARK --set-mark $MARK || return 1
        done
    done
    in_ct_net iptables -w -t mangle -I OUTPUT -j $CHAIN &&
    in_ct_net iptables -w -t mangle -I PREROUTING -j $CHAIN
}

unmark_nfs() {
    in_ct_net iptables -w -t mangle -D OUTPUT -j $CHAIN 2>/dev/null
    in_ct_net iptables -w -t mangle -D PREROUTING -j $CHAIN 2>/dev/null
    in_ct_net iptables -w -t mangle -F $CHAIN 2>/dev/null
    in_ct_net iptables -w -t mangle -X $CHAIN 2>/dev/null
    return 0
}

to_criu_spfs() {  # one stage to criu-spfs; $2=wait: its answer is "ok" or what went wrong
    ctl=${SPFS_CRIU_CONTROL:-}
    [ -n "$ctl" ] || return 0
    # criu-spfs holds both FIFOs open read-write (src/spfs/criu/stages.py): no open here
    # blocks, and the read ends at EOF if criu-spfs dies
    printf '%s\n' "$1 ${PID:-0}" 1<>"$ctl/request" ||
        { echo "criu-spfs action: cannot hand over stage $1" >&2; return 1; }
    [ "${2:-}" = wait ] || return 0
    [ -n "${SPFS_CRIU_PID:-}" ] && kill -0 "$SPFS_CRIU_PID" 2>/dev/null ||
        { echo "criu-spfs action: criu-spfs (pid ${SPFS_CRIU_PID:-?}) is gone" >&2; return 1; }
    # CRIU waits for this script with no limit, holding the restored tasks: criu-spfs
    # answers within its own limits, and this timer answers in its place if it cannot at
    # all (stopped, or stuck in the kernel). A background sleep is the only timer dash has;
    # it runs beside the wait, not before it. The timer's line, if it comes after the real
    # answer, is skipped as stale by the next stage's read.
    limit=${SPFS_CRIU_STAGE_TIMEOUT:-300}
    for t in ${SPFS_CRIU_STAGE_TIMEOUTS:-}; do  # "STAGE=SECONDS ...", from criu-spfs
        case "$t" in "$1="*) limit=${t#"$1="} ;; esac
    done
    (
        trap 'kill "$s" 2>/dev/null; exit 0' TERM
        sleep "$limit" & s=$!
        wait "$s" && [ -p "$ctl/reply" ] || exit 0
        # CRIU 3.17 resumes the tasks even when pre-resume fails: tell criu-spfs when we gave
        # up (boot-clock seconds) so it can tell whether SPFS was in stub mode by then
        read -r up _ < /proc/uptime
        printf '%s gave-up %s\n' "$1" "$up" 1<>"$ctl/request"
        printf '%s no answer from criu-spfs in %s s\n' "$1" "$limit" 1<>"$ctl/reply"
    ) </dev/null >/dev/null 2>&1 &
    timer=$!
    answer=
    while IFS= read -r line; do
        case "$line" in "$1 "*) answer=${line#"$1 "}; break ;; esac  # skip stale answers
    done < "$ctl/reply"
    kill "$timer" 2>/dev/null
    [ "$answer" = ok ] && return 0
    echo "criu-spfs action: $1: ${answer:-no answer (criu-spfs gone)}" >&2
    return 1
}

case "${CRTOOLS_SCRIPT_ACTION:-}" in
    network-lock)
        [ -n "$PID" ] || { echo "criu-spfs action: no CRTOOLS_INIT_PID" >&2; exit 1; }
        mark_nfs ;;
    setup-namespaces|pre-resume)
        to_criu_spfs "$CRTOOLS_SCRIPT_ACTION" wait || exit 1 ;;
    post-restore|network-unlock)
        to_criu_spfs "$CRTOOLS_SCRIPT_ACTION" || exit 1 ;;
    post-resume)
        [ -n "$PID" ] && unmark_nfs </dev/null >/dev/null 2>&1 &
        to_criu_spfs "$CRTOOLS_SCRIPT_ACTION" || exit 1 ;;
esac
exit 0
