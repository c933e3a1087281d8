#!/usr/bin/env bash
# The test command: sets up .venv (with llama.cpp's Python binding) and the mergekit reference venv on a fresh
# machine, then runs pytest. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k checkpoint -x`. Without
# arguments (CI), the suite is followed by the slow tier: property-based fuzzing of the parsers of untrusted input
# (`pytest -m fuzz`, MTOOL_FUZZ_EXAMPLES examples per target, default 10,000; about two minutes of CPU on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export MTOOL_EXTRAS=${MTOOL_EXTRAS:-test,harness}  # harness: lm-eval, the reference of the `mtool eval --lm-eval` test
MTOOL_MERGEKIT=${MTOOL_MERGEKIT:-1} MTOOL_LLAMA_CPP=${MTOOL_LLAMA_CPP:-1} bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
exec .venv/bin/python -m pytest -q -m fuzz
