"""``mtool export gguf`` without llama.cpp: what the file says (read back with gguf-py's ``GGUFReader``), its
tensors against the source weights, the streaming writer against gguf-py's own, names, cards, adapters, shards,
and every refusal. (Running the files in llama.cpp: test_export_gguf_llama_cpp.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mtool.errors import InputError, OutputExistsError
from mtool.export.gguf_export import GGUFExportOptions, export_gguf
from mtool.io.reading import open_checkpoint
from mtool.lineage import read_lineage
from mtool.naming.lint import lint_name
from tests.support.publishable import NAME, licensed_merge


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _tensors(path: Path) -> dict[str, tuple[Q, np.ndarray]]:
    """GGUF name -> (encoding, float32 values in row-major shape)."""
    reader = gguf.GGUFReader(path)
    found = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        found[tensor.name] = (tensor.tensor_type, values.reshape([int(n) for n in reversed(tensor.shape)]))
    return found


def _readme_license(folder: Path, license_id: str) -> None:
    (folder / "README.md").write_text(f"---\nlicense: {license_id}\n---\n", encoding="utf-8")


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    return licensed_merge(tmp_path_factory.mktemp("gguf-merge"))




def test_files_are_named_by_the_schema_and_the_gguf_convention(merged: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / f"{NAME}-GGUF"
    result = run_cli("export", "gguf", merged, out, "--type", "q8_0,f16", "--type", "bf16")
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert files == [f"{NAME}-{t}.gguf" for t in ("BF16", "F16", "Q8_0")]
    assert f"{NAME}-Q8_0.gguf" in result.output
    for file in files:  # the GGUF file name is a name of the schema with its encoding part
        assert lint_name(file.removesuffix(".gguf")).ok
        decomposed = lint_name(file.removesuffix(".gguf")).parts
        assert (decomposed.label, decomposed.method, decomposed.version) == ("AlphaBeta", "TIES", "v1.0")
    # the folder is named by its card and lints against itself (encoding GGUF, Method from the merge it holds)
    report = lint_name(out.name, out)
    assert report.ok and not [f for f in report.findings if f.severity != "info"], report.findings
    assert not (out / ".merged-model").exists() and not list(tmp_path.glob(".*partial*"))


def test_metadata_reads_back_with_gguf_reader(merged: Path, tmp_path: Path) -> None:
    export_gguf(str(merged), tmp_path / "out", GGUFExportOptions(types=("q8_0",)))
    fields = _fields(tmp_path / "out" / f"{NAME}-Q8_0.gguf")
    expected = {
        "general.architecture": "llama", "general.type": "model", "general.name": NAME, "general.basename": "Llama",
        "general.size_label": "123K", "general.finetune": "AlphaBeta-TIES", "general.version": "v1.0",
        "general.license": "apache-2.0", "general.base_model.count": 3, "general.base_model.0.name": "base",
        "general.base_model.1.name": "Alpha", "general.base_model.2.name": "Beta",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "general.quantization_version": 2,
        "llama.block_count": 2, "llama.context_length": 512, "llama.embedding_length": 64,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16, "llama.rope.dimension_count": 16, "llama.vocab_size": 384,
        "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 3,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert abs(fields["llama.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    assert "<|assistant|>" in fields["tokenizer.chat_template"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 384 and tokens[:3] == ["<unk>", "<s>", "</s>"]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:8] == [int(gguf.TokenType.CONTROL)] * 8 and types[100] == int(gguf.TokenType.NORMAL)
    merges = json.loads((merged / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    record = read_lineage(tmp_path / "out")
    assert record.operation == "export" and record.method == "gguf"
    assert record.parents[0].lineage.method == "ties" and record.parameter_count == 123_200


def _permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order written index by index: within each head, row i of the first half then row i of the
    second half (an independent spelling of the converter's reshape/swapaxes)."""
    head_dim = weight.shape[0] // heads
    order = [h * head_dim + half * (head_dim // 2) + i for h in range(heads) for i in range(head_dim // 2)
             for half in (0, 1)]
    return weight[order]


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_f32_tensors_are_the_source_weights_converted(tiny, tmp_path: Path, architecture: str) -> None:
    source = tiny.model(architecture, tie=architecture == "gemma2")
    export_gguf(str(source), tmp_path / "out", GGUFExportOptions(types=("f32",)))
    (path,) = (tmp_path / "out").glob("*.gguf")
    written = _tensors(path)
    checkpoint = open_checkpoint(source)
    weights = {name: checkpoint.read(name).float() for name in checkpoint.names}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if architecture == "llama" else gguf.MODEL_ARCH.GEMMA2, 2)
    # Gemma 2's head is its embedding: a stored (tied) lm_head is not written
    expected_count = len(weights) - (architecture == "gemma2" and "lm_head.weight" in weights)
    assert len(written) == expected_count
    for name, weight in weights.items():
        if architecture == "gemma2" and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        encoding, values = written[target]
        assert encoding == Q.F32
        if architecture == "llama" and ".q_proj." in name:
            weight = _permuted(weight, 4)
        elif architecture == "llama" and ".k_proj." in name:
            weight = _permuted(weight, 2)
        elif architecture == "gemma2" and name.endswith("norm.weight"):
            weight = weight + 1  # transformers' Gemma norm multiplies by (1 + w)
        assert torch.equal(torch.from_numpy(values.copy()), weight), name


