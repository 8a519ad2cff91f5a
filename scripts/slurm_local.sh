#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost (Debian/Ubuntu packages, started by hand, no systemd), to try the
# SLURM paths of docs/checkpointing.md on a laptop or a CI machine. Run as root. docs/slurm.md
#   bash scripts/slurm_local.sh install   # apt packages: munge, slurmctld, slurmd, slurm-client, slurmdbd, mariadb
#   bash scripts/slurm_local.sh start     # write /etc/slurm, start the daemons, cancel jobs left from an earlier
#                                         # cluster (the saved state), wait until the node takes jobs
#   bash scripts/slurm_local.sh status    # the daemons this script started, and sinfo
#   bash scripts/slurm_local.sh stop      # cancel all jobs, stop only the daemons this script started (by PID)
# Partition `debug`, node `$(hostname -s)`. Knobs:
#   SLURM_LOCAL_CPUS=N                   CPUs the node offers (default: nproc, at least 8). More than the machine has
#                                        lets short, mostly idle jobs (tests/test_slurm.py's) run side by side:
#                                        nothing binds tasks to cores here
#   SLURM_LOCAL_ACCOUNTING=0             no slurmdbd + MariaDB: faster, but no `sacct`, and submitit (hydra/launcher=
#                                        slurm) then never notices a job that ends without a result (scancel, timeout)
# Traps this config avoids (docs/slurm.md): a requeued job waits cred_expire+1 s (default 121 s) before it
# may start again, and the scheduler's default 60 s / 30 s passes add up to that; memory as a consumable resource
# gives every job the whole node.
set -euo pipefail

CPUS=${SLURM_LOCAL_CPUS:-$(($(nproc) > 8 ? $(nproc) : 8))}
ACCT=${SLURM_LOCAL_ACCOUNTING:-1}
RUNDIR=/run/slurm-local  # the PIDs of the daemons this script started
LOGDIR=/var/log/slurm
HN=$(hostname -s)

log() { echo "[slurm_local $(date +%T)] $*" >&2; }

wait_for() {  # wait_for SECONDS WHAT CMD...
  local end=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then log "gave up waiting for $what"; return 1; fi
    sleep 0.2
  done
}

running() {  # running NAME PIDFILE: PIDFILE names a live process called NAME
  [ -s "$2" ] && [ "$(cat "/proc/$(cat "$2")/comm" 2>/dev/null)" = "$1" ]
}

packages() {
  echo munge slurmctld slurmd slurm-client
  if [ "$ACCT" = 1 ]; then echo slurmdbd mariadb-server; fi
}

do_install() {
  # shellcheck disable=SC2046
  if dpkg -s $(packages) >/dev/null 2>&1; then log "packages already installed"; return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2046
  apt-get install -y -qq --no-install-recommends $(packages) >/dev/null
  log "installed $(packages)"
}

write_configs() {
  local mem overrides=""
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)  # MB; more than the machine has drains it
  if ((CPUS > $(nproc))); then overrides="SlurmdParameters=config_overrides"; fi
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
  cat >/etc/slurm/slurm.conf <<EOF
# One-node cluster on localhost, written by scripts/slurm_local.sh
ClusterName=local
SlurmctldHost=$HN(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire+1 s before it may start again (default 121 s)
AuthInfo=cred_expire=10
# scheduler passes every 2 s / backfill every 1 s (defaults 60 / 30): a requeued job starts within ~12 s
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
# CR_Core: memory is not consumed, so a job without --mem does not take the whole node
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
InactiveLimit=0
MinJobAge=300
KillWait=5
OverTimeLimit=0
Waittime=0
$overrides
EOF
  if [ "$ACCT" = 1 ]; then
    printf '%s\n' AccountingStorageType=accounting_storage/slurmdbd AccountingStorageHost=localhost \
      AccountingStoragePort=6819 >>/etc/slurm/slurm.conf
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmlocal
StorageLoc=slurm_acct_db
EOF
    chmod 600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a config others can read
  else
    echo AccountingStorageType=accounting_storage/none >>/etc/slurm/slurm.conf
  fi
  printf '%s\n' "NodeName=$HN NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN" \
    "PartitionName=debug Nodes=$HN Default=YES MaxTime=INFINITE State=UP" >>/etc/slurm/slurm.conf
}

