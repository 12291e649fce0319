#!/usr/bin/env bash
# The whole test suite, as CI runs it: notebooks and package in sync, notebook tests, then pytest (its line closes the run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0 MPLBACKEND=Agg

echo "== nbdev_clean + nbdev_export must leave no diff"
nbdev_clean
nbdev_export
if [ -d .git ] && [ -n "$(git status --porcelain)" ]; then
  git status --porcelain; git --no-pager diff --stat
  echo "FAIL: notebooks and exported package are out of sync (run nbdev_clean && nbdev_export and commit)"; exit 1
fi

echo "== nbdev_test (skipping flags: $(grep '^tst_flags' settings.ini | cut -d= -f2))"
# two notebooks at a time on 2 cores: one BLAS thread each (oversubscribed MKL makes tiny matmuls 100x slower)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nbdev_test --n_workers "${NBDEV_WORKERS:-2}" --timing

echo "== README and docs sources"
python3 scripts/readme.py --check
docs_log=$(mktemp)   # nbdev's processing warns loudly on stderr; show it only when the check fails
if ! python3 scripts/check_docs.py 2>"$docs_log"; then tail -60 "$docs_log"; echo "FAIL: docs processing"; exit 1; fi

echo "== pytest"
python3 -m pytest -q -p no:randomly "$@"
