#!/bin/bash
# Stop the daemons started by ceph_up.sh (only the PIDs in DIR/run/*.pid), then optionally delete DIR.
# Order matters: radosgw first (it hangs on shutdown if the mon is already gone), then osd + mon
# together. Each daemon needs ~2 s after SIGTERM, so a clean stop takes ~4 s.
# --kill: SIGKILL everything at once (instant; fine for a throw-away memstore cluster).
# Usage: ceph_down.sh DIR [--rm] [--kill]   (shipped with hsmfs.bench; hsmfs/bench/ceph.py runs it)
D=$(realpath -m "${1:?usage: ceph_down.sh DIR [--rm] [--kill]}")
RM=0; SIG=TERM
for a in "${@:2}"; do case "$a" in --rm) RM=1;; --kill) SIG=KILL;; esac; done

alive() {  # running and not a zombie
  local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
stop() {  # stop NAME... in parallel, wait up to 15 s, then SIGKILL
  local pids=() name f p i any
  for name in "$@"; do
    f="$D/run/$name.pid"; [ -f "$f" ] || continue
    p=$(cat "$f"); alive "$p" || continue
    kill -$SIG "$p" && pids+=("$p") && echo "stopping $name ($p, SIG$SIG)"
  done
  for i in $(seq 150); do
    any=0; for p in "${pids[@]}"; do alive "$p" && any=1; done
    [ $any = 0 ] && return; sleep 0.1
  done
  for p in "${pids[@]}"; do alive "$p" && { echo "pid $p still alive, SIGKILL"; kill -KILL "$p"; }; done
}
stop client.rgw.a
stop osd.0 mon.a
[ $RM = 1 ] && rm -rf "$D" && echo "removed $D"
exit 0
