"""A model's tokenizer as GGUF keys, read the way transformers builds it, written so that llama.cpp tokenizes alike.

The tokenizer is loaded with ``AutoTokenizer`` (its backend is what transformers runs, which for some model types
is rebuilt from the vocabulary rather than read from ``tokenizer.json``), and written as one of llama.cpp's two
kinds:

* **byte-level BPE** (``tokenizer.ggml.model = "gpt2"``; Llama 3, Qwen, Mistral Nemo, GPT-2 style): the vocabulary
  in its byte-level spelling, the merges, and the *pre-tokenizer* llama.cpp must split text with before the
  merges (``tokenizer.ggml.pre``). llama.cpp identifies pre-tokenizers by name; mtool names one from the
  structure of the backend's pre-tokenizer (:data:`PRE_TOKENIZERS`: a plain GPT-2 ``ByteLevel`` is ``gpt-2``, a
  ``Split`` on Llama 3's regular expression then ``ByteLevel`` is ``llama-bpe``, ...), because llama.cpp refuses
  to load an unknown name and falls back to a different split when the key is missing. A ``ByteLevel`` that
  adds a prefix space is refused: llama.cpp cannot add it for byte-level vocabularies.
* **SentencePiece-style BPE with byte fallback** (``"llama"``; Llama 2, Mistral 7B, Gemma): pieces with ``▁`` for
  spaces, ``<0x00>``..``<0xFF>`` byte tokens, and a score per piece. llama.cpp merges the adjacent pair whose
  result has the highest score, transformers the pair of lowest merge rank: a piece's score is minus the rank of
  the first merge that makes it, so both merge in the same order. ``add_space_prefix`` is whether the
  normalizer prepends ``▁`` (Llama) or not (Gemma).

Token types: added special tokens are CONTROL (parsed in text only when special tokens are), other added tokens
USER_DEFINED, byte tokens BYTE, the unknown token UNKNOWN; rows of the embedding beyond the tokenizer are
``[PAD<i>]`` tokens (UNUSED), so the token list matches the embedding as llama.cpp requires. Special token ids,
the chat template and the merges come from gguf-py's ``SpecialVocab``; whether BOS / EOS are added is written from
what the tokenizer does (``tok("a")`` against ``tok("a", add_special_tokens=False)``), since llama.cpp's defaults
differ per vocabulary kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from mtool import ui
from mtool.errors import InputError

# transformers' pre-tokenizer regular expressions (as tokenizer.json spells them) -> llama.cpp's pre-tokenizer
# name; llama.cpp's llama-vocab.cpp quotes each of them beside its own adaptation.
PRE_TOKENIZERS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|"
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?"
    "[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "tekken",
}
GPT2_PRE = "gpt-2"
IGNORING_MERGES = ("llama-bpe", "tekken")  # llama.cpp takes a word found in the vocabulary whole for these
_SPACE = "\u2581"


@dataclass
class Vocabulary:
    """What the GGUF says about the tokenizer."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)
    eos_text: str = ""  # the end-of-sequence token as text (a stop sequence for runtimes)

    @property
    def chat_template(self) -> str | None:
        template = self.special.chat_template
        return template if isinstance(template, str) else None

    @property
    def description(self) -> str:
        kind = "byte-level BPE" if self.model == "gpt2" else "SentencePiece-style BPE"
        return f"{kind} ({self.model}, pre-tokenizer {self.pre}), {len(self.tokens)} tokens"


def _steps(component: dict | None, list_key: str) -> list[dict]:
    """A tokenizer component's steps, with ``Sequence`` flattened."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [step for inner in component.get(list_key, []) for step in _steps(inner, list_key)]
    return [component]


def byte_level_pre(backend: dict[str, Any], where: str) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (module docstring); InputError if none."""
    steps = _steps(backend.get("pre_tokenizer"), "pretokenizers")
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if any(step.get("add_prefix_space") for step in byte_level):
        raise InputError("the tokenizer adds a space before the text (ByteLevel add_prefix_space), which llama.cpp "
                         "cannot do for byte-level vocabularies: the GGUF would tokenize differently", where=where,
                         fix="set add_prefix_space to false in tokenizer.json (and train with it so)")
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return GPT2_PRE
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    raise InputError(f"llama.cpp knows no pre-tokenizer of this structure ({json.dumps(steps)[:200]})", where=where,
                     fix="pass --tokenizer-pre NAME with the llama.cpp pre-tokenizer type it corresponds to")


def _added_types(tokenizer: Any) -> dict[int, tuple[str, int]]:
    """Added tokens: id -> (text, CONTROL for special ones else USER_DEFINED)."""
    return {index: (token.content, TokenType.CONTROL if token.special else TokenType.USER_DEFINED)
            for index, token in tokenizer.backend_tokenizer.get_added_tokens_decoder().items()}


def _piece_scores(merges: list, vocab: dict[str, int]) -> dict[int, float]:
    """SentencePiece scores from BPE merges: minus the rank of the first merge that makes each piece."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        made = vocab.get(left + right)
        if made is not None and made not in scores:
            scores[made] = -float(rank)
    return scores


def _space_prefix(backend: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends ``▁`` to the text (SentencePiece's add_dummy_prefix)."""
    normalizers = _steps(backend.get("normalizer"), "normalizers")
    if any(step.get("type") == "Prepend" and step.get("prepend") == _SPACE for step in normalizers):
        return True
    return any(step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never"
               for step in _steps(backend.get("pre_tokenizer"), "pretokenizers"))


