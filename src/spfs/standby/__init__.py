"""spfs-standby: a pre-started process with every spfs module imported, which forks the
spfs programs (spfs-manager, spfs) on request instead of starting a new Python for each.

On an emulated machine an interpreter and the imports of trio, pyfuse3 and the swap engine
take seconds; a restore waits for them twice (the manager, then each SPFS). With the standby
running, `criu-spfs restore` and spfs-manager ask it instead, and a program is up in the time
of a fork. Without it they start the programs themselves, as before.
"""

DEFAULT_SOCKET = "/run/spfs/standby.sock"
