"""The chunked linear + cross-entropy: transformers' causal LM loss and its gradients without the logits."""

from __future__ import annotations

import copy

import pytest
import torch

from mtool.train.chunked_loss import chunk_rows, linear_cross_entropy, shifted_labels
from mtool.train.lm_loss import use_chunked_loss
from mtool.train.measure import count_saved_tensors

F64 = torch.float64


def reference_loss(hidden, weight, labels, normalizer, softcap=None):
    """Full float64 logits and torch's cross-entropy: the plain formula."""
    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / normalizer


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("rows", [None, 16])  # None: the default chunking; 16: several chunks of uneven length
def test_loss_and_gradients_equal_the_full_logits_formula(softcap, rows):
    generator = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 45, 24, 103
    hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=F64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=F64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::4] = -100  # prompts and padding are not trained
    loss = linear_cross_entropy(hidden, weight, labels, normalizer=37.0, softcap=softcap, rows=rows)
    (loss * 1.7).backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    expected = reference_loss(hidden, weight, labels, 37.0, softcap)
    (expected * 1.7).backward()
    for value, want in zip(got, (expected.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-14)


def test_frozen_head_and_no_grad_and_nothing_to_train():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 8, generator=generator, dtype=F64, requires_grad=True)
    weight = torch.randn(30, 8, generator=generator, dtype=F64)
    labels = torch.randint(0, 30, (10,), generator=generator)
    loss = linear_cross_entropy(hidden, weight, labels, normalizer=10.0, rows=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        quiet = linear_cross_entropy(hidden, weight, labels, normalizer=10.0, rows=4)
    torch.testing.assert_close(quiet, reference_loss(hidden, weight, labels, 10.0).detach())
    nothing = linear_cross_entropy(hidden, weight, torch.full((10,), -100), normalizer=1.0)
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad  # still in the graph (backward runs everywhere)


def test_chunks_hold_about_as_much_as_the_hidden_states():
    rows = chunk_rows(4096, 128256, 2048)
    assert rows * 128256 <= 2 * 4096 * 2048 and rows >= 128  # never narrower than an efficient matmul
    assert chunk_rows(32768, 128256, 2048) == 1024
    assert chunk_rows(10, 50, 64) == 10


def test_saved_for_backward_is_one_hidden_row_per_trained_token():
    generator = torch.Generator().manual_seed(2)
    tokens, hidden_size, vocab = 64, 32, 1000
    hidden = torch.randn(tokens, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[:16] = -100
    with count_saved_tensors() as chunked:
        linear_cross_entropy(hidden, weight, labels, normalizer=48.0)
    with count_saved_tensors() as full:
        reference_loss(hidden, weight, labels, 48.0)
    assert chunked.bytes <= 48 * hidden_size * 4 + 64 * 8  # the trained rows' gradient and their indices
    assert full.bytes >= tokens * vocab * 4  # the float32 log-probabilities


def _tiny(architecture: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False)
    if architecture == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=12, final_logit_softcapping=3.0)).double()
    return LlamaForCausalLM(LlamaConfig(**common)).double()


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_causal_lm_loss_equals_transformers_loss(architecture):
    reference = _tiny(architecture)
    reference.lm_head.weight.requires_grad_(True)  # a trained head (modules_to_save) gets its gradient too
    chunked = copy.deepcopy(reference)
    assert use_chunked_loss(chunked)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    results = []
    for model in (reference, chunked):
        model.train()
        output = model(input_ids=ids, labels=labels, num_items_in_batch=13)
        output.loss.backward()
        results.append((output, {n: p.grad for n, p in model.named_parameters()}))
    (full, full_grads), (mine, mine_grads) = results
    assert mine.logits is None and full.logits is not None
    # transformers upcasts the logits with .float(), which is float32 even for a float64 model
    torch.testing.assert_close(mine.loss, full.loss.to(F64), rtol=1e-6, atol=1e-7)
    for name, gradient in full_grads.items():
        torch.testing.assert_close(mine_grads[name], gradient, rtol=1e-5, atol=1e-7)
    chunked.eval()
    with torch.no_grad():
        evaluated = chunked(input_ids=ids, labels=labels)
        skipped = chunked(input_ids=ids, labels=labels, skip_logits=True)
    assert evaluated.logits is not None and skipped.logits is None
    torch.testing.assert_close(skipped.loss, evaluated.loss.to(F64), rtol=1e-6, atol=1e-7)


def test_labels_shift_like_transformers():
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert shifted_labels(labels).tolist() == [2, 3, -100, -100, 6, -100]
