"""``mtool adapters combine``: one LoRA adapter from several, as PEFT's ``add_weighted_adapter`` makes it
(:mod:`mtool.adapters.combine_peft`) or merged in weight space with an ``mtool merge`` method and factored
back by SVD (:mod:`mtool.adapters.combine_weightspace`).

The combined adapter targets every module any input targets. With PEFT's types a module is combined from the
adapters that have it (as PEFT does); in weight space every adapter is a whole model, unchanged where it has no
module. The factors carry the scale (``lora_alpha = r``). ``modules_to_save`` copies and trainable tokens
are carried over from the one adapter that has them (two adapters saving the same module is an error, as in
PEFT). Differences from PEFT: PEFT keeps the first adapter's ``use_rslora`` flag on the combined adapter,
which then scales it by ``sqrt(r)`` instead of 1 -- mtool writes ``use_rslora: false``; and PEFT gives the
combined adapter fresh copies of the base's ``modules_to_save`` modules, where mtool keeps the trained ones.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool import ui
from mtool.adapters.combine_peft import SVD_BASED, Combination, Member, combine_module
from mtool.adapters.combine_weightspace import PREFIX, WeightSpaceMerge
from mtool.adapters.peft_format import ModuleFactors, adapter_config, save_adapter_folder, target_module_names
from mtool.adapters.report import FitReport, ModuleFit
from mtool.adapters.validate import adapter_weights, positive_rank
from mtool.errors import InputError
from mtool.hub import ModelRef, resolve_model
from mtool.io.hashing import FileHasher
from mtool.io.reading import open_checkpoint
from mtool.lineage import Lineage, describe_parent
from mtool.lora.adapter import LoraAdapter, LoraModule, load_lora, refuse_adapter
from mtool.lora.lowrank import thin_svd, truncation_energy

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CombineOptions:
    method: str  # a PEFT combination type, or merge:<mtool merge method>
    weights: tuple[float, ...] | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    rank: int | None = None
    svd_clamp: float | None = None
    base: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    force: bool = False


@dataclass
class CombineResult:
    output: Path
    method: str
    modules: int
    report: FitReport | None = None  # weight-space merges: the error of factoring the merged update


def _max_rank(adapter: LoraAdapter) -> int:
    """PEFT's rank of an adapter for combining: ``r``, or the largest ``rank_pattern`` value when larger."""
    return max([adapter.settings.rank, *adapter.settings.rank_pattern.values()])


def _module_table(adapters: list[LoraAdapter]) -> dict[str, list[tuple[int, LoraModule]]]:
    """Base tensor name -> (adapter index, module) of every adapter that targets it, in first-seen order."""
    table: dict[str, list[tuple[int, LoraModule]]] = {}
    for index, adapter in enumerate(adapters):
        for name, module in adapter.targets.items():
            table.setdefault(name, []).append((index, module))
    for name, entries in table.items():
        kinds = {(module.is_embedding, module.transposed) for _, module in entries}
        if len(kinds) > 1:
            raise InputError(f"the adapters disagree on the layout of {name} (embedding / fan_in_fan_out)")
    return table


def _carried(adapters: list[LoraAdapter]) -> tuple[dict[str, "torch.Tensor"], list[str], Any]:
    """modules_to_save copies, saved embedding layers and trainable tokens of the inputs."""
    tensors: dict[str, "torch.Tensor"] = {}
    owners: dict[str, int] = {}
    token_indices = None
    modules_to_save: list[str] = []
    for index, adapter in enumerate(adapters):
        keys = list(adapter.replacements.values()) + [rows.key for rows in adapter.token_rows.values()]
        for key in keys:
            if key in owners and ".base_layer." not in key:
                raise InputError(f"two adapters both save {key} (modules_to_save or trainable tokens): they cannot "
                                 "be combined", where=str(adapter.folder))
            owners.setdefault(key, index)
            tensors.setdefault(key, adapter.checkpoint.read(key))
        if adapter.token_rows:
            token_indices = adapter.settings.trainable_token_indices
        modules_to_save += [m for m in adapter.settings.modules_to_save if m not in modules_to_save]
    return tensors, modules_to_save, token_indices


