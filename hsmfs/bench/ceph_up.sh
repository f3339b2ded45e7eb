#!/bin/bash
# Minimal throw-away Ceph Pacific (16.2, Debian bookworm) cluster for S3 tests:
#   1 mon + 1 osd (memstore by default, or bluestore on a sparse file) + 1 radosgw (beast on 127.0.0.1)
# No mgr, no cephx, no systemd. Everything lives under $D; daemons run as the invoking user (tested as root).
# Usage: ceph_up.sh DIR ; env: OBJECTSTORE=memstore|bluestore  RGW_PORT=7480  MON_PORT=3300  MEM_BYTES=...
# Stop:  ceph_down.sh DIR [--rm] [--kill]
# Shipped with hsmfs.bench (hsmfs/bench/ceph.py runs it and polls RGW for readiness itself, so this
# script needs no curl).
set -euo pipefail
D=$(realpath -m "${1:?usage: ceph_up.sh DIR}")
OBJECTSTORE=${OBJECTSTORE:-memstore}
RGW_PORT=${RGW_PORT:-7480}
MON_PORT=${MON_PORT:-3300}
MEM_BYTES=${MEM_BYTES:-4294967296}          # memstore capacity (RAM!) / bluestore file size
AK=${AK:-hsmfsaccesskey}
SK=${SK:-hsmfssecretkey}
T0=$(date +%s.%N)
ts() { awk -v a="$(date +%s.%N)" -v b="$T0" -v m="$*" 'BEGIN{printf "[%6.2fs] %s\n", a-b, m}'; }
uuid() { cat /proc/sys/kernel/random/uuid; }

if [ -e "$D" ]; then echo "refusing: $D exists (run ceph_down.sh and remove it)"; exit 1; fi
mkdir -p "$D"/{mon.a,osd.0,run,log,rgw}
FSID=$(uuid)
CONF="$D/ceph.conf"
cat > "$CONF" <<EOF
[global]
fsid = $FSID
mon_host = v2:127.0.0.1:$MON_PORT
public_network = 127.0.0.0/8
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
run_dir = $D/run
admin_socket = $D/run/\$name.asok
pid_file = $D/run/\$name.pid
log_file = $D/log/\$name.log
keyring = /dev/null
# daemons (radosgw) default to ms_mon_client_mode=secure, which auth=none cannot provide -> EACCES (-13)
ms_mon_client_mode = crc secure
[mon]
mon_data = $D/mon.\$id
mon_initial_members = a
mon_cluster_log_file = $D/log/cluster.log
# the mon batches map changes every paxos_propose_interval (1 s default); RGW's first start issues
# ~10 pool commands serially, so this shortens cluster bring-up by ~8 s
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
[osd]
osd_data = $D/osd.\$id
osd_objectstore = $OBJECTSTORE
memstore_device_bytes = $MEM_BYTES
bluestore_block_path = $D/osd.\$id/block.file
bluestore_block_size = $MEM_BYTES
bluestore_block_create = true
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
osd_memory_target = 1073741824
[client.rgw.a]
# tcp_nodelay=1: without it every small GET waits ~40 ms (Nagle + delayed ACK)
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
rgw_data = $D/rgw
rgw_enable_usage_log = false
EOF
C="-c $CONF"

# --- mon ---
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
ceph-mon $C --mkfs -i a --monmap "$D/monmap" >/dev/null
ceph-mon $C -i a
ts "mon started"
timeout 60 ceph $C mon stat >/dev/null
ts "mon quorum"

# --- osd ---
OSD_UUID=$(uuid)
OSD_ID=$(ceph $C osd new "$OSD_UUID")
ceph-osd $C -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >/dev/null 2>&1
ceph-osd $C -i "$OSD_ID"
for i in $(seq 600); do
  ceph $C osd stat 2>/dev/null | grep -q '1 up' && break; sleep 0.1
done
ts "osd.$OSD_ID up ($OBJECTSTORE)"

# --- rgw ---
radosgw $C -n client.rgw.a
ts "radosgw started"
# user creation works as soon as RGW has created its pools; retry until then
for i in $(seq 600); do
  radosgw-admin $C -n client.admin user create --uid=hsmfs --display-name=hsmfs \
      --access-key="$AK" --secret-key="$SK" >/dev/null 2>&1 && break
  radosgw-admin $C -n client.admin user info --uid=hsmfs >/dev/null 2>&1 && break
  sleep 0.2
done
ts "user created (access=$AK secret=$SK)"
echo "CEPH_CONF=$CONF"
echo "RGW_ENDPOINT=http://127.0.0.1:$RGW_PORT"
