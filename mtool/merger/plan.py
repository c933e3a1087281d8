"""The merge plan: for every output tensor, which input tensors, which method, which parameters.

The plan is built and checked completely before a byte is written: every model exists, every tensor is
present in every input that should have it, shapes agree, parameters are valid. The executor then only
reads, computes and writes.

Layout of a decoder model: tensors of layer ``i`` are named ``<prefix>.layers.<i>.<rest>``; the others come
before the layers (embeddings) or after them (final norm, ``lm_head``). A recipe's ``models:`` is one slice
spanning all layers of each model (the base appended when it is not listed); ``slices:`` stack layer
ranges, so output layers are renumbered from 0. Gradients run over each slice's layers: layer ``i`` of ``n``
sits at ``t = i / (n - 1)`` (``t = 1`` for a one-layer slice). Tensors before the layers take the first
slice's settings at ``t = 0``; tensors after the layers take the last slice's settings at ``t = 1`` (mergekit
evaluates both at ``t = 0``; see the README).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mtool import ui
from mtool.chat_templates import resolve_chat_template
from mtool.errors import ConfigError, InputError
from mtool.hub import ModelRef, resolve_model
from mtool.io.dtypes import parse_dtype
from mtool.io.reading import Checkpoint, open_checkpoint
from mtool.merger.methods import get_method
from mtool.merger.methods.base import BasePolicy, MergeMethod, ParameterValue, Scope
from mtool.merger.params import resolve_parameter
from mtool.merger.recipe import InputSlice, ModelReference, OutputSlice, Recipe

if TYPE_CHECKING:
    import torch

    from mtool.lora.adapter import LoraAdapter

_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE_LAYER_HINTS = ("embed", "wte", "wpe", "word_embeddings")
_TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``("model.layers", 3, "mlp.up_proj.weight")`` for a layer tensor, None otherwise."""
    match = _LAYER_NAME.match(name)
    if not match:
        return None
    return match.group("prefix"), int(match.group("index")), match.group("rest")


@dataclass
class InputModel:
    """A model a recipe reads: where it is, its tensors, its config, the LoRA applied to it if any."""

    reference: ModelReference
    ref: ModelRef
    checkpoint: Checkpoint
    config: dict
    adapter: "LoraAdapter | None" = None
    adapter_ref: ModelRef | None = None

    @property
    def label(self) -> str:
        return str(self.reference)

    @property
    def layer_prefix(self) -> str | None:
        for name in self.checkpoint.names:
            parts = split_layer_name(name)
            if parts:
                return parts[0]
        return None

    @property
    def num_layers(self) -> int:
        configured = self.config.get("num_hidden_layers") or self.config.get("n_layer")
        if configured:
            return int(configured)
        indices = [parts[1] for n in self.checkpoint.names if (parts := split_layer_name(n))]
        return max(indices) + 1 if indices else 0

    def layer_rests(self, index: int) -> list[str]:
        """The tensor names of layer ``index`` without the ``<prefix>.<index>.`` part."""
        return [parts[2] for n in self.checkpoint.names if (parts := split_layer_name(n)) and parts[1] == index]

    def resolve_tensor(self, name: str) -> str | None:
        """The tensor that stands for ``name`` in this model: itself, or the input embedding for a tied
        ``lm_head``."""
        if name in self.checkpoint:
            return name
        if name == _TIED_HEAD[0] and _TIED_HEAD[1] in self.checkpoint:
            return _TIED_HEAD[1]
        return None


@dataclass
class TensorSource:
    model: InputModel
    tensor: str  # the tensor's name inside that model