def test_q8_0_blocks_are_within_half_a_step_of_the_weights(tiny, tmp_path: Path) -> None:
    """Q8_0 stores each block of 32 values as q = round(x / d) with d = max|x| / 127, and d in float16: every value
    comes back within d / 2 + 127 |d - float16(d)|."""
    source = tiny.model("qwen3", tie=True, head_dim=32)
    export_gguf(str(source), tmp_path / "out", GGUFExportOptions(types=("q8_0",)))
    (path,) = (tmp_path / "out").glob("*.gguf")
    written = _tensors(path)
    checkpoint = open_checkpoint(source)
    down = checkpoint.read("model.layers.1.mlp.down_proj.weight").double()
    encoding, values = written["blk.1.ffn_down.weight"]
    assert encoding == Q.Q8_0
    blocks = down.reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True).float() / 127
    stored = torch.from_numpy(step.numpy().astype(np.float16).astype(np.float64))
    bound = step.double() / 2 + 127 * (stored - step.double()).abs()
    error = (torch.from_numpy(values.astype(np.float64)).reshape(-1, 32) - blocks).abs()
    assert bool((error <= bound + 1e-9).all()) and error.max() > 0
    assert written["blk.0.attn_q_norm.weight"][0] == Q.F32  # vectors stay float32


def test_rows_that_are_not_whole_blocks_are_written_f16(tiny, tmp_path: Path) -> None:
    source = tiny.model("llama", hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=2)
    export_gguf(str(source), tmp_path / "out", GGUFExportOptions(types=("q4_0",)))
    (path,) = (tmp_path / "out").glob("*.gguf")
    encodings = {name: encoding for name, (encoding, _) in _tensors(path).items()}
    assert encodings["blk.0.ffn_gate.weight"] == Q.F16  # rows of 48 values: not whole blocks of 32
    assert encodings["blk.0.ffn_down.weight"] == Q.Q4_0  # rows of 96: three blocks
    assert encodings["blk.0.attn_norm.weight"] == Q.F32


def test_blocks_of_rows_give_the_same_file_as_whole_tensors(tiny, tmp_path: Path, monkeypatch) -> None:
    from mtool.export import gguf_tensors

    source = tiny.model("llama", hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=2)
    export_gguf(str(source), tmp_path / "whole", GGUFExportOptions(types=("q8_0", "f32")))
    monkeypatch.setattr(gguf_tensors, "BLOCK_ELEMENTS", 300)  # 2 rows per job; whole heads (16 rows) for Q/K
    export_gguf(str(source), tmp_path / "blocks", GGUFExportOptions(types=("q8_0", "f32")))
    for path in (tmp_path / "whole").glob("*.gguf"):
        assert path.read_bytes() == (tmp_path / "blocks" / path.name).read_bytes()


