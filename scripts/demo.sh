#!/usr/bin/env bash
# A first look at mtool on a fresh machine (sets up .venv, CPU only, no download): builds a tiny base model and
# two fine-tunes, merges them with TIES and SLERP, and shows what came out (weights, config, lineage).
# Usage: bash scripts/demo.sh [OUT]   (default OUT: demo-out; an existing OUT is replaced)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=$(realpath -m "${1:-demo-out}")
mkdir -p "$out"
.venv/bin/python - "$out" <<'PY'
import sys
from pathlib import Path
from mtool.tinymodels import make_tiny_finetune, make_tiny_model
out = Path(sys.argv[1])
base = make_tiny_model(out / "tiny-base", license="apache-2.0")
for seed in (1, 2):
    make_tiny_finetune(base, out / f"tiny-ft{seed}", seed=seed)
for method, body in {
    "ties": "base_model: {o}/tiny-base\nmodels:\n  - model: {o}/tiny-ft1\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "  - model: {o}/tiny-ft2\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    "slerp": "base_model: {o}/tiny-ft1\nmodels:\n  - model: {o}/tiny-ft1\n  - model: {o}/tiny-ft2\n"
             "parameters:\n  t: [0.2, 0.8]\n",
}.items():
    (out / f"{method}.yaml").write_text(f"merge_method: {method}\n" + body.format(o=out) + "dtype: float32\n")
print(f"built tiny models and recipes in {out}", file=sys.stderr)
PY
for method in ties slerp; do
  .venv/bin/mtool merge "$out/$method.yaml" "$out/merged-$method" --force --seed 1
  .venv/bin/mtool info "$out/merged-$method"
done
.venv/bin/python - "$out" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from mtool.lineage import read_lineage
out = sys.argv[1]
for method in ("ties", "slerp"):
    folder = f"{out}/merged-{method}"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    record = read_lineage(folder)
    print(f"{method}: loads in transformers, logits {tuple(logits.shape)}; lineage: {record.operation} "
          f"{record.method}, parents {[p.role for p in record.parents]}, seed {record.seed}, "
          f"{record.parameter_count:,} parameters")
PY
