#!/usr/bin/env bash
# The test command: sets up .venv (with llama.cpp's Python binding, and the mergekit reference venv) on a fresh
# machine, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k checkpoint -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
MTOOL_MERGEKIT=${MTOOL_MERGEKIT:-1} MTOOL_LLAMA_CPP=${MTOOL_LLAMA_CPP:-1} bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