def _union_targets(adapters: list[LoraAdapter], modules: list[str]) -> Any:
    """PEFT's union of the inputs' ``target_modules`` (set union of lists, ``(a)|(b)`` of regex strings);
    the explicit module list when they mix the two."""
    values = [adapter.settings.target_modules for adapter in adapters]
    if all(isinstance(v, list) for v in values):
        return sorted({item for value in values for item in value})
    if all(isinstance(v, str) for v in values):
        return values[0] if len(values) == 1 else "|".join(f"({value})" for value in values)
    return target_module_names(modules)


def combine_adapters(adapters: list[str], output: str | os.PathLike, options: CombineOptions, *,
                     hasher: FileHasher | None = None) -> CombineResult:
    """Combine ``adapters`` into one adapter written to ``output``."""
    hasher = hasher or FileHasher.default()
    weights = adapter_weights(len(adapters), options.weights, "combine")
    positive_rank(options.rank)
    refs = [resolve_model(a) for a in adapters]
    loaded = [load_lora(ref.path) for ref in refs]
    for adapter in loaded:
        if adapter.bias_updates:
            raise InputError("adapters with lora_bias cannot be combined", where=str(adapter.folder))
    table = _module_table(loaded)
    if options.method.startswith(PREFIX):
        factors, report, base_ref = _combine_in_weight_space(loaded, table, weights, options)
        method = options.method
    else:
        factors, method = _combine_like_peft(loaded, table, weights, options), None
        report, base_ref = None, None
    extra, modules_to_save, token_indices = _carried(loaded)
    config = adapter_config(factors, target_modules=_union_targets(loaded, [f.module for f in factors]),
                            base_model=loaded[0].base_model_id, template=loaded[0].config,
                            modules_to_save=modules_to_save or None, trainable_token_indices=token_indices)
    parents = [describe_parent(ref, "adapter", hasher=hasher, weight=weight) for ref, weight in zip(refs, weights)]
    if base_ref is not None:
        parents.insert(0, describe_parent(base_ref, "base", hasher=hasher))
    method = method or _peft_kind(options, len(loaded))
    record = Lineage(operation="combine", method=method, parents=parents, seed=options.seed,
                     parameters={"weights": list(weights), "density": options.density, "rank": options.rank,
                                 "majority_sign_method": options.majority_sign_method,
                                 "svd_clamp": options.svd_clamp, "params": options.params},
                     metrics=report.metrics() if report else {})
    dtype = loaded[0].checkpoint.info(next(iter(loaded[0].targets.values())).key_a).dtype
    inputs: list[str | Path] = [ref.path for ref in refs] + ([base_ref.path] if base_ref else [])
    save_adapter_folder(output, factors, config, record, dtype=dtype, inputs=inputs, force=options.force,
                        hasher=hasher, extra=extra)
    return CombineResult(Path(output), method, len(factors), report)


def _peft_kind(options: CombineOptions, count: int) -> str:
    return "linear" if count == 1 else options.method  # PEFT combines a single adapter linearly


def _combine_like_peft(adapters: list[LoraAdapter], table: dict[str, list[tuple[int, LoraModule]]],
                       weights: tuple[float, ...], options: CombineOptions) -> list[ModuleFactors]:
    import torch

    from mtool.seeding import tensor_seed

    kind = _peft_kind(options, len(adapters))
    combination = Combination(kind, options.density, options.majority_sign_method, options.svd_clamp)
    combination.check()
    for adapter in adapters:
        if adapter.use_dora:
            raise InputError(f"combination type {kind} cannot combine DoRA adapters: their magnitude vectors have "
                             "no combined value", where=str(adapter.folder),
                             fix=f"use --method {PREFIX}<method> with --base, which merges their full effect")
    if options.rank is not None and kind not in SVD_BASED:
        raise InputError(f"--rank applies to the svd types and {PREFIX} methods, not to {kind}")
    ranks = [_max_rank(adapter) for adapter in adapters]
    if kind == "cat":
        rank = sum(ranks)
    elif kind in SVD_BASED:
        rank = options.rank or max(ranks)
    else:
        if len(set(ranks)) > 1:
            raise InputError(f"combination type {kind} needs adapters of one rank, got ranks {ranks}",
                             fix="use cat or an _svd type (svd, ties_svd, ...)")
        rank = ranks[0]
    factors = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        for name, entries in ui.progress(list(table.items()), desc=f"combine ({kind})", unit="module"):
            members = []
            for index, module in entries:
                a, b = adapters[index].factors(name)
                members.append(Member(a, b, module.scale, weights[index], module.transposed))
            low = combine_module(members, combination, rank, tensor_seed(options.seed, name))
            module = entries[0][1]
            factors.append(ModuleFactors(module.module, low.a, low.b, module.is_embedding))
    return factors


