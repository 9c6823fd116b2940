#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munged, slurmctld, slurmd) for tests/test_slurm.py.
# Installs Debian's slurm-wlm and munge when missing (needs root). The configuration goes where every
# SLURM command looks for it, /etc/slurm/slurm.conf and gres.conf (srun inside a job drops SLURM_CONF, so
# another place does not work); an existing slurm.conf not written by this script is never overwritten.
# Spool, logs and PID files live in $OPD_SLURM_DIR (default /tmp/opd-slurm).
# Stop it with tests/slurm/stop_cluster.sh (which removes the two files again).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${OPD_SLURM_DIR:-/tmp/opd-slurm}"
CPUS="${OPD_SLURM_CPUS:-$(nproc)}"
MEM="${OPD_SLURM_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))}"
HOST="$(hostname -s)"
CONF=/etc/slurm/slurm.conf
MARK="# written by opd tests/slurm/start_cluster.sh"

if [ "$(id -u)" != 0 ]; then
    echo "start_cluster.sh: needs root (it runs munged, slurmctld and slurmd)" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "a cluster is already running from $STATE; run tests/slurm/stop_cluster.sh first" >&2
    exit 1
fi

rm -rf "$STATE/slurmctld" "$STATE/slurmd"  # a fresh cluster: no jobs or job ids from an earlier one
if [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -qxF "$MARK"; then
    echo "$CONF exists and was not written by this script: not touching a real cluster's configuration" >&2
    exit 1
fi
mkdir -p "$STATE/slurmctld" "$STATE/slurmd" "$STATE/log" "$STATE/munge" /etc/slurm
{ echo "$MARK"; sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" \
    -e "s|@CTLD_PORT@|${OPD_SLURM_CTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${OPD_SLURM_SLURMD_PORT:-6818}|g" \
    "$HERE/slurm.conf.in"; } > "$CONF"
# A GPU that is not there: lets the scheduler grant --gpus=1 so that GPU routing can be tested on CPUs.
printf '%s\nNodeName=%s Name=gpu File=/dev/null\n' "$MARK" "$HOST" > /etc/slurm/gres.conf

# munge: its own key (the package's, or a fresh one), socket and PID file under $STATE.
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge
chown munge:munge /run/munge "$STATE/munge"
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    echo started > "$STATE/munge/started-by-us"
fi

slurmctld
slurmd

for _ in $(seq 1 60); do
    if timeout 5 sinfo -h -N -o "%T" 2>/dev/null | grep -qx idle; then
        sinfo
        echo "SLURM cluster up ($CONF; logs in $STATE/log)"
        exit 0
    fi
    sleep 0.5
done
echo "the node did not become idle:" >&2
timeout 5 sinfo -N -l >&2 || true
tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
exit 1