@dataclass
class TensorPlan:
    """One output tensor."""

    name: str
    shape: tuple[int, ...]
    sources: list[TensorSource]
    params: dict[str, ParameterValue]
    model_params: list[dict[str, ParameterValue]]
    base_index: int | None
    out_dtype: "torch.dtype"
    layer: int | None = None
    vocabulary: bool = False  # rows follow the tokenizer (embeddings, lm_head)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    models: dict[ModelReference, InputModel]
    tensors: list[TensorPlan]
    num_layers: int
    read_dtype: "torch.dtype | None"  # the recipe's dtype: inputs are rounded to it when read
    compute_dtype: "torch.dtype"
    out_dtype: "torch.dtype | None"
    config_model: InputModel
    tokenizer_model: InputModel | None
    base_reference: ModelReference | None
    vocabulary: "object | None" = None  # merger.tokenizer.VocabularyPlan when the tokenizer is merged
    chat_template: str | None = None  # the recipe's chat_template, resolved to its Jinja text
    warnings: list[str] = field(default_factory=list)  # printed when planned, recorded in the lineage

    def by_layer(self) -> dict[int | None, list[TensorPlan]]:
        groups: dict[int | None, list[TensorPlan]] = {}
        for tensor in self.tensors:
            groups.setdefault(tensor.layer, []).append(tensor)
        return groups


def load_input(reference: ModelReference) -> InputModel:
    ref = resolve_model(reference.model, reference.revision)
    checkpoint = open_checkpoint(ref.path)
    if checkpoint.is_adapter:
        raise InputError("this is a LoRA adapter, not a model", where=reference.model,
                         fix=f"write it as BASE+{reference.model} to apply it to its base")
    config = checkpoint.read_json("config.json") or {}
    adapter = adapter_ref = None
    if reference.adapter:
        from mtool.lora.adapter import load_lora

        adapter_ref = resolve_model(reference.adapter)
        adapter = load_lora(adapter_ref.path)
    return InputModel(reference, ref, checkpoint, config, adapter, adapter_ref)


def _normalized_slices(recipe: Recipe, models: dict[ModelReference, InputModel]) -> list[OutputSlice]:
    if recipe.slices:
        return list(recipe.slices)
    sources = [InputSlice(model=m.model, layer_range=(0, models[m.model].num_layers), parameters=m.parameters)
               for m in recipe.models or []]
    if recipe.base_model and all(s.model != recipe.base_model for s in sources):
        sources.append(InputSlice(model=recipe.base_model, layer_range=(0, models[recipe.base_model].num_layers)))
    return [OutputSlice(sources=sources)]


