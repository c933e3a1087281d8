"""Assembling a mixture of experts: the plan (every output tensor and where it comes from, the routers computed
first), then the tensors streamed through :func:`mtool.stream.stream_tensors` into an atomic output folder with
its config, tokenizer, lineage record and card.

Experts with ``noise_scale`` draw their noise from generators seeded by ``--seed`` and the tensor's name (the same
output whatever the order); mergekit-moe draws from torch's global generator in its own order.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtool import ui
from mtool.errors import ConfigError, InputError
from mtool.hub import ModelRef, resolve_model
from mtool.io.dtypes import dtype_label, parse_dtype
from mtool.io.folders import atomic_output_dir
from mtool.io.hashing import FileHasher
from mtool.io.reading import Checkpoint, open_checkpoint
from mtool.io.writing import DEFAULT_SHARD_BYTES, CheckpointWriter, TensorSpec
from mtool.lineage import Lineage, ParentInput, describe_parents_in_background
from mtool.moe.config import Expert, MoEConfig
from mtool.moe.gates import degenerate_layers, router_vectors
from mtool.moe.layouts import PROJECTIONS, Layout, select_layout
from mtool.naming.finish import finish_output
from mtool.seeding import tensor_seed
from mtool.stream import Stream, StreamLimits, require_finite, stream_tensors

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Source:
    """A dense model of the mixture: the base or an expert's model."""

    ref: ModelRef
    checkpoint: Checkpoint
    config: dict


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    build: Callable[[], "torch.Tensor"]  # reads and computes the tensor, in the output dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MoEPlan:
    config: MoEConfig
    text: str
    layout: Layout
    base: Source
    sources: dict[str, Source]
    out_dtype: "torch.dtype"
    tensors: list[OutputTensor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _source(reference: str) -> Source:
    ref = resolve_model(reference)
    checkpoint = open_checkpoint(ref.path)
    if checkpoint.is_adapter:
        raise InputError("this is a LoRA adapter, not a model", where=reference)
    return Source(ref, checkpoint, checkpoint.read_json("config.json") or {})


def _expert_tensor(source: Source, name: str, expert: Expert, *, seed: int, noise_key: str,
                   residual: bool) -> "torch.Tensor":
    """An expert's tensor with its noise and residual scale applied (in its stored dtype)."""
    import torch

    if name not in source.checkpoint:
        raise InputError(f"tensor {name!r} is missing", where=str(source.ref.path),
                         fix="experts must be dense models of the base's architecture")
    tensor = source.checkpoint.read(name)
    if expert.noise_scale is not None:
        generator = torch.Generator().manual_seed(tensor_seed(seed, noise_key))
        tensor = tensor + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * expert.noise_scale
    if residual and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def plan_moe(config: MoEConfig, text: str, *, seed: int = 0, device: str = "cpu",
             allow_identical: bool = False) -> MoEPlan:
    """Check the config and the models, compute the routers, and list every output tensor."""
    import torch

    config.check(allow_identical=allow_identical)
    base = _source(config.base_model)
    experts = list(config.experts)
    shared = list(config.shared_experts or [])
    sources = {config.base_model: base}
    for expert in experts + shared:
        if expert.source_model not in sources:
            sources[expert.source_model] = _source(expert.source_model)
    model_types = [sources[m].config.get("model_type", "?") for m in
                   [config.base_model] + [e.source_model for e in experts + shared]]
    layout = select_layout(config, model_types)
    stored = base.config.get("dtype") or base.config.get("torch_dtype")
    out_dtype = parse_dtype(config.dtype) if config.dtype else (parse_dtype(stored) if stored else torch.float32)
    plan = MoEPlan(config, text, layout, base, sources, out_dtype)
    gated = experts + (shared if (any(e.positive_prompts for e in shared) or
                                  config.gate_mode in ("random", "uniform_random")) else [])
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        raise ConfigError("give prompts to every shared expert or to none", where="shared_experts")
    embedding = base.checkpoint.read("model.embed_tokens.weight") if config.gate_mode == "cheap_embed" else None
    gates = router_vectors(base.ref.path, base.config, gated, config.gate_mode, seed=seed, embedding=embedding,
                           device=device)
    degenerate = degenerate_layers(gates)
    if degenerate:
        plan.warnings.append(f"the routers of layers {degenerate} hardly tell the experts apart (similar prompts): "
                             "some experts will rarely be used")
    _plan_tensors(plan, gates, seed)
    return plan


def _plan_tensors(plan: MoEPlan, gates: "torch.Tensor", seed: int) -> None:
    import torch

    config, layout, base = plan.config, plan.layout, plan.base
    layers = int(base.config["num_hidden_layers"])
    out = plan.out_dtype
    experts = list(config.experts)
    shared = (config.shared_experts or [None])[0]

    def copied(name: str) -> Callable[[], torch.Tensor]:
        return lambda: base.checkpoint.read(name).to(out)

    for name in base.checkpoint.names:
        if ".mlp." not in name:
            plan.tensors.append(OutputTensor(name, tuple(base.checkpoint.info(name).shape), copied(name)))
    if layout.name == "Qwen MoE":
        _zero_biases(plan, layers)
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"

        def expert_tensor(expert: Expert, index: int, projection: str, *, layer=layer) -> torch.Tensor:
            name = f"model.layers.{layer}.mlp.{projection}.weight"
            return _expert_tensor(plan.sources[expert.source_model], name, expert, seed=seed,
                                  noise_key=f"{name}:expert{index}", residual=projection == "down_proj")

        shape = {p: tuple(base.checkpoint.info(f"{prefix}.{p}.weight").shape) for p in PROJECTIONS}
        if layout.stacked:
            count = len(experts)
            plan.tensors.append(OutputTensor(
                f"{prefix}.experts.gate_up_proj", (count, 2 * shape["gate_proj"][0], shape["gate_proj"][1]),
                lambda e=expert_tensor: torch.cat([
                    torch.stack([e(x, i, "gate_proj") for i, x in enumerate(experts)]),
                    torch.stack([e(x, i, "up_proj") for i, x in enumerate(experts)])], dim=1).to(out)))
            plan.tensors.append(OutputTensor(
                f"{prefix}.experts.down_proj", (count, *shape["down_proj"]),
                lambda e=expert_tensor: torch.stack([e(x, i, "down_proj") for i, x in enumerate(experts)]).to(out)))
        else:
            for index, expert in enumerate(experts):
                for projection in PROJECTIONS:
                    plan.tensors.append(OutputTensor(
                        f"{prefix}.experts.{index}.{projection}.weight", shape[projection],
                        lambda e=expert_tensor, x=expert, i=index, p=projection: e(x, i, p).to(out)))
            if shared is not None:
                for projection in PROJECTIONS:
                    plan.tensors.append(OutputTensor(
                        f"{prefix}.{layout.shared_name}.{projection}.weight", shape[projection],
                        lambda e=expert_tensor, p=projection: e(shared, len(experts), p).to(out)))
        plan.tensors.append(OutputTensor(f"{prefix}.gate.weight", (len(experts), gates.shape[-1]),
                                         lambda g=gates[layer, :len(experts)]: g.to(out).contiguous()))
        if layout.shared_gate:
            plan.tensors.append(OutputTensor(f"{prefix}.shared_expert_gate.weight", (1, gates.shape[-1]),
                                             lambda g=gates[layer, len(experts):]: g.to(out).contiguous()))


def _zero_biases(plan: MoEPlan, layers: int) -> None:
    """Qwen2-MoE's attention has q/k/v biases: zeros where the base has none (mergekit's sizes: heads times
    hidden_size / heads)."""
    import torch

    config = plan.base.config
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config["hidden_size"] // heads
    for layer in range(layers):
        for projection, count in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            name = f"model.layers.{layer}.self_attn.{projection}.bias"
            if name not in plan.base.checkpoint:
                plan.tensors.append(OutputTensor(name, (count * head_dim,),
                                                 lambda n=count * head_dim: torch.zeros(n, dtype=plan.out_dtype)))


@dataclass
class MoEOptions:
    seed: int = 0
    force: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    write_card: bool = True


def _write_config(plan: MoEPlan, folder: Path) -> None:
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(plan.base.ref.path)
    config = plan.layout.make_config(base, plan.config)
    if isinstance(config, dict):
        config["torch_dtype"] = dtype_label(plan.out_dtype)
        (folder / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    else:
        config.dtype = plan.out_dtype
        config.save_pretrained(folder)


def _write_tokenizer(plan: MoEPlan, folder: Path) -> None:
    from mtool.moe.gates import _tokenizer

    _tokenizer(plan.base.ref.path).save_pretrained(folder)


def execute_moe(plan: MoEPlan, output: str | os.PathLike, options: MoEOptions, *,
                hasher: FileHasher | None = None) -> Path:
    """Write the mixture into ``output`` (atomically)."""
    output = Path(output)
    hasher = hasher or FileHasher.default()
    specs = [TensorSpec(t.name, t.shape, plan.out_dtype) for t in plan.tensors]
    started = time.perf_counter()
    inputs = [source.checkpoint.folder for source in plan.sources.values()]
    with atomic_output_dir(output, force=options.force, inputs=inputs) as staging:
        roles = [ParentInput(plan.base.ref, "base")] + [ParentInput(s.ref, "model") for reference, s in
                                                         plan.sources.items() if reference != plan.config.base_model]
        parents = describe_parents_in_background(roles, hasher)
        stream = Stream(jobs=plan.tensors, name=lambda tensor: tensor.name, prepare=lambda tensor: tensor.build(),
                        produce=lambda tensor, value: [(0, require_finite(value, f"tensor {tensor.name!r}",
                                                                          fix="check the experts' weights")
                                                        .reshape(-1))],
                        held_bytes=lambda tensor: tensor.numel * plan.out_dtype.itemsize)
        with CheckpointWriter(staging, specs, max_shard_bytes=options.max_shard_bytes, in_order=True,
                              metadata={"mtool_merge_method": "moe"}) as writer:
            stream_tensors(stream, writer, limits=StreamLimits(), description="moe")
        _write_config(plan, staging)
        _write_tokenizer(plan, staging)
        random = plan.config.gate_mode in ("random", "uniform_random") or \
            any(e.noise_scale is not None for e in plan.config.experts + (plan.config.shared_experts or []))
        record = Lineage(
            operation="merge", method="moe", parents=parents.result(), recipe=plan.config.model_dump(exclude_none=True),
            parameters={"architecture": plan.layout.name, "gate_mode": plan.config.gate_mode,
                        "experts": len(plan.config.experts), "experts_per_token": plan.config.experts_per_token,
                        "shared_experts": len(plan.config.shared_experts or []),
                        "dtype": dtype_label(plan.out_dtype),
                        **({"warnings": plan.warnings} if plan.warnings else {})},
            seed=options.seed if random else None,
            parameter_count=sum(spec.numel for spec in specs))
        finish_output(staging, record, hasher=hasher, digests=writer.digests, card=options.write_card)
    ui.info(f"wrote {output} ({sum(s.nbytes for s in specs) / 1e9:.2f} GB, {len(specs)} tensors, "
            f"{plan.layout.name}) in {time.perf_counter() - started:.1f} s")
    return output
