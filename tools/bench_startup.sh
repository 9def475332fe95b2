#!/bin/bash
# The demo's main job and one job's start-up at given revisions (docs/benchmarks.md, "Per-job start-up"):
#   bash tools/bench_startup.sh REV [REV ...]   (run from the repository, its virtual environment active)
# For each revision: a fresh worktree in $TMPDIR, `snakemake --cores 1 train_lora` from nothing (wall time and
# jobs by rule), the import of the manifest stage, and three runs of one `fluxpipe manifest` job.
set -u
repo=$(git rev-parse --show-toplevel)
for rev in "$@"; do
  d=$(mktemp -d)/bench-$rev
  git -C "$repo" worktree add -f --detach "$d" "$rev" >/dev/null 2>&1
  cd "$d" && export PYTHONPATH=$d
  echo "== $(git log --oneline -1 | cut -c1-70)"
  /usr/bin/time -f "train_lora wall %e s" snakemake --cores 1 train_lora > sm.log 2>&1
  grep "train_lora wall" sm.log
  echo "jobs: $(grep -cE '^(local)?(rule|checkpoint) ' sm.log)"
  grep -E "^(local)?(rule|checkpoint) " sm.log | sort | uniq -c | tr '\n' ';'; echo
  python -c "import sys,time; t=time.time(); import fluxpipe.stages.manifest; print('import fluxpipe.stages.manifest: %.2f s, torch loaded: %s' % (time.time()-t, 'torch' in sys.modules))"
  settings=$(python -c 'import json, yaml; print(json.dumps(yaml.safe_load(open("config/config.yaml"))))')
  for _ in 1 2 3; do
    /usr/bin/time -f "fluxpipe manifest job %e s" fluxpipe manifest --config-json "$settings" --out "$d/m.parquet" 2>&1 | grep "job"
  done
  cd "$repo" && git worktree remove --force "$d"
done