def _combine_in_weight_space(adapters: list[LoraAdapter], table: dict[str, list[tuple[int, LoraModule]]],
                             weights: tuple[float, ...], options: CombineOptions
                             ) -> tuple[list[ModuleFactors], FitReport, ModelRef | None]:
    import torch

    if options.svd_clamp is not None:
        raise InputError(f"--svd-clamp applies to the PEFT svd types, not to {options.method}")
    merge = WeightSpaceMerge(options.method.removeprefix(PREFIX), weights, options.density, dict(options.params),
                             has_base=options.base is not None)
    base_ref, base_checkpoint = None, None
    if options.base is not None:
        from mtool.adapters.basemodel import fit_problems, tied_embedding

        base_ref = resolve_model(options.base)
        refuse_adapter(base_ref.path, what="a base model (--base)")
        base_checkpoint = open_checkpoint(base_ref.path)
        config = base_checkpoint.read_json("config.json") or {}
        tied_source = tied_embedding(base_checkpoint, config)  # a tied base's head is its embedding
        for adapter in adapters:
            _, problems = fit_problems(adapter, base_checkpoint, config)
            if problems:
                raise InputError(f"the adapter does not fit the base: {problems[0]}", where=str(adapter.folder))
    else:
        for adapter in adapters:
            if adapter.use_dora:
                raise InputError("a DoRA adapter's update depends on the base weights", where=str(adapter.folder),
                                 fix="give the base model with --base")
    merge.check(len(adapters))
    rank = options.rank or max(_max_rank(adapter) for adapter in adapters)
    report = FitReport()
    factors = []
    with torch.inference_mode():
        for name, entries in ui.progress(list(table.items()), desc=f"combine ({options.method})", unit="module"):
            module = entries[0][1]
            if base_checkpoint is not None:
                base = base_checkpoint.read(name if name in base_checkpoint else tied_source).float()
            else:
                base = torch.zeros(adapters[entries[0][0]].expected_shape(name))
            # every adapter is a model W + dW_i; one that does not target the module leaves it at W
            known_base = base if base_checkpoint is not None else None
            deltas = [_update(adapter, name, known_base, tuple(base.shape)) for adapter in adapters]
            delta = merge.merged_delta(name, base, deltas, options.seed)
            decomposition = thin_svd(delta.T if module.transposed else delta)
            kept = min(rank, decomposition.s.numel())
            low = decomposition.factors(kept)
            factors.append(ModuleFactors(module.module, low.a, low.b, module.is_embedding))
            report.modules.append(ModuleFit(module.module, kept, *truncation_energy(decomposition.s, kept)))
    return factors, report, base_ref


def _update(adapter: LoraAdapter, name: str, base: "torch.Tensor | None", shape: tuple[int, ...]) -> "torch.Tensor":
    """The adapter's whole update of tensor ``name``: ``apply(W) - W`` given the base (DoRA included), the
    low-rank ``s * B @ A`` without it; zero for a module the adapter does not target."""
    import torch

    if name not in adapter.targets:
        return torch.zeros(shape)
    if base is None:
        return adapter.delta_for(name)
    return adapter.apply(name, base) - base
