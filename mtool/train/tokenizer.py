"""The tokenizer of a run: the chat template it trains with (and saves), its pad token, added tokens.

The template the data is rendered with is written into the tokenizer that is saved with the adapter, so the
model is prompted at inference exactly as it was trained. A template that writes ``<|...|>`` markers the
vocabulary does not have (chatml on a base model, say) gets them added as special tokens, as do the tokens of
``data.add_tokens``; the embeddings then grow to match (:func:`mtool.train.model.resize_for_tokenizer`).
Without a pad token the end-of-sequence token pads; labels never come from the pad id, so it is still learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtool import ui
from mtool.errors import InputError
from mtool.train.formats import resolve_chat_template, template_markers

CONVERSATIONAL_FORMATS = ("chat", "alpaca", "prompt_completion")  # formats rendered with the chat template


@dataclass
class TokenizerSetup:
    tokenizer: Any
    template: str | None  # the chat template the data is rendered with (None: no conversations)
    added_tokens: list[str]


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"cannot load the tokenizer: {first}", where=path) from None
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("the model's tokenizer has no fast (Rust) implementation, which mtool needs for the "
                         "character offsets of response-only training", where=path)
    return tokenizer


def prepare_tokenizer(tokenizer: Any, *, chat_template: str | None, data_format: str,
                      add_tokens: list[str]) -> TokenizerSetup:
    """Choose the template, add missing special tokens, make sure there is a pad token."""
    template = resolve_chat_template(chat_template, tokenizer.chat_template, data_format)
    wanted = list(add_tokens)
    if template is not None and template != tokenizer.chat_template and data_format in CONVERSATIONAL_FORMATS:
        wanted += template_markers(template)
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in dict.fromkeys(wanted) if token not in vocabulary]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        ui.info(f"added {len(missing)} special token(s) to the tokenizer: {' '.join(missing)}")
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        ui.debug("the tokenizer has no pad token; the end-of-sequence token pads (it is still trained)")
    return TokenizerSetup(tokenizer, template, missing)
