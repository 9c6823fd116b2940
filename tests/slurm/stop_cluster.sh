#!/usr/bin/env bash
# Stop what start_cluster.sh started: cancel leftover jobs, stop slurmd, slurmctld and (if we started it)
# munged, by their PID files under $OPD_SLURM_DIR (default /tmp/opd-slurm), and remove the
# /etc/slurm/slurm.conf and gres.conf it wrote. Keeps the logs in $OPD_SLURM_DIR/log.
set -uo pipefail
STATE="${OPD_SLURM_DIR:-/tmp/opd-slurm}"
MARK="# written by opd tests/slurm/start_cluster.sh"

stop() {  # stop <name> <pidfile>
    local pid
    [ -f "$2" ] || return 0
    pid="$(cat "$2")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stopped $1 ($pid)"
    fi
    rm -f "$2"
}

if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
    sleep 1
fi
stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
if [ -f "$STATE/munge/started-by-us" ]; then
    stop munged "$STATE/munge/munged.pid"
    rm -f "$STATE/munge/started-by-us"
fi
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [ -f "$f" ] && head -n 1 "$f" | grep -qxF "$MARK"; then rm -f "$f"; fi
done