def test_the_streaming_writer_writes_what_gguf_py_writes(tmp_path: Path) -> None:
    from mtool.export.gguf_file import GGUFFileWriter

    generator = np.random.default_rng(0)
    tensors = {"a.weight": generator.standard_normal((3, 64)).astype(np.float32),
               "b.weight": gguf.quants.quantize(generator.standard_normal((5, 64)).astype(np.float32), Q.Q8_0),
               "c.bias": generator.standard_normal(7).astype(np.float32)}

    def writer() -> gguf.GGUFWriter:
        made = gguf.GGUFWriter(None, "llama")
        made.add_uint32("test.value", 7)
        return made

    reference = writer()
    for name, values in tensors.items():
        reference.add_tensor(name, values, raw_dtype=Q.Q8_0 if name == "b.weight" else None)
    reference.write_header_to_file(tmp_path / "reference.gguf")
    reference.write_kv_data_to_file()
    reference.write_tensors_to_file()
    reference.close()
    streamed = writer()
    for name, values in tensors.items():
        streamed.add_tensor_info(name, values.shape, values.dtype, values.nbytes,
                                 raw_dtype=Q.Q8_0 if name == "b.weight" else None)
    with GGUFFileWriter(streamed, tmp_path / "streamed.gguf") as out:
        for name, values in tensors.items():
            flat = torch.from_numpy(values.reshape(-1).view(np.uint8).copy())
            half = len(flat) // 2
            out.write_part(name, 0, flat[:half])  # in two parts
            out.write_part(name, half, flat[half:])
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "reference.gguf").read_bytes()
    import hashlib

    assert out.digests == {"streamed.gguf": hashlib.sha256((tmp_path / "reference.gguf").read_bytes()).hexdigest()}


def test_shards_are_named_split_and_hashed(tiny, tmp_path: Path, run_cli) -> None:
    source = tiny.model("llama")
    run_cli("-q", "export", "gguf", source, tmp_path / "out", "--type", "f32", "--shard-size", "150KB")
    shards = sorted((tmp_path / "out").glob("*.gguf"))
    assert len(shards) >= 3 and shards[0].name.endswith(f"-F32-00001-of-{len(shards):05d}.gguf")
    counts = [_fields(shard)["split.count"] for shard in shards]
    assert counts == [len(shards)] * len(shards)
    assert [_fields(shard)["split.no"] for shard in shards] == list(range(len(shards)))
    assert "tokenizer.ggml.tokens" in _fields(shards[0]) and "tokenizer.ggml.tokens" not in _fields(shards[1])
    assert sum(len(gguf.GGUFReader(shard).tensors) for shard in shards) == len(open_checkpoint(source).names)
    import hashlib

    record = read_lineage(tmp_path / "out")
    assert record.outputs == {s.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in shards}


def test_an_adapter_is_merged_into_its_base_first(tiny, tmp_path: Path, run_cli) -> None:
    base = tiny.model("llama")
    adapter = tiny.lora(base, rank=4)
    run_cli("-q", "adapters", "merge", base, adapter, tmp_path / "merged", "--dtype", "float32")
    run_cli("-q", "export", "gguf", adapter, tmp_path / "from-adapter", "--type", "f32", "--name",
            "Llama-123K-Tiny-SFT-v1.0")
    run_cli("-q", "export", "gguf", tmp_path / "merged", tmp_path / "from-merged", "--type", "f32", "--name",
            "Llama-123K-Tiny-SFT-v1.0")
    (from_adapter,) = (tmp_path / "from-adapter").glob("*.gguf")
    (from_merged,) = (tmp_path / "from-merged").glob("*.gguf")
    assert from_adapter.name == "Llama-123K-Tiny-SFT-v1.0-F32.gguf"
    first, second = _tensors(from_adapter), _tensors(from_merged)
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name][1], second[name][1]), name
    record = read_lineage(tmp_path / "from-adapter")
    (parent,) = record.parents
    assert parent.id.endswith(f"+{adapter}") and parent.lineage.operation == "adapter-merge"
    assert {p.role for p in parent.lineage.parents} == {"base", "adapter"}
    assert not (tmp_path / "from-adapter" / ".merged-model").exists()


