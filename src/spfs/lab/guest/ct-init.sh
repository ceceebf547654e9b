#!/bin/sh
# First process of a new lab container (PID 1 of its pid namespace, already in its own mount,
# net, uts and ipc namespaces, still seeing the guest's files). It makes the container root a
# mount point, tells the lab it is ready to be configured from outside (veth, NFS mounts made
# from inside the container's netns and mntns, binds), waits for "go", then pivots into the
# container root and becomes the container's init.
# Args: STATE_DIR ROOT HOSTNAME
STATE=$1; ROOT=$2
hostname "$3"
mount --make-rprivate / || exit 1
mount --bind "$ROOT" "$ROOT" || exit 1
: > "$STATE/ns-ready"
i=0
while [ ! -e "$STATE/go" ]; do
    i=$((i + 1))
    [ $i -gt 1200 ] && { echo "ct-init: no go from the lab in 60 s" >&2; exit 1; }
    sleep 0.05
done
cd "$ROOT" && mkdir -p .oldroot && pivot_root . .oldroot && cd / || exit 1
exec /bin/busybox sh -c 'mount -t proc proc /proc && umount -l /.oldroot && rmdir /.oldroot &&
    exec /bin/ctinit < /dev/null > /dev/null 2>&1'
