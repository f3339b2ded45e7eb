#!/usr/bin/env bash
# Install everything hsmfs needs on a Debian machine (as root): the FUSE library and tools,
# the programs the tests drive, the Python package, and the mount(8) helpers.
#   scripts/setup.sh            the package (FUSE + kernel doors, the demo's embedded S3)
#   scripts/setup.sh test       ... plus the test suite's tools (and matplotlib: the bench is tested)
#   scripts/setup.sh bench      ... plus the benchmark's (matplotlib; Ceph is installed on demand)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"

apt_pkgs=(fuse3 libfuse3-dev pkg-config gcc sqlite3)  # sqlite3: the demo queries through both doors
# systemd: systemd-analyze verifies the shipped units (tests/t1_units.py)
[ "$extra" = test ] && apt_pkgs+=(rsync attr util-linux e2fsprogs xfsprogs btrfs-progs git systemd)
# podman (with its recommends), runc and a static busybox: tests/t4_containers.py runs the
# README's `podman run -v` recipe (no registry here: the root filesystem is a busybox dir)
[ "$extra" = test ] && container_pkgs=(podman runc busybox-static) || container_pkgs=()
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cmissing=()
for p in "${container_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || cmissing+=("$p")
done
if [ ${#cmissing[@]} -gt 0 ]; then
  echo "setup: installing ${cmissing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${cmissing[@]}" >/dev/null
fi

case "$extra" in
  test) spec=".[test,demo,bench]" ;;  # the bench's report tests draw its plots
  bench) spec=".[demo,bench]" ;;
  *) spec=".[demo]" ;;
esac
"$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e "$spec"

# mount(8) looks for /sbin/mount.fuse.hsmfs (type fuse.hsmfs) and /sbin/mount.hsmfs.
real_python=$("$python" -c 'import sys; print(sys.executable)')
for helper in /sbin/mount.fuse.hsmfs /sbin/mount.hsmfs; do
  sed "s|\${HSMFS_PYTHON:-python3}|\${HSMFS_PYTHON:-$real_python}|" mount.hsmfs > "$helper.tmp"
  chmod 755 "$helper.tmp" && mv "$helper.tmp" "$helper"
done
echo "setup: hsmfs $("$python" -c 'import hsmfs; print(hsmfs.__version__)') ready" >&2