start_daemon() {  # start_daemon NAME PIDFILE CMD...: CMD forks into the background and writes PIDFILE
  local name=$1 pidfile=$2
  shift 2
  if running "$name" "$pidfile"; then log "$name is already running, not started by this script: stop it first"; return 1; fi
  rm -f "$pidfile"
  "$@"
  wait_for 30 "$name to write $pidfile" running "$name" "$pidfile"
  cp "$pidfile" "$RUNDIR/$name.pid"
}

no_jobs() { [ -z "$(squeue -h -o %i)" ]; }

cancel_all_jobs() {  # prints the ids of the jobs it cancelled
  local jobs
  jobs=$(squeue -h -o %i | tr '\n' ' ')
  # shellcheck disable=SC2086
  if [ -n "$jobs" ]; then scancel $jobs; fi
  echo "$jobs"
}

# Idle; or mixed with no job at all: a job that was running when an earlier cluster died, once cancelled, may keep
# its CPUs counted for minutes (seen: until the start script exits); the node is mixed then, and takes new jobs
node_ready() {
  local state
  state=$(sinfo -h -N -n "$HN" -o %T)
  [ "$state" = idle ] || { [ "$state" = mixed ] && no_jobs; }
}

all_running() {
  local d
  for d in munged slurmctld slurmd; do running "$d" "$RUNDIR/$d.pid" || return 1; done
}

do_start() {
  local t0=$SECONDS
  if all_running; then log "already running"; return; fi
  mkdir -p "$RUNDIR"
  write_configs
  if [ ! -s /etc/munge/munge.key ]; then  # the munge package creates one; make sure
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  start_daemon munged /run/munge/munged.pid runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge munge -n

  if [ "$ACCT" = 1 ]; then
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >>"$LOGDIR/mariadb.log" 2>&1
    if running mariadbd /run/mysqld/mysqld.pid; then log "mariadbd is already running, not started by this script"; return 1; fi
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --skip-log-bin --innodb-buffer-pool-size=64M \
      --pid-file=/run/mysqld/mysqld.pid >>"$LOGDIR/mariadb.log" 2>&1 </dev/null &
    wait_for 60 mariadb mariadb-admin --silent ping
    wait_for 10 "the mariadb pid file" running mariadbd /run/mysqld/mysqld.pid
    cp /run/mysqld/mysqld.pid "$RUNDIR/mariadbd.pid"
    mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
                CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmlocal';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    start_daemon slurmdbd /run/slurmdbd.pid /usr/sbin/slurmdbd
    wait_for 60 slurmdbd sacctmgr -n show cluster
    sacctmgr -n -P show cluster format=cluster | grep -qx local || sacctmgr -i add cluster local >/dev/null
  fi

  start_daemon slurmctld /run/slurmctld.pid /usr/sbin/slurmctld
  start_daemon slurmd /run/slurmd.pid /usr/sbin/slurmd
  wait_for 30 "slurmctld to answer" squeue -h
  # Jobs of an earlier cluster that was not stopped (killed daemons, a machine reused) come back from the saved
  # state and would take the node: a started cluster holds no job but the ones submitted to it
  local leftover
  leftover=$(cancel_all_jobs)
  if [ -n "$leftover" ]; then log "cancelled jobs left from an earlier cluster: $leftover"; fi
  if ! wait_for 60 "node $HN to be ready" node_ready; then
    sinfo -N -l >&2 || true
    squeue >&2 || true
    tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
    return 1
  fi
  log "up in $((SECONDS - t0)) s: partition debug, node $HN, $CPUS CPUs, accounting=$ACCT"
}

do_stop() {
  local d pid
  if running slurmctld "$RUNDIR/slurmctld.pid"; then
    cancel_all_jobs >/dev/null || true
    wait_for 30 "the jobs to end" no_jobs || true
  fi
  for d in slurmd slurmctld slurmdbd mariadbd munged; do  # the reverse of the start order
    [ -f "$RUNDIR/$d.pid" ] || continue
    if running "$d" "$RUNDIR/$d.pid"; then
      pid=$(cat "$RUNDIR/$d.pid")
      kill -TERM "$pid"
      wait_for 30 "$d ($pid) to exit" eval "! kill -0 $pid" || kill -KILL "$pid" || true
      log "stopped $d ($pid)"
    fi
    rm -f "$RUNDIR/$d.pid"
  done
  rmdir "$RUNDIR" 2>/dev/null || true
}

do_status() {
  local d
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    if running "$d" "$RUNDIR/$d.pid"; then echo "$d: running, pid $(cat "$RUNDIR/$d.pid")"; else echo "$d: -"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