def test_a_model_from_the_hub_cache_names_its_source(tiny, tmp_path: Path, monkeypatch) -> None:
    """A Hub model (here in a Hugging Face cache built on the spot) without a lineage record: named by llama.cpp's
    convention from its id, its repository written as general.source, and the card links the GGUF to it."""
    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "cache" / "models--acme--Tiny-Chat-1B"
    snapshot = repository / "snapshots" / revision
    shutil.copytree(tiny.model("qwen2", tie=True), snapshot)
    _readme_license(snapshot, "mit")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    report = export_gguf("acme/Tiny-Chat-1B", tmp_path / "out", GGUFExportOptions(types=("q8_0",)))
    (path,) = (tmp_path / "out").glob("*.gguf")
    assert path.name == f"{report.name}-Q8_0.gguf" and report.name.startswith("Tiny-Chat-")
    fields = _fields(path)
    assert fields["general.source.repo_url"] == "https://huggingface.co/acme/Tiny-Chat-1B"
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["general.license"] == "mit"
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "out" / "README.md").data
    assert card.base_model == "acme/Tiny-Chat-1B" and card.library_name == "gguf"
    assert card.license == "mit" and "gguf" in card.tags


def test_the_card_lists_the_files_and_how_to_run_them(merged: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / f"{NAME}-GGUF"
    run_cli("-q", "export", "gguf", merged, out, "--type", "q8_0,q4_0")
    run_cli("-q", "card", out, "--force", "--repo-id", f"someone/{NAME}-GGUF")
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "gguf" and card.data.pipeline_tag == "text-generation"
    assert card.data.model_name == f"{NAME}-GGUF" and card.data.license == "apache-2.0"
    record = read_lineage(out)
    for file in (f"{NAME}-Q8_0.gguf", f"{NAME}-Q4_0.gguf"):
        assert f"| `{file}` | {file.split('-')[-1].removesuffix('.gguf')} |" in card.text
        assert record.outputs[file] in card.text
    assert f"llama-cli -hf someone/{NAME}-GGUF:Q8_0" in card.text
    assert f"ollama run hf.co/someone/{NAME}-GGUF:Q8_0" in card.text
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{NAME}-Q8_0.gguf\nTEMPLATE") and 'PARAMETER stop "<|end|>"' in modelfile
    assert modelfile.rstrip() in card.text
    assert '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n' in card.text
    assert "is `merged` as GGUF files (Q8_0, Q4_0)" in card.text


def test_llama_cpp_only_types_are_refused_with_the_tool_that_makes_them(tiny, tmp_path: Path, run_cli) -> None:
    result = run_cli("export", "gguf", tiny.model("llama"), tmp_path / "out", "--type", "q4_k_m", expect=2)
    assert "Q4_K_M is made by llama.cpp's C++ quantizer" in result.output and "llama-quantize" in result.output
    result = run_cli("export", "gguf", tiny.model("llama"), tmp_path / "out", "--type", "q3", expect=2)
    assert "unknown GGUF type 'q3'" in result.output
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_replaced_only_with_force(tiny, tmp_path: Path, run_cli) -> None:
    source = tiny.model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("export", "gguf", source, out, expect=3)
    assert "already exists" in result.output and (out / "keep.txt").read_text() == "mine"
    run_cli("-q", "export", "gguf", source, out, "--force")
    assert not (out / "keep.txt").exists() and list(out.glob("*-F16.gguf"))
    result = run_cli("export", "gguf", source, source / "inside", expect=3)
    assert "would overwrite the input" in result.output


def _edited_copy(tiny, tmp_path: Path, edit, architecture: str = "llama", **shape) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(tiny.model(architecture, **shape), folder)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    edit(config, tokenizer)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


REFUSALS = {
    "architecture": (lambda c, t: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                     "GGUF export does not cover GPT2LMHeadModel"),
    "activation": (lambda c, t: c.update(hidden_act="relu"), "the activation 'relu' is not the one llama.cpp"),
    "rope": (lambda c, t: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
             "RoPE scaling 'dynamic' is not one llama.cpp implements"),
    "prefix space": (lambda c, t: t["pre_tokenizer"].update(add_prefix_space=True),
                     "the tokenizer adds a space before the text"),
    "pre-tokenizer": (lambda c, t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, t["pre_tokenizer"]]}),
        "llama.cpp knows no pre-tokenizer of this structure"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_llama_cpp_would_compute_differently_is_refused(tiny, tmp_path: Path, case: str, run_cli) -> None:
    edit, message = REFUSALS[case]
    folder = _edited_copy(tiny, tmp_path, edit)
    result = run_cli("export", "gguf", folder, tmp_path / "out", expect=2)
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_known_pre_tokenizer_can_be_named(tiny, tmp_path: Path) -> None:
    edit, _ = REFUSALS["pre-tokenizer"]
    folder = _edited_copy(tiny, tmp_path, edit)
    export_gguf(str(folder), tmp_path / "out", GGUFExportOptions(types=("f16",), tokenizer_pre="gpt-2"))
    (path,) = (tmp_path / "out").glob("*.gguf")
    assert _fields(path)["tokenizer.ggml.pre"] == "gpt-2"


