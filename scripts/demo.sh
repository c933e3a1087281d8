#!/usr/bin/env bash
# The whole mtool pipeline on a fresh machine, CPU only, nothing downloaded: sets up .venv, then runs
# `mtool demo` (a tiny base pre-trained on the spot, two QLoRA skills, adapter merges, model merges, an
# adapter combination, scored, named and carded). Usage: bash scripts/demo.sh [OUT] [--quick] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/mtool demo "$@"
