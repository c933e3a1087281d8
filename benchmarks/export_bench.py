"""mtool export gguf beside llama.cpp's own convert_hf_to_gguf.py: wall time, peak memory, identical tensors.

    .venv/bin/python benchmarks/export_bench.py [--layers 22] [--types q8_0,f16] [--repeats 3]
                                                [--llama-cpp DIR] [--convert-python PYTHON]

The model is TinyLlama-1.1B-shaped, bf16, with merge_bench's shapes (hidden 2048, intermediate 5632, 22 layers, 32
heads, 4 KV heads, vocabulary 32000; 1GB shards; built once into benchmarks/_work/) and a byte-level BPE tokenizer
trained on the spot. Both tools convert the same folder to the same type, each in its own process started after
``sync``, the page cache warm; wall time is the median of the repeats (interpreter start and imports included,
as a user sees it), peak memory the child's maximum resident set. mtool also hashes its output into the lineage
record and writes a card; llama.cpp's converter does neither.

llama.cpp's converter is the one in the llama.cpp sources of the installed llama-cpp-python release (its sdist,
fetched with ``pip download`` into benchmarks/_work/ unless ``--llama-cpp`` names a llama.cpp checkout), run with
its own bundled gguf-py. Two things are set for it, neither touching the conversion: the pre-tokenizer name of the
tokenizer trained on the spot (llama.cpp identifies pre-tokenizers by hashing a known model's output, and this one
is nobody's: ``gpt-2``, which mtool finds from its structure), and, when sentencepiece is not installed, the
"no tokenizer.model" answer it would give with it (the model has none). Prints a markdown table; the last column
says whether the two files hold the same tensors, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.merge_bench import SHAPE, run_measured, tensor_shapes  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "export"
LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
WRAPPER = """
import importlib.util, runpy, sys
from pathlib import Path
root = Path(sys.argv.pop(1))
sys.path.insert(0, str(root))
sys.path.insert(1, str(root / "gguf-py"))
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # a tokenizer trained on the spot
if importlib.util.find_spec("sentencepiece") is None:
    def no_tokenizer_model(self):
        raise FileNotFoundError(self.dir_model / "tokenizer.model")  # as with sentencepiece: the model has none
    base.TextModel._create_vocab_sentencepiece = no_tokenizer_model
sys.argv[0] = str(root / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_sources(given: str | None) -> Path:
    """A llama.cpp source tree with convert_hf_to_gguf.py: ``given``, or the installed release's, fetched once."""
    if given:
        root = Path(given)
    else:
        root = WORK / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        if not (root / "convert_hf_to_gguf.py").is_file():
            WORK.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(WORK)], check=True)
            with tarfile.open(WORK / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
                archive.extractall(WORK, filter="data")
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"no convert_hf_to_gguf.py in {root}")
    return root


def build_model(layers: int) -> Path:
    """The bf16 TinyLlama-shaped model with a tokenizer (cached)."""
    import torch
    from transformers import LlamaConfig

    from mtool.io.writing import CheckpointWriter, TensorSpec
    from mtool.tinymodels import build_tokenizer

    folder = WORK / f"layers{layers}" / "model"
    if (folder / "config.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = tensor_shapes(layers)
    with CheckpointWriter(folder, [TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()],
                          max_shard_bytes=1000**3) as writer:
        for index, (name, shape) in enumerate(shapes.items()):
            values = (1 + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(index))
                      if len(shape) == 1 else torch.randn(shape, generator=torch.Generator().manual_seed(index)) * 0.02)
            writer.write(name, values.to(torch.bfloat16))
    LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, tie_word_embeddings=False, dtype="bfloat16",
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    print(f"built {folder}", file=sys.stderr)
    return folder


def tensors_identical(first: Path, second: Path) -> bool:
    import gguf

    def tensors(path: Path) -> dict[str, tuple]:
        return {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}

    return tensors(first) == tensors(second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--types", default="q8_0,f16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-cpp", help="a llama.cpp source tree (default: the installed release's sources)")
    parser.add_argument("--convert-python", default=sys.executable,
                        help="the Python that runs convert_hf_to_gguf.py (torch, transformers, numpy, ...)")
    args = parser.parse_args()
    types = [t.strip().lower() for t in args.types.split(",")]
    unknown = [t for t in types if t not in CONVERTER_TYPES]
    if unknown:
        raise SystemExit(f"convert_hf_to_gguf.py writes {', '.join(CONVERTER_TYPES)}, not {', '.join(unknown)}")
    sources = llama_cpp_sources(args.llama_cpp)
    model = build_model(args.layers)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    wrapper = WORK / "run_convert.py"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(WRAPPER, encoding="utf-8")
    rows, runs = [], []
    for type_name in types:
        mtool_out, reference = WORK / f"mtool-{type_name}", WORK / f"llama-cpp-{type_name}.gguf"
        mtool_command = [sys.executable, "-m", "mtool.cli", "-q", "export", "gguf", str(model), str(mtool_out),
                         "--type", type_name, "--force", "--name", "Llama-1.1B-Bench-SFT-v1.0"]
        convert_command = [args.convert_python, str(wrapper), str(sources), str(model), "--outfile", str(reference),
                           "--outtype", type_name]
        measured: dict[str, list[tuple[float, float]]] = {"mtool": [], "llama.cpp": []}
        for _ in range(args.repeats):  # interleaved, so both see the same state of the machine
            measured["mtool"].append(run_measured(mtool_command))
            reference.unlink(missing_ok=True)
            measured["llama.cpp"].append(run_measured(convert_command))
        runs.append({"type": type_name, **{tool: values for tool, values in measured.items()}})
        (mtool_file,) = mtool_out.glob("*.gguf")
        mine, theirs = (statistics.median(w for w, _ in measured[t]) for t in ("mtool", "llama.cpp"))
        mine_rss, theirs_rss = (max(r for _, r in measured[t]) for t in ("mtool", "llama.cpp"))
        rows.append(f"| {type_name.upper()} | {theirs:.1f} | {mine:.1f} | {theirs / mine:.2f}x | {theirs_rss:.2f} GiB "
                    f"| {mine_rss:.2f} GiB | {mine_rss / theirs_rss:.2f} | "
                    f"{'yes' if tensors_identical(mtool_file, reference) else 'no'} |")
    print(json.dumps(runs), file=sys.stderr)
    print(f"{args.layers}-layer TinyLlama-shaped bf16 model ({size:.2f} GB), median of {args.repeats} runs\n")
    print("| type | convert_hf_to_gguf.py s | mtool s | speed-up | convert peak RSS | mtool peak RSS | RSS ratio "
          "| same tensors |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