def test_gemma_heads_and_attention_scales_llama_cpp_cannot_run_are_refused(tiny, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="lm_head differs from it"):
        export_gguf(str(tiny.model("gemma2")), tmp_path / "untied")
    folder = _edited_copy(tiny, tmp_path, lambda c, t: c.update(query_pre_attn_scalar=64), "gemma3", tie=True)
    with pytest.raises(InputError, match=r"query_pre_attn_scalar is 64, but llama.cpp scales Gemma 3 attention"):
        export_gguf(str(folder), tmp_path / "scaled")


def test_names_that_cannot_be_gguf_exports_are_refused(merged: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a valid model name"):
        export_gguf(str(merged), tmp_path / "a", GGUFExportOptions(name="my model"))
    with pytest.raises(InputError, match="has no -LoRA"):
        export_gguf(str(merged), tmp_path / "b", GGUFExportOptions(name="Llama-123K-X-SFT-v1.0-LoRA"))
    with pytest.raises(OutputExistsError):
        export_gguf(str(merged), merged)


def test_a_folder_named_by_the_schema_keeps_its_name_when_it_lints(merged: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "Llama-123K-Fusion-TIES-v1.0"
    shutil.copytree(merged, renamed)
    export_gguf(str(renamed), tmp_path / "kept", GGUFExportOptions(types=("q8_0",)))
    assert [p.name for p in (tmp_path / "kept").glob("*.gguf")] == ["Llama-123K-Fusion-TIES-v1.0-Q8_0.gguf"]
    wrong = tmp_path / "Llama-123K-Fusion-SLERP-v1.0"  # a SLERP name on a TIES merge: the record's Method instead
    shutil.copytree(merged, wrong)
    export_gguf(str(wrong), tmp_path / "suggested", GGUFExportOptions(types=("q8_0",)))
    # the Label is the folder's own (label derivation reads it), the Method the record's
    assert [p.name for p in (tmp_path / "suggested").glob("*.gguf")] == ["Llama-123K-Fusion-TIES-v1.0-Q8_0.gguf"]


def test_a_combined_adapter_exports_as_the_merge_it_is(tiny, tmp_path: Path, run_cli) -> None:
    """Adapters combined in adapter space and merged into the base are a weight-space merge: the GGUF keeps the
    adapter's name without -LoRA, Method and all."""
    from mtool.naming.suggest import suggest_name

    base = tiny.model("llama")
    first, second = tiny.lora(base, seed=1), tiny.lora(base, seed=2)
    run_cli("-q", "adapters", "combine", first, second, tmp_path / "combined", "--method", "cat", "--weights",
            "0.5,0.5")
    name = suggest_name(tmp_path / "combined", label="Pair")
    assert name.lora and name.method == "Linear"
    adapter = (tmp_path / "combined").rename(tmp_path / name.format())
    run_cli("-q", "export", "gguf", adapter, tmp_path / "out", "--type", "q8_0", "--base", base)
    expected = name.format().removesuffix("-LoRA")
    assert [p.name for p in (tmp_path / "out").glob("*.gguf")] == [f"{expected}-Q8_0.gguf"]
    assert lint_name(f"{expected}-GGUF", tmp_path / "out").ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_widen_exactly(tiny, tmp_path: Path, dtype) -> None:
    source = tiny.model("qwen2", tie=True, dtype=dtype)
    export_gguf(str(source), tmp_path / "out", GGUFExportOptions(types=("f32",)))
    (path,) = (tmp_path / "out").glob("*.gguf")
    checkpoint = open_checkpoint(source)
    _, embedding = _tensors(path)["token_embd.weight"]
    _, bias = _tensors(path)["blk.1.attn_k.bias"]
    assert torch.equal(torch.from_numpy(embedding.copy()), checkpoint.read("model.embed_tokens.weight").float())
    assert torch.equal(torch.from_numpy(bias.copy()), checkpoint.read("model.layers.1.self_attn.k_proj.bias").float())
