#!/usr/bin/env bash
# Stops the single-node SLURM that tests/slurm/start_slurm.sh started: slurmd, slurmctld, slurmdbd, MariaDB and
# munge (the test calls it when it started them itself; a cluster that was already running is left alone).
set -uo pipefail
for daemon in slurmd slurmctld slurmdbd; do
  pkill -x "$daemon" 2>/dev/null
done
mysqladmin shutdown >/dev/null 2>&1 || pkill -x mariadbd 2>/dev/null
pkill -x munged 2>/dev/null
for _ in $(seq 40); do
  pgrep -x 'slurmd|slurmctld|slurmdbd|mariadbd|munged' >/dev/null || exit 0
  sleep 0.25
done
echo "still running: $(pgrep -a -x 'slurmd|slurmctld|slurmdbd|mariadbd|munged' | tr '\n' ' ')"
exit 1
