#!/bin/sh
# Installs the Debian packages listed in tools/apt-packages.txt, only if one is missing,
# so a second `make setup` costs a dpkg-query and nothing else.
set -eu
here=$(dirname "$0")
pkgs=$(grep -v '^#' "$here/apt-packages.txt" | grep -v '^$' | tr '\n' ' ')
missing=""
for p in $pkgs; do
    st=$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "setup: installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# The NFS server packages try to start services on install; there are none to start on
# our machines (no NFS in the host kernel), and a policy-rc.d refusal is harmless.
apt-get install -y -q --no-install-recommends $missing
