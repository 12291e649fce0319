#!/usr/bin/env bash
# The whole test suite, as CI runs it: notebooks and package in sync, lint, notebook tests, docs (built and opened in a
# headless browser), then pytest (its line closes the run).
# DOCS_BROWSER=0 skips the browser part of the docs check (CI keeps it: about 2 minutes for every page).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0 MPLBACKEND=Agg
t0=$SECONDS; lap() { echo "   ($(( SECONDS - t0 )) s so far)"; }

echo "== nbdev_clean + nbdev_export must leave no diff"
nbdev_clean
nbdev_export
if [ -d .git ] && [ -n "$(git status --porcelain)" ]; then
  git status --porcelain; git --no-pager diff --stat
  echo "FAIL: notebooks and exported package are out of sync (run nbdev_clean && nbdev_export and commit)"; exit 1
fi

echo "== ruff (pyflakes rules) on the exported package"
ruff check --select F --no-cache tensormem
lap

echo "== nbdev_test (skipping flags: $(grep '^tst_flags' settings.ini | cut -d= -f2))"
# two notebooks at a time on 2 cores: one BLAS thread each (oversubscribed MKL makes tiny matmuls 100x slower)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nbdev_test --n_workers "${NBDEV_WORKERS:-2}" --timing
lap

echo "== README and docs: processed, rendered, $([ "${DOCS_BROWSER:-1}" = 0 ] && echo "not opened" || echo "opened in headless Chromium")"
python3 scripts/readme.py --check
docs_log=$(mktemp)   # nbdev's processing warns loudly on stderr; show it only when the check fails
if ! OMP_NUM_THREADS=1 python3 scripts/check_docs.py $([ "${DOCS_BROWSER:-1}" = 0 ] || echo --browser) 2>"$docs_log"; then
  tail -60 "$docs_log"; echo "FAIL: docs check"; exit 1
fi
lap

echo "== pytest"
python3 -m pytest -q -p no:randomly "$@"
