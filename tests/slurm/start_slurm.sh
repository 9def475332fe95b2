#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests/test_slurm.py: munge, MariaDB + slurmdbd (so that `sacct`
# works), slurmctld and slurmd with one partition "cpu" holding this host. Debian's slurm-wlm 22.05 (bookworm),
# used with snakemake-executor-plugin-slurm 2.8.0. Idempotent: exits at once when SLURM already answers.
# Needs root (it installs packages and starts daemons): exits 2 with a reason otherwise, 3 when the packages
# cannot be installed; 1 when the daemons do not come up (then see /var/log/slurm/).
set -euo pipefail
if sinfo -h >/dev/null 2>&1 && sacct -n -X >/dev/null 2>&1; then
  echo "SLURM is already running"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "starting SLURM needs root"; exit 2; }
export DEBIAN_FRONTEND=noninteractive
packages="slurm-wlm slurmdbd munge mariadb-server"
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get install -y -qq --no-install-recommends $packages >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $packages >/dev/null 2>&1; } \
    || { echo "cannot install $packages with apt-get"; exit 3; }
fi
host=$(hostname)
cpus=$(nproc)
mem=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/mysqld
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=fluxpipe
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
AccountingStoreFlags=job_comment
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 /etc/slurm/slurmdbd.conf
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
chown mysql:mysql /run/mysqld
pgrep mariadbd >/dev/null || (mysqld_safe >/var/log/slurm/mysqld.log 2>&1 &)
for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
mysql -u root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
  FLUSH PRIVILEGES;"
pgrep -x slurmdbd >/dev/null || slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -i add cluster fluxpipe >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -q idle && sacct -n -X >/dev/null 2>&1 && break; sleep 0.5; done
sinfo -h -o %T | grep -q idle || { echo "slurmd did not come up: see /var/log/slurm/"; exit 1; }
sacct -n -X >/dev/null || { echo "slurmdbd did not come up (sacct fails): see /var/log/slurm/slurmdbd.log"; exit 1; }
echo "SLURM is running: $(sinfo -h -o '%P %N %T')"
