# Environment the lab gives every command: where the NFS shares are and how to mount them.
# Kept in one place so the README, boot.sh and the Python API (spfs.lab.env) agree.
export SPFS_LAB_NFS_SERVER=127.0.0.1          # the server as seen from the guest's root netns
export SPFS_LAB_NFS_ROOT=/srv/nfs4            # server-side pseudo-root (fsid=0)
export SPFS_LAB_SHARES="a b"
export SPFS_LAB_SHARE_A_DIR=/srv/nfs4/a       # server-side directory of share a
export SPFS_LAB_SHARE_A_V3=/srv/nfs4/a        # export path to mount with vers=3
export SPFS_LAB_SHARE_A_V4=/a                 # export path to mount with vers=4.x
export SPFS_LAB_SHARE_B_DIR=/srv/nfs4/b
export SPFS_LAB_SHARE_B_V3=/srv/nfs4/b
export SPFS_LAB_SHARE_B_V4=/b
export SPFS_LAB_CGROUP_V2=/sys/fs/cgroup/unified
export SPFS_LAB_CGROUP_V1_FREEZER=/sys/fs/cgroup/freezer
