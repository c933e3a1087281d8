"""The mixture-of-experts architectures ``mtool moe`` writes, as mergekit-moe 0.1.5 writes them.

* **Mixtral**, from Llama or Mistral models, no shared expert: experts stacked (transformers 5's layout),
  ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows) and ``mlp.experts.down_proj`` ``[E, H, I]``;
* **Qwen MoE** (Qwen2-MoE), from Llama, Mistral or Qwen2 models, exactly one shared expert, with prompts unless
  ``gate_mode: random``: experts one by one, ``mlp.experts.{e}.{gate,up,down}_proj.weight``; the shared expert
  as ``mlp.shared_expert.*`` with its own router ``mlp.shared_expert_gate.weight`` ``[1, H]``; zero q/k/v biases
  where the base model has none (Qwen2-MoE's attention has biases);
* **Qwen3 MoE**, from Qwen3 models, no shared expert: stacked, as Mixtral;
* **DeepSeek MoE**, from Llama or Mistral models, at most one shared expert, without prompts: one by one, the
  shared expert as ``mlp.shared_experts.*``; its config names DeepSeek's own modelling code (``auto_map``), which
  transformers runs only with ``trust_remote_code``.

Every tensor outside the MLPs comes from the base model; the routers are ``mlp.gate.weight`` ``[E, H]`` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mtool.moe.config import MoEConfig

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    name: str
    input_types: tuple[str, ...]
    stacked: bool  # experts stacked into gate_up_proj / down_proj (transformers 5's layout)
    shared_name: str | None  # where a shared expert goes (None: no shared expert)
    shared_gate: bool  # a shared expert has its own router vector
    make_config: Callable[[Any, "MoEConfig"], Any]

    def refusal(self, config: "MoEConfig", model_types: list[str]) -> str | None:
        """Why this layout cannot take ``config`` (None when it can)."""
        shared = config.shared_experts or []
        if self.shared_name is None and shared:
            return f"{self.name} has no shared experts"
        if self.name == "Qwen MoE":
            if len(shared) != 1:
                return "Qwen MoE needs exactly one shared expert"
            if config.gate_mode != "random" and not shared[0].positive_prompts:
                return "Qwen MoE needs prompts for its shared expert"
        if self.name == "DeepSeek MoE":
            if len(shared) > 1:
                return "DeepSeek MoE takes at most one shared expert"
            if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
                return "DeepSeek MoE does not route its shared expert (give it no prompts)"
        if len(set(model_types)) != 1:
            return f"{self.name} needs every model of the same architecture (got {', '.join(sorted(set(model_types)))})"
        if model_types[0] not in self.input_types:
            return f"{self.name} is built from {' or '.join(self.input_types)} models, not {model_types[0]}"
        return None


def _mixtral_config(base, config: "MoEConfig"):
    import transformers

    if not isinstance(base, transformers.MistralConfig):
        mistral = transformers.MistralConfig(**base.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base.max_position_embeddings
        base = mistral
    out = transformers.MixtralConfig(**base.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(config.experts)
    out.num_experts_per_tok = config.experts_per_token or 2
    out.sliding_window = None
    return out


def _qwen_experts(config_class, architecture: str, base, config: "MoEConfig"):
    """A Qwen MoE config from the base's: every layer sparse, ``len(experts)`` experts of the base's MLP size, the
    top-k routing weights normalized."""
    out = config_class(**base.to_dict())
    out.architectures = [architecture]
    out.num_experts = len(config.experts)
    out.num_experts_per_tok = config.experts_per_token or 2
    out.decoder_sparse_step = 1
    out.norm_topk_prob = True
    out.moe_intermediate_size = out.intermediate_size
    return out


def _qwen_config(base, config: "MoEConfig"):
    import transformers

    out = _qwen_experts(transformers.Qwen2MoeConfig, "Qwen2MoeForCausalLM", base, config)
    out.sliding_window = None
    out.use_sliding_window = False
    out.shared_expert_intermediate_size = out.intermediate_size
    return out


def _qwen3_config(base, config: "MoEConfig"):
    import transformers

    return _qwen_experts(transformers.Qwen3MoeConfig, "Qwen3MoeForCausalLM", base, config)


DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base"


def _deepseek_config(base, config: "MoEConfig") -> dict:
    shared = len(config.shared_experts or [])
    out = base.to_dict()
    out.update(architectures=["DeepseekForCausalLM"], model_type="deepseek", n_routed_experts=len(config.experts),
               n_shared_experts=shared or None, num_experts_per_tok=config.experts_per_token or (1 if shared else 2),
               first_k_dense_replace=0, moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=True,
               moe_intermediate_size=out["intermediate_size"],
               auto_map={"AutoConfig": f"{DEEPSEEK_CODE}--configuration_deepseek.DeepseekConfig",
                         "AutoModel": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekModel",
                         "AutoModelForCausalLM": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekForCausalLM"})
    return out


LAYOUTS = (
    Layout("Mixtral", ("llama", "mistral"), True, None, False, _mixtral_config),
    Layout("DeepSeek MoE", ("llama", "mistral"), False, "shared_experts", False, _deepseek_config),
    Layout("Qwen MoE", ("llama", "mistral", "qwen2"), False, "shared_expert", True, _qwen_config),
    Layout("Qwen3 MoE", ("qwen3",), True, None, False, _qwen3_config),
)


def select_layout(config: "MoEConfig", model_types: list[str]) -> Layout:
    """mergekit-moe's choice: the layouts whose name starts with ``architecture`` (all without it) that can take
    the config; Mixtral when it can, else the first."""
    from mtool.errors import ConfigError

    wanted = config.architecture.lower() if config.architecture else ""
    candidates = [layout for layout in LAYOUTS if layout.name.lower().startswith(wanted)]
    if not candidates:
        raise ConfigError(f"no MoE architecture is called {config.architecture!r}", where="architecture",
                          fix="use mixtral, qwen, qwen3 or deepseek")
    refusals = {layout.name: layout.refusal(config, model_types) for layout in candidates}
    fitting = [layout for layout in candidates if refusals[layout.name] is None]
    if not fitting:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in refusals.items())
        raise ConfigError(f"no MoE architecture fits these models ({reasons})", where="experts")
    return next((layout for layout in fitting if layout.name == "Mixtral"), fitting[0])
