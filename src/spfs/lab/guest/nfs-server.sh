# Kernel NFS server of the lab (sourced by boot.sh). tmpfs is exported because the overlay
# root cannot be ("does not support NFS export"). Grace periods are cut short: a fresh lab
# server has no clients to wait for, and tests take locks right after boot.
start_nfs_server() {
    mkdir -p /proc/fs/nfsd /run/rpc_pipefs /var/lib/nfs/v4recovery /srv/nfs4
    mount -t nfsd nfsd /proc/fs/nfsd || return 1
    mount -t rpc_pipefs sunrpc /run/rpc_pipefs || return 1
    mount -t tmpfs -o size=64m,mode=755 tmpfs /srv/nfs4 || return 1
    for s in a b; do
        mkdir -p "/srv/nfs4/$s"
        mount -t tmpfs -o size=512m,mode=777 tmpfs "/srv/nfs4/$s" || return 1
    done
    cat > /etc/exports <<EX
/srv/nfs4    *(rw,fsid=0,crossmnt,no_root_squash,insecure,no_subtree_check,sync)
/srv/nfs4/a  *(rw,fsid=1,no_root_squash,insecure,no_subtree_check,sync)
/srv/nfs4/b  *(rw,fsid=2,no_root_squash,insecure,no_subtree_check,sync)
EX
    sysctl -q -w fs.nfs.nlm_grace_period=1 fs.nfs.nlm_timeout=3 2>/dev/null
    echo 10 > /proc/fs/nfsd/nfsv4gracetime 2>/dev/null
    echo 10 > /proc/fs/nfsd/nfsv4leasetime 2>/dev/null
    rpcbind -w || return 1
    # The kernel registers lockd/nfsd through rpcbind's AF_LOCAL socket, looked up by path in
    # a mount namespace that every lab container shares with the guest until it pivots; a
    # container's lockd would then overwrite the server's nlockmgr ports in *this* rpcbind
    # (NFSv3 locks in a ct hang in nlmclnt_call). Without the path the kernel falls back to
    # 127.0.0.1:111 in its own netns: the server's here, the container's own in a ct.
    rm -f /run/rpcbind.sock
    exportfs -ra || return 1
    rpc.nfsd 8 || return 1
    rpc.mountd || return 1
    rpc.statd --no-notify || return 1
    echo Y > /proc/fs/nfsd/v4_end_grace 2>/dev/null
    return 0
}