class _Planner:
    """Builds a :class:`MergePlan`; one instance per plan."""

    def __init__(self, recipe: Recipe, models: dict[ModelReference, InputModel]) -> None:
        self.recipe = recipe
        self.models = models
        self.method = get_method(recipe.merge_method)
        self.read_dtype = parse_dtype(recipe.dtype, where="the recipe's dtype") if recipe.dtype else None
        self.out_dtype = parse_dtype(recipe.out_dtype, where="the recipe's out_dtype") if recipe.out_dtype else None
        self.tensors: list[TensorPlan] = []
        self.unadvised: dict[str, list[float]] = {}  # parameter -> values outside its advised range
        self._check_parameter_names()

    # -- parameters -------------------------------------------------------------------------------------
    def _check_parameter_names(self) -> None:
        known = {p.name for p in self.method.parameters}
        blocks = [("parameters", self.recipe.parameters)]
        blocks += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.recipe.models or [])]
        for i, output_slice in enumerate(self.recipe.slices or []):
            blocks.append((f"slices[{i}].parameters", output_slice.parameters))
            blocks += [(f"slices[{i}].sources[{j}].parameters", s.parameters)
                       for j, s in enumerate(output_slice.sources)]
        for where, block in blocks:
            for name in block or {}:
                if name not in known:
                    raise ConfigError(f"merge method {self.method.name!r} has no parameter {name!r}", where=where,
                                      fix=f"its parameters are: {', '.join(sorted(known)) or 'none'}")

    def _resolve(self, output_slice: OutputSlice, tensor_name: str, input_names: list[str],
                 source_models: list[ModelReference], base_index: int | None, t: float
                 ) -> tuple[dict[str, ParameterValue], list[dict[str, ParameterValue]]]:
        shared_sources = (output_slice.parameters, self.recipe.parameters)
        where = f"tensor {tensor_name}"
        params = {p.name: resolve_parameter(p, shared_sources, tensor_name=tensor_name, t=t, where=where)
                  for p in self.method.parameters if p.scope is Scope.SHARED}
        model_params = []
        for index, (model, input_name) in enumerate(zip(source_models, input_names)):
            own = next((s.parameters for s in output_slice.sources if s.model == model), None)
            sources = (own, output_slice.parameters, self.recipe.parameters)
            model_params.append({
                p.name: resolve_parameter(p, sources, tensor_name=input_name, t=t, where=f"{where} of {model}")
                for p in self.method.parameters
                if p.scope is Scope.INPUT or (p.scope is Scope.NON_BASE and index != base_index)
            })
        for check in self.method.extra_checks:
            check(params, model_params, where)
        self._note_unadvised([params, *model_params])
        return params, model_params

    def _note_unadvised(self, resolved: list[dict[str, ParameterValue]]) -> None:
        for spec in self.method.parameters:
            for values in resolved:
                if spec.name in values and spec.outside_advised(values[spec.name]):
                    self.unadvised.setdefault(spec.name, []).append(float(values[spec.name]))

    def warnings(self) -> list[str]:
        """One line per parameter that took values outside its advised range."""
        lines = []
        for spec in self.method.parameters:
            values = self.unadvised.get(spec.name)
            if values:
                low, high = spec.advised
                taken = f"= {min(values):g}" if min(values) == max(values) else \
                    f"from {min(values):g} to {max(values):g}"
                lines.append(f"{self.method.name} {spec.name} {taken} lies outside [{low:g}, {high:g}] for "
                             f"{len(values)} tensor(s): the merge extrapolates beyond the models (mergekit allows "
                             "it; the lineage record notes it)")
        return lines

    # -- structure --------------------------------------------------------------------------------------
    def _base_of(self, output_slice: OutputSlice) -> ModelReference | None:
        return output_slice.base_model or self.recipe.base_model

    def _base_index(self, output_slice: OutputSlice) -> int | None:
        if self.method.base is BasePolicy.IGNORED:
            return None
        base = self._base_of(output_slice)
        models = [s.model for s in output_slice.sources]
        return models.index(base) if base in models else None

    def check_slices(self, slices: list[OutputSlice]) -> None:
        for i, output_slice in enumerate(slices):
            where = f"slices[{i}]" if self.recipe.slices else "models"
            base = self._base_of(output_slice)
            models = [s.model for s in output_slice.sources]
            if len(set(models)) != len(models):
                raise ConfigError("a model is listed twice in the same slice", where=where,
                                  fix="list each model once (give it a larger weight instead)")
            if base is not None and self.method.base is not BasePolicy.IGNORED and base not in models:
                raise ConfigError(f"the base model {base} is not among the slice's sources", where=where)
            self.method.check_inputs(len(models), base in models and base is not None, where=where)
            for j, source in enumerate(output_slice.sources):
                available = self.models[source.model].num_layers
                if source.layer_range[1] > available:
                    raise ConfigError(f"layer_range {list(source.layer_range)} goes past the {available} layers of "
                                      f"{source.model}", where=f"{where}.sources[{j}]")

    def add_tensor(self, output_slice: OutputSlice, name: str, input_names: list[str], t: float,
                   layer: int | None) -> None:
        sources = output_slice.sources
        base_index = self._base_index(output_slice)
        resolved: list[TensorSource] = []
        missing = []
        for source, input_name in zip(sources, input_names):
            model = self.models[source.model]
            actual = model.resolve_tensor(input_name)
            if actual is None:
                missing.append(str(source.model))
            else:
                resolved.append(TensorSource(model, actual))
        if missing:
            if layer is None and name == _TIED_HEAD[0] and len(missing) == len(sources):
                return  # every input ties lm_head to the embeddings: so does the output
            raise InputError(f"tensor {input_names[0]!r} is missing from {', '.join(missing)}",
                             fix="every model of a merge must have the same architecture")
        shapes = [tuple(s.model.checkpoint.info(s.tensor).shape) for s in resolved]
        vocabulary = layer is None and len(shapes[0]) == 2 and any(h in name for h in ("embed", "lm_head", "wte"))
        if len(set(shapes)) > 1 and not (vocabulary and self.recipe.tokenizer_choice):
            listing = ", ".join(f"{s.model.label} {list(shape)}" for s, shape in zip(resolved, shapes))
            hint = (" Set `tokenizer_source: base` (or union) to align vocabularies." if vocabulary else
                    " Every model of a merge must have the same shapes.")
            raise InputError(f"shape mismatch for tensor {name!r}: {listing}.{hint}")
        params, model_params = self._resolve(output_slice, name, input_names, [s.model for s in sources], base_index, t)
        first_dtype = resolved[0].model.checkpoint.info(resolved[0].tensor).dtype
        self.tensors.append(TensorPlan(
            name=name, shape=shapes[0], sources=resolved, params=params, model_params=model_params,
            base_index=base_index, out_dtype=self.out_dtype or self.read_dtype or first_dtype, layer=layer,
            vocabulary=vocabulary))

    def _edge_names(self, output_slice: OutputSlice, before_layers: bool) -> list[str]:
        names: dict[str, None] = {}
        for source in output_slice.sources:
            for name in self.models[source.model].checkpoint.names:
                if split_layer_name(name) is None and (any(h in name for h in _PRE_LAYER_HINTS) == before_layers):
                    names[name] = None
        if not before_layers and _TIED_HEAD[1] in names:
            del names[_TIED_HEAD[1]]
        if not before_layers and any(self.models[s.model].config.get("tie_word_embeddings") is False
                                     or _TIED_HEAD[0] in self.models[s.model].checkpoint for s in output_slice.sources):
            names.setdefault(_TIED_HEAD[0], None)
        return list(names)

    def plan(self, slices: list[OutputSlice]) -> int:
        """Fill ``self.tensors``; returns the number of output layers."""
        self.check_slices(slices)
        first, last = slices[0], slices[-1]
        for name in self._edge_names(first, before_layers=True):
            self.add_tensor(first, name, [name] * len(first.sources), 0.0, None)
        out_layer = 0
        for output_slice in slices:
            count = output_slice.sources[0].layer_range[1] - output_slice.sources[0].layer_range[0]
            lead = self.models[output_slice.sources[0].model]
            prefix = lead.layer_prefix
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                rests = lead.layer_rests(output_slice.sources[0].layer_range[0] + offset)
                for rest in rests:
                    input_names = [f"{self.models[s.model].layer_prefix}.{s.layer_range[0] + offset}.{rest}"
                                   for s in output_slice.sources]
                    self.add_tensor(output_slice, f"{prefix}.{out_layer}.{rest}", input_names, t, out_layer)
                out_layer += 1
        for name in self._edge_names(last, before_layers=False):
            self.add_tensor(last, name, [name] * len(last.sources), 1.0, None)
        return out_layer


