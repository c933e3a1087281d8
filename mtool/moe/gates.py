"""Router weights: one vector per layer and expert, of the hidden size (mergekit-moe's gate modes).

* ``hidden`` (also ``hidden_last``): the base model runs in bfloat16 on each expert's prompts (each prefixed with
  the BOS token, left-padded); the router vector of layer ``l`` is the mean over prompts of the hidden state at
  the last position entering layer ``l``; ``hidden_avg`` averages over all positions (padding included) instead;
* ``cheap_embed``: the normalized sum of the prompts' token embeddings, the same for every layer;
* with ``negative_prompts``, their vector is subtracted; each vector is then normalized to length 1 (per layer);
* ``random``: standard normal draws, ``uniform_random``: uniform in ``[-1/sqrt(H), 1/sqrt(H)]``, both from a
  generator seeded with ``--seed`` alone: the same numbers mergekit-moe draws with ``--random-seed`` the same.

The result has shape ``[layers, gated experts, hidden]``; shared experts with prompts (or random gates) come after
the routed ones.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mtool.moe.config import Expert


def _tokenizer(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenized(tokenizer, prompts: list[str]):
    return tokenizer([(tokenizer.bos_token or "") + prompt for prompt in prompts], return_tensors="pt",
                     padding=True, add_special_tokens=False)


def hidden_state_vectors(model, batch, *, average: bool) -> "torch.Tensor":
    """``[layers, hidden]``: the states entering each layer, at the last position (or averaged over positions),
    averaged over the prompts; in the model's dtype."""
    import torch

    with torch.no_grad():
        output = model(**batch.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # [layers, prompts, positions, hidden]
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def embedding_vectors(embedding: "torch.Tensor", batch, layers: int) -> "torch.Tensor":
    """``[layers, hidden]``: the normalized sum of the prompts' token embeddings (float32), for every layer."""
    import torch

    onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=embedding.shape[0])
    summed = (onehot.float() @ embedding.float() * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(
        dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)


def router_vectors(base_folder, config: dict, experts: list["Expert"], mode: str, *, seed: int,
                   embedding: "torch.Tensor | None" = None, device: str = "cpu") -> "torch.Tensor":
    """``[layers, len(experts), hidden]`` router vectors (see the module docstring)."""
    import torch

    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    shape = (layers, len(experts), hidden)
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=generator) * 2 * scale - scale
    tokenizer = _tokenizer(base_folder)
    if mode == "cheap_embed":
        def vectors(batch):
            return embedding_vectors(embedding, batch, layers)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16).to(device).eval()

        def vectors(batch):
            return hidden_state_vectors(model, batch, average=mode == "hidden_avg")
    gates = []
    for expert in experts:
        state = vectors(_tokenized(tokenizer, expert.positive_prompts or []))
        if expert.negative_prompts:
            state -= vectors(_tokenized(tokenizer, expert.negative_prompts))
        state /= state.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        gates.append(state)
    return torch.stack(gates, dim=0).permute(1, 0, 2).cpu()


def degenerate_layers(gates: "torch.Tensor", threshold: float = 5.0) -> list[int]:
    """Layers whose router vectors are nearly linearly dependent (condition number above ``threshold``): the
    router can hardly tell those experts apart."""
    import torch

    return [layer for layer in range(gates.shape[0]) if torch.linalg.cond(gates[layer].float()) > threshold]