def read_vocabulary(folder: Path, rows: int, *, pre: str | None = None) -> Vocabulary:
    """The tokenizer of the model in ``folder`` for an embedding of ``rows`` tokens (module docstring)."""
    from transformers import AutoTokenizer

    where = str(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"cannot load the model's tokenizer: {str(error).splitlines()[0]}", where=where,
                         fix="keep tokenizer.json (and tokenizer_config.json) beside the weights") from None
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("the tokenizer has no tokenizers backend (tokenizer.json)", where=where,
                         fix="save the tokenizer with transformers, which writes tokenizer.json")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    vocab: dict[str, int] = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= rows:
        raise InputError(f"the tokenizer has token ids up to {max(vocab.values())} but the embedding only {rows} "
                         "rows", where=where, fix="give the tokenizer the model was trained with")
    if model.get("type") != "BPE":
        raise InputError(f"{model.get('type')} tokenizers are not exported (only BPE, byte-level or "
                         "SentencePiece-style)", where=where, fix="use llama.cpp's convert_hf_to_gguf.py")
    spm = bool(model.get("byte_fallback"))
    added = _added_types(tokenizer)
    by_id = {index: token for token, index in vocab.items()}
    scores_by_id = _piece_scores(model.get("merges") or [], vocab) if spm else {}
    tokens, types, scores = [], [], []
    unmerged = -float(len(model.get("merges") or []))  # below every merged piece, as SentencePiece scores them
    for index in range(rows):
        token, kind, score = by_id.get(index), TokenType.NORMAL, scores_by_id.get(index, unmerged)
        if token is None:
            token, kind, score = f"[PAD{index}]", TokenType.UNUSED, -1000.0
        elif spm and token == model.get("unk_token"):
            kind, score = TokenType.UNKNOWN, 0.0
        elif index in added:
            token, kind = added[index]
            if kind == TokenType.USER_DEFINED and spm:
                token = token.replace(_SPACE, " ")  # llama.cpp matches user-defined tokens in the raw text
            score = -1000.0
        elif spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind, score = TokenType.BYTE, 0.0
        tokens.append(token)
        types.append(int(kind))
        scores.append(score)
    with ui.quiet_logger("gguf.vocab"):  # its guesses about BOS/EOS from the post-processor; decided below instead
        special = gguf.SpecialVocab(folder, load_merges=not spm, n_vocab=rows)
    special.chat_template = tokenizer.chat_template or special.chat_template
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and with_specials[:1] == [tokenizer.bos_token_id] \
        and without[:1] != [tokenizer.bos_token_id]
    add_eos = tokenizer.eos_token_id is not None and with_specials[-1:] == [tokenizer.eos_token_id] \
        and without[-1:] != [tokenizer.eos_token_id]
    notes = []
    if spm:
        kept = ("Prepend", "Replace")
        others = [s.get("type") for s in _steps(backend.get("normalizer"), "normalizers") if s.get("type") not in kept]
        if others:
            notes.append(f"llama.cpp applies no {'/'.join(others)} normalization: text that it changes tokenizes "
                         "differently")
        if any(step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first"
               for step in _steps(backend.get("pre_tokenizer"), "pretokenizers")):
            notes.append("transformers puts the space prefix only at the start of the text, llama.cpp also after "
                         "each special token: text right after a special token may tokenize differently")
        vocabulary = Vocabulary("llama", "default", tokens, types, scores, special, add_bos, add_eos,
                                add_space_prefix=_space_prefix(backend), notes=notes)
    else:
        chosen = pre or byte_level_pre(backend, where)
        others = [s.get("type") for s in _steps(backend.get("normalizer"), "normalizers")]
        if others:
            notes.append(f"llama.cpp applies no {'/'.join(others)} normalization before tokenizing (already "
                         "normalized text tokenizes alike)")
        ignores = bool(model.get("ignore_merges"))
        if ignores != (chosen in IGNORING_MERGES):
            notes.append(f"the tokenizer {'takes' if ignores else 'merges'} words of its vocabulary whole, llama.cpp's "
                         f"{chosen} pre-tokenizer does {'not' if ignores else 'so'}: rare words may tokenize "
                         "differently")
        vocabulary = Vocabulary("gpt2", chosen, tokens, types, None, special, add_bos, add_eos, notes=notes)
    vocabulary.eos_text = tokenizer.eos_token or ""
    for note in notes:
        ui.info(f"tokenizer: {note}")
    return vocabulary


def add_vocabulary(writer: gguf.GGUFWriter, vocabulary: Vocabulary) -> None:
    """Write the ``tokenizer.*`` keys."""
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    special = vocabulary.special
    special.add_special_token = {"bos": vocabulary.add_bos, "eos": vocabulary.add_eos}
    special.add_to_gguf(writer, quiet=True)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
        writer.add_remove_extra_whitespaces(False)
