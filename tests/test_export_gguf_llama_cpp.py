"""GGUF files from ``mtool export gguf`` run in llama.cpp itself (llama-cpp-python) as the model runs in transformers.

For every family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3; byte-level BPE and SentencePiece-style
tokenizers; RoPE scaling llama3 / YaRN / linear; tied and untied heads; a prompt longer than the Gemma sliding
window) and every file type:

* the logits llama.cpp computes at every position of a prompt against transformers' (float32, eager), within a
  tolerance per type stated below, and llama.cpp's greedy next token a best (or near-best) token of transformers;
* the same token ids from both tokenizers on a multilingual sample with special tokens, with and without BOS.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: `bash scripts/setup.sh` builds it from source (about 15 "
                        "minutes once, then taken from pip's wheel cache); these tests run llama.cpp itself")

from mtool.export.gguf_export import GGUFExportOptions, export_gguf  # noqa: E402
from mtool.tinymodels import build_model, build_tokenizer, save_model  # noqa: E402

TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
# |logit(llama.cpp) - logit(transformers)| over every position of the prompt, in units of the standard deviation of
# transformers' logits: (largest, mean). Float types are near-exact (llama.cpp runs GELU through a float16 table and
# F16/BF16 round every weight once); the 8-bit type is close; 5- and 4-bit types are bounded (tiny random models
# with 64-wide rows are the worst case for block quantization: real models lose far less).
TOLERANCE = {
    "f32": (3e-3, 5e-4), "f16": (1.5e-2, 2e-3), "bf16": (0.1, 1.5e-2), "q8_0": (0.35, 0.05),
    "q5_0": (2.0, 0.3), "q5_1": (2.0, 0.3), "q4_0": (3.5, 0.5), "q4_1": (3.5, 0.5),
}
# llama.cpp's greedy next token must score within this many standard deviations of transformers' best token
# (0: the same token) for the types that keep the model's choices.
GREEDY_MARGIN = {"f32": 0.0, "f16": 0.0, "bf16": 0.1, "q8_0": 0.35}

CASES = {
    "llama": dict(architecture="llama"),  # Q/K rows permuted, untied head, GPT-2 pre-tokenizer
    "llama-spm-llama3rope": dict(architecture="llama", tokenizer="spm", rope="llama3"),  # generated rope_freqs
    "mistral-spm": dict(architecture="mistral", tokenizer="spm"),
    "qwen2-yarn": dict(architecture="qwen2", tie=True, rope="yarn"),  # q/k/v biases, tied, Qwen2 pre-tokenizer
    "qwen3": dict(architecture="qwen3", tie=True, head_dim=32),  # q/k norms, head_dim != hidden / heads
    "gemma-spm": dict(architecture="gemma", tie=True, tokenizer="spm"),  # norms + 1, no space prefix
    "gemma2-spm": dict(architecture="gemma2", tie=True, tokenizer="spm"),  # soft-capping, sliding window 8
    "gemma3-spm-linear": dict(architecture="gemma3", tokenizer="spm", rope="linear"),  # untied, two RoPE bases
    "gemma3": dict(architecture="gemma3", tie=True),
}
PROMPT = ("The capital of France is Paris. Reverse the string: hello -> olleh. Question: what is two plus two? "
          "Answer: four. A model merge combines weights; an adapter adds a low-rank update W + B A to a frozen base.")
SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Grüße aus München: Äpfel, Öl und Übermut. Ça va? Élève, naïve, façade.",
    "Привет, мир! Как дела? Ελληνικά γράμματα.",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "مرحبا بالعالم — नमस्ते दुनिया — ภาษาไทย",
    "Emoji 🚀🦙✅ and 😶\u200d🌫️ joined",
    "  leading spaces, double  spaces,\ttabs\nnewlines\r\n and trailing   ",
    "I've been 'told he's there, 'RE you sure? 3 33 333 3333 3.14159 ------=======",
    "<s><|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\nParis<|end|>\n</s>",
    "code: def f(x):\n\treturn x ** 2  # squares <|end|>",
]


@llama_cpp.llama_log_callback
def _silent(level, text, user_data):  # llama.cpp logs to stderr even with verbose=False
    return None


llama_cpp.llama_log_set(_silent, ctypes.c_void_p(0))


def _llama(path: Path, **options):
    # float32 KV cache: the comparison then measures the file, not llama.cpp's default float16 cache
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, verbose=False, n_threads=2,
                           type_k=0, type_v=0, **options)


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (float64, tokens x vocabulary) for ``ids`` run through the GGUF file ``path``."""
    llm = _llama(path, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


@dataclass
class Exported:
    """A tiny model, its GGUF files of every type, and transformers' run of the prompt."""

    source: Path
    folder: Path
    ids: list[int]
    logits: np.ndarray  # float64, (tokens, vocabulary)
    model: object

    def gguf(self, type_name: str) -> Path:
        (path,) = self.folder.glob(f"*-{type_name.upper()}.gguf")
        return path


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """case -> :class:`Exported`, built once per case."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("gguf-llama-cpp")
    made: dict[str, Exported] = {}

    def get(case: str) -> Exported:
        if case not in made:
            source = tiny.model(**CASES[case])
            output = root / f"{case}-GGUF"
            export_gguf(str(source), output, GGUFExportOptions(types=TYPES))
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
            ids = AutoTokenizer.from_pretrained(source)(PROMPT).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double().numpy()
            made[case] = Exported(source, output, ids, logits, model)
        return made[case]

    return get


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_logits_match_transformers(exported, case: str, type_name: str) -> None:
    run = exported(case)
    assert len(run.ids) > 2 * 8  # longer than the Gemma sliding window (8): local and global layers both matter
    got = _llama_logits(run.gguf(type_name), run.ids)
    reference = run.logits
    scale = reference.std()
    difference = np.abs(got - reference) / scale
    largest, mean = TOLERANCE[type_name]
    assert difference.max() <= largest and difference.mean() <= mean, \
        f"{case} {type_name}: max {difference.max():.3g} (<= {largest}), mean {difference.mean():.3g} (<= {mean})"
    if type_name in GREEDY_MARGIN:
        chosen = int(got[-1].argmax())
        assert reference[-1, chosen] >= reference[-1].max() - GREEDY_MARGIN[type_name] * scale


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma2-spm", "gemma3-spm-linear"])
def test_greedy_continuation_is_the_same_in_llama_cpp(exported, case: str) -> None:
    run = exported(case)
    with torch.no_grad():
        expected = run.model.generate(torch.tensor([run.ids]), max_new_tokens=12, do_sample=False,
                                      attention_mask=torch.ones(1, len(run.ids), dtype=torch.long),
                                      )[0, len(run.ids):].tolist()
    llm = _llama(run.gguf("f32"))
    try:
        produced = []
        for token in llm.generate(run.ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            produced.append(token)
            if len(produced) == len(expected):
                break
    finally:
        llm.close()
    assert produced == expected


def _assert_same_tokens(source: Path, gguf_file: Path, *, lossless_bytes: bool) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    vocab = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        for text in SAMPLES:
            for with_bos in (False, True):
                expected = tokenizer(text, add_special_tokens=with_bos).input_ids
                got = vocab.tokenize(text.encode(), add_bos=with_bos, special=True)
                assert got == expected, f"{text!r} (BOS {with_bos}):\n{got}\n{expected}"
            if lossless_bytes:
                assert vocab.detokenize(tokenizer(text, add_special_tokens=False).input_ids, special=True) \
                    == text.encode()
    finally:
        vocab.close()


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_tokenizes_like_transformers(exported, case: str) -> None:
    run = exported(case)
    _assert_same_tokens(run.source, run.gguf("q8_0"), lossless_bytes=CASES[case].get("tokenizer") != "spm")


# transformers' pre-tokenizer regular expressions of Llama 3 and Mistral Nemo (tokenizer.json), which the export
# names llama-bpe and tekken
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
TEKKEN_SPLIT = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|"
                "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?"
                "[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@pytest.mark.parametrize(("split", "pre"), [(LLAMA3_SPLIT, "llama-bpe"), (TEKKEN_SPLIT, "tekken")])
def test_regex_pre_tokenizers_are_recognized_and_tokenize_alike(tmp_path: Path, split: str, pre: str) -> None:
    import gguf
    from tokenizers import Regex, pre_tokenizers

    from mtool.tinymodels import TinySpec

    tokenizer = build_tokenizer(pre_tokenizer=pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    source = save_model(build_model(TinySpec(), tokenizer=tokenizer), tokenizer, tmp_path / "model")
    export_gguf(str(source), tmp_path / "gguf", GGUFExportOptions(types=("q8_0",)))
    (gguf_file,) = (tmp_path / "gguf").glob("*.gguf")
    assert gguf.GGUFReader(gguf_file).fields["tokenizer.ggml.pre"].contents() == pre
    _assert_same_tokens(source, gguf_file, lossless_bytes=True)


@pytest.mark.parametrize(("architecture", "change"), [("LlamaForCausalLM", "permute_qk"),
                                                      ("Gemma2ForCausalLM", "norm_plus_one")])
def test_the_comparison_catches_a_conversion_left_out(tiny, tmp_path: Path, monkeypatch, architecture: str,
                                                      change: str) -> None:
    """Without the Llama Q/K permutation or the Gemma norm shift, an F32 file is further from transformers than an 8-bit
    quantization of the right conversion: the comparison above measures the conversion."""
    import dataclasses

    from mtool.export import gguf_architectures

    case = "llama" if architecture.startswith("Llama") else "gemma2-spm"
    source = tiny.model(**CASES[case])
    family = gguf_architectures.FAMILIES[architecture]
    monkeypatch.setitem(gguf_architectures.FAMILIES, architecture, dataclasses.replace(family, **{change: False}))
    export_gguf(str(source), tmp_path / "wrong", GGUFExportOptions(types=("f32",)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source)(PROMPT).input_ids
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(source).eval()(torch.tensor([ids])).logits[0].double().numpy()
    (path,) = (tmp_path / "wrong").glob("*.gguf")
    got = _llama_logits(path, ids)
    difference = np.abs(got - reference) / reference.std()
    assert difference.max() > TOLERANCE["q8_0"][0] and difference.mean() > TOLERANCE["q8_0"][1]


def test_llama_cpp_loads_a_split_file_from_its_first_shard(exported, tmp_path: Path) -> None:
    run = exported("gemma3-spm-linear")
    export_gguf(str(run.source), tmp_path / "split", GGUFExportOptions(types=("f32",), max_shard_bytes=200_000))
    shards = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(shards) > 2 and "-00001-of-" in shards[0].name
    assert np.array_equal(_llama_logits(shards[0], run.ids), _llama_logits(run.gguf("f32"), run.ids))


def test_the_language_model_of_a_multimodal_gemma3_runs_in_llama_cpp(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration (Gemma 3 4B and up): the vision tower is left out, the language model's tensors
    lose their ``language_model.`` prefix, its config comes from ``text_config``."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from mtool.tinymodels import build_spm_tokenizer

    tokenizer = build_spm_tokenizer(prefix_space=False)
    text = Gemma3TextConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                            mm_tokens_per_image=4, image_token_index=7)).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    export_gguf(str(tmp_path / "model"), tmp_path / "gguf", GGUFExportOptions(types=("f32", "q8_0")))
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    for type_name in ("f32", "q8_0"):
        (path,) = (tmp_path / "gguf").glob(f"*-{type_name.upper()}.gguf")
        got = _llama_logits(path, ids)
        difference = np.abs(got - reference) / reference.std()
        largest, mean = TOLERANCE[type_name]
        assert difference.max() <= largest and difference.mean() <= mean, (type_name, difference.max())
