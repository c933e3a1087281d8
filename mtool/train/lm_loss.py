"""The causal LM's training loss without its logits: the model's body, then :mod:`mtool.train.chunked_loss`.

transformers' ``ForCausalLM.forward`` computes ``logits = lm_head(hidden)`` for every position and hands them to
its loss (``[tokens, vocabulary]`` floats, upcast to float32). :func:`use_chunked_loss` switches a model to a
forward that, in training mode with ``labels`` (or whenever called with ``skip_logits=True``, as Liger's fused
loss also takes it), runs the same body and computes the same loss in chunks from the hidden states
(``logits`` is then None in the output); otherwise the model's own forward runs. The loss is
transformers': the labels shifted by one, ``-100`` ignored, summed and divided by ``num_items_in_batch`` (else
by the number of trained positions); Gemma 2's final logit soft cap is applied in the chunks.

Architectures whose head is ``lm_head(hidden)`` (optionally soft-capped) are covered; a head that carries LoRA
or a bias, or another architecture, keeps the model's own loss.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from mtool.train.chunked_loss import IGNORE_INDEX, linear_cross_entropy, shifted_labels

if TYPE_CHECKING:
    import torch

# model types whose ForCausalLM forward is body -> lm_head (-> soft cap) -> transformers' causal LM loss
CHUNKED_LOSS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2"})


def head_weight(model: Any) -> "torch.Tensor | None":
    """The weight the output head multiplies by (a trained copy under ``modules_to_save``), or None when the
    head is something else (LoRA on the head, a bias, no head)."""
    import torch

    head = model.get_output_embeddings()
    active = getattr(head, "modules_to_save", None)
    if active is not None:  # PEFT ModulesToSaveWrapper: the trained copy while the adapter is active
        if getattr(head, "disable_adapters", False) or "default" not in active:
            head = head.original_module
        else:
            head = active["default"]
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight


def _chunked_forward(self: Any, model_class: type, input_ids: Any = None, attention_mask: Any = None,
                     position_ids: Any = None, inputs_embeds: Any = None, labels: Any = None, use_cache: Any = None,
                     num_items_in_batch: Any = None, skip_logits: bool | None = None, **kwargs: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if skip_logits is None:
        skip_logits = self.training
    weight = head_weight(self) if labels is not None and skip_logits else None
    if weight is None or kwargs.get("cache") is not None or kwargs.get("logits_to_keep"):
        return model_class.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, num_items_in_batch=num_items_in_batch, **kwargs)
    kwargs.pop("logits_to_keep", None)
    body = getattr(self, self.base_model_prefix)
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state
    targets = shifted_labels(labels.to(hidden.device))
    normalizer = num_items_in_batch if num_items_in_batch is not None else int((targets != IGNORE_INDEX).sum())
    normalizer = float(normalizer.item() if hasattr(normalizer, "item") else normalizer) or 1.0
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets, normalizer=normalizer,
                                softcap=getattr(self.config, "final_logit_softcapping", None))
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


@functools.cache
def chunked_loss_class(model_class: type) -> type:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:  # positional inputs: the model's own forward
            return model_class.forward(self, *args, **kwargs)
        return _chunked_forward(self, model_class, **kwargs)

    return type(f"ChunkedLoss{model_class.__name__}", (model_class,), {"forward": forward, "__module__": __name__})


def supports_chunked_loss(model: Any) -> bool:
    """Whether ``model`` (a transformers causal LM) can take the chunked loss."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in CHUNKED_LOSS_MODEL_TYPES and hasattr(model, "base_model_prefix") \
        and hasattr(model, "get_output_embeddings")


def use_chunked_loss(model: Any) -> bool:
    """Switch ``model`` (the transformers causal LM, not its PEFT wrapper) to the chunked loss; False when its
    architecture is not covered (it keeps its own loss)."""
    if not supports_chunked_loss(model):
        return False
    if "forward" in vars(model):  # an instance-level forward (Liger's fused loss) would hide the class's
        return False
    if not type(model).__name__.startswith("ChunkedLoss"):
        model.__class__ = chunked_loss_class(type(model))
    return True