def build_plan(recipe: Recipe) -> MergePlan:
    """Resolve the recipe's models, check everything, and list every output tensor."""
    models = {reference: load_input(reference) for reference in recipe.referenced_models()}
    planner = _Planner(recipe, models)
    slices = _normalized_slices(recipe, models)
    num_layers = planner.plan(slices)
    base = recipe.base_model
    config_model = models[base] if base else models[slices[0].sources[0].model]
    choice = recipe.tokenizer_choice
    if choice in (None, "base", "union"):
        tokenizer_model = config_model
    else:
        reference = ModelReference.parse(choice)
        if reference not in models:
            raise ConfigError(f"tokenizer source {choice} is not one of the recipe's models", where="tokenizer_source")
        tokenizer_model = models[reference]
    compute_dtype = _compute_dtype(planner.read_dtype)
    plan = MergePlan(recipe=recipe, method=planner.method, models=models, tensors=planner.tensors,
                     num_layers=num_layers, read_dtype=planner.read_dtype, compute_dtype=compute_dtype,
                     out_dtype=planner.out_dtype, config_model=config_model, tokenizer_model=tokenizer_model,
                     base_reference=base)
    if choice is not None:
        from mtool.merger.tokenizer import plan_vocabulary

        plan.vocabulary = plan_vocabulary(plan)
    if recipe.chat_template:
        plan.chat_template = resolve_chat_template(recipe.chat_template, where="chat_template",
                                                   auto_from=[m.checkpoint.folder for m in models.values()])
    plan.warnings = planner.warnings()
    for line in plan.warnings:
        ui.warn(line)
    return plan


def _compute_dtype(read_dtype: "torch.dtype | None") -> "torch.dtype":
    """Math runs in float32 (float64 when the recipe asks for it), whatever the storage dtype."""
    import torch

    return torch.float64 if read_dtype == torch.float64 else torch.float32

