"""The merge plan: for every output tensor, which input tensors, which method, which parameters, which dtypes.

The plan is built and checked completely before a byte is written: every model exists, every tensor is
present in every input that should have it, shapes agree, parameters are valid. The executor then only
reads, computes and writes.

Planning follows mergekit 0.1.5 (:mod:`~mtool.merger.normalize` turns the recipe into slices per module).
Within a module, output layers are numbered from 0 across its slices; gradients run over each slice's layers:
layer ``i`` of ``n`` sits at ``t = i / (n - 1)`` (``t = 1`` for a one-layer slice). Tensors before the layers
(embeddings) take the first slice's models and settings at ``t = 0``; tensors after the layers (final norm,
``lm_head``) take the last slice's settings at ``t = 0`` too (``t = 1`` with ``mtool: {post_layer_t: 1}``) and
its models, as many as the first slice has (mergekit's rule: further ones are left out, with a warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mtool.chat_templates import resolve_chat_template
from mtool.errors import ConfigError, InputError
from mtool.hub import ModelRef, resolve_model
from mtool.io.dtypes import parse_dtype
from mtool.io.reading import Checkpoint, open_checkpoint
from mtool.lora.adapter import refuse_adapter
from mtool.merger import layout, precision
from mtool.merger.conversion import Stacked, converted_names
from mtool.merger.diagnostics import Diagnostics
from mtool.merger.methods import get_method
from mtool.merger.methods.base import BasePolicy, MergeMethod, ParameterValue, Scope
from mtool.merger.normalize import ModelShape, ModuleSlices, normalize
from mtool.merger.params import resolve_parameter
from mtool.merger.recipe import ModelReference, MtoolSettings, OutputSlice, Recipe

if TYPE_CHECKING:
    import torch

    from mtool.lora.adapter import LoraAdapter

split_layer_name = layout.split_layer_name


@dataclass
class InputModel:
    """A model a recipe reads: where it is, its tensors, its config, the LoRA applied to it if any."""

    reference: ModelReference
    ref: ModelRef
    checkpoint: Checkpoint
    config: dict
    adapter: "LoraAdapter | None" = None
    adapter_ref: ModelRef | None = None
    _counts: dict[str, int] | None = field(default=None, repr=False)
    _sources: "dict[str, str | Stacked] | None" = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return str(self.reference)

    @property
    def sources(self) -> "dict[str, str | Stacked]":
        """Every tensor in the layout transformers 5 builds the model in (:mod:`~mtool.merger.conversion`), mapped
        to the checkpoint tensor (or the stack of them) it is read from."""
        if self._sources is None:
            self._sources = converted_names(self.config.get("model_type"), self.checkpoint.names)
        return self._sources

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def shape(self, name: str) -> tuple[int, ...]:
        source = self.sources[name]
        return tuple(self.checkpoint.info(source).shape) if isinstance(source, str) else source.shape(self.checkpoint)

    def dtype(self, name: str) -> "torch.dtype":
        source = self.sources[name]
        return self.checkpoint.info(source if isinstance(source, str) else source.parts[0][0]).dtype

    def read(self, name: str) -> "torch.Tensor":
        source = self.sources[name]
        return self.checkpoint.read(source) if isinstance(source, str) else source.read(self.checkpoint)

    def stored_name(self, name: str) -> str | None:
        """The checkpoint tensor ``name`` is read from as it is (None for a stack)."""
        source = self.sources[name]
        return source if isinstance(source, str) else None

    def layer_count(self, prefix: str) -> int:
        if self._counts is None:
            self._counts = layout.layer_counts(self.names)
        return self._counts.get(prefix, 0)

    def layer_rests(self, prefix: str, index: int) -> list[str]:
        """The tensor names of layer ``index`` of module ``prefix`` without the ``<prefix>.<index>.`` part."""
        return [parts[2] for n in self.names
                if (parts := split_layer_name(n)) and parts[0] == prefix and parts[1] == index]

    def resolve_tensor(self, name: str) -> str | None:
        """The tensor that stands for ``name`` in this model: itself, or the input embedding for a tied
        ``lm_head``."""
        if name in self.sources:
            return name
        if name.endswith(layout.LM_HEAD):
            return layout.input_embedding(self.names)
        return None


@dataclass(frozen=True)
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
    working_dtype: "torch.dtype"  # the inputs' common dtype (or the recipe's dtype)
    compute_dtype: "torch.dtype"  # what the method's inputs are handed over in
    out_dtype: "torch.dtype"
    layer: int | None = None
    module: str = ""
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
    num_layers: int  # the language tower's output layers
    read_dtype: "torch.dtype | None"  # the recipe's dtype: inputs are rounded to it when read
    out_dtype: "torch.dtype | None"
    config_model: InputModel
    tokenizer_model: InputModel | None
    base_reference: ModelReference | None
    settings: MtoolSettings = field(default_factory=MtoolSettings)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    module_layers: dict[str, int] = field(default_factory=dict)
    vocabulary: "object | None" = None  # merger.tokenizer.VocabularyPlan when the tokenizer is merged
    chat_template: str | None = None  # the recipe's chat_template, resolved to its Jinja text

    def by_layer(self) -> dict[tuple[str, int | None], list[TensorPlan]]:
        groups: dict[tuple[str, int | None], list[TensorPlan]] = {}
        for tensor in self.tensors:
            groups.setdefault((tensor.module, tensor.layer), []).append(tensor)
        return groups


def load_input(reference: ModelReference) -> InputModel:
    ref = resolve_model(reference.model, reference.revision)
    refuse_adapter(ref.path, fix=f"write it as BASE+{reference.model} to apply it to its base")
    checkpoint = open_checkpoint(ref.path)
    config = checkpoint.read_json("config.json") or {}
    adapter = adapter_ref = None
    if reference.adapter:
        from mtool.lora.adapter import load_lora

        adapter_ref = resolve_model(reference.adapter)
        adapter = load_lora(adapter_ref.path)
    return InputModel(reference, ref, checkpoint, config, adapter, adapter_ref)


class _Planner:
    """Builds the tensor list of a :class:`MergePlan`; one instance per plan."""

    def __init__(self, recipe: Recipe, models: dict[ModelReference, InputModel], diagnostics: Diagnostics) -> None:
        from mtool.merger.checks import check_parameter_blocks

        self.recipe = recipe
        self.models = models
        self.diagnostics = diagnostics
        self.method = get_method(recipe.merge_method)
        self.read_dtype = parse_dtype(recipe.dtype, where="the recipe's dtype") if recipe.dtype else None
        self.out_dtype = parse_dtype(recipe.out_dtype, where="the recipe's out_dtype") if recipe.out_dtype else None
        self.math = recipe.mtool.math
        self.tensors: list[TensorPlan] = []
        self._ranges_noted: set[str] = set()
        check_parameter_blocks(recipe, self.method, diagnostics)

    def _resolve(self, module: ModuleSlices, output_slice: OutputSlice, tensor_name: str, input_names: list[str],
                 source_models: list[ModelReference], base_index: int | None, t: float
                 ) -> tuple[dict[str, ParameterValue], list[dict[str, ParameterValue]]]:
        shared_sources = (output_slice.parameters, module.parameters, self.recipe.parameters)
        where = f"tensor {tensor_name}"
        params = {p.name: resolve_parameter(p, shared_sources, tensor_name=tensor_name, t=t, where=where)
                  for p in self.method.parameters if p.scope is Scope.SHARED}
        base = self._base_of(output_slice)
        model_params = []
        for index, (model, input_name) in enumerate(zip(source_models, input_names)):
            own = next((s.parameters for s in output_slice.sources if s.model == model), None)
            sources = (own, output_slice.parameters, module.parameters, self.recipe.parameters)
            model_params.append({
                p.name: resolve_parameter(p, sources, tensor_name=input_name, t=t, where=f"{where} of {model}")
                for p in self.method.parameters
                if p.scope is Scope.INPUT or (p.scope is Scope.NON_BASE and model != base)
            })
        for check in self.method.extra_checks:
            check(params, model_params, where)
        for values in [params, *model_params]:
            for name, value in values.items():
                spec = self.method.parameter(name)
                allowed = spec.outside_range(value) if spec is not None else None
                if allowed and name not in self._ranges_noted:
                    self._ranges_noted.add(name)
                    self.diagnostics.note(f"parameter {name!r} = {value:g} lies outside {allowed} (first at "
                                          f"{tensor_name}); mergekit accepts it and so does mtool")
        return params, model_params

    def _base_of(self, output_slice: OutputSlice) -> ModelReference | None:
        return output_slice.base_model or self.recipe.base_model

    def _base_index(self, output_slice: OutputSlice, models: list[ModelReference]) -> int | None:
        if self.method.base is BasePolicy.IGNORED:
            return None
        base = self._base_of(output_slice)
        return models.index(base) if base in models else None

    def check_slices(self, module: ModuleSlices) -> None:
        for i, output_slice in enumerate(module.slices):
            where = f"{module.label}[{i}]" if module.label.endswith("slices") else module.label
            base = self._base_of(output_slice)
            models = [s.model for s in output_slice.sources]
            if len(set(models)) != len(models):
                raise ConfigError("a model is listed twice in the same slice", where=where,
                                  fix="list each model once (give it a larger weight instead)")
            if base is not None and self.method.base is not BasePolicy.IGNORED and base not in models:
                raise ConfigError(f"the base model {base} is not among the slice's sources", where=where)
            self.method.check_inputs(len(models), base in models and base is not None, where=where)
            if output_slice.residual_weight is not None:
                self.diagnostics.ignored("`residual_weight` has no effect (mergekit reads and ignores it)",
                                         where=where)
            for j, source in enumerate(output_slice.sources):
                available = self.models[source.model].layer_count(module.prefix)
                if source.layer_range[1] > available:
                    raise ConfigError(f"layer_range {list(source.layer_range)} goes past the {available} layers of "
                                      f"{source.model}", where=f"{where}.sources[{j}]")

    def add_tensor(self, module: ModuleSlices, output_slice: OutputSlice, name: str, input_names: list[str],
                   models: list[ModelReference], t: float, layer: int | None) -> None:
        base_index = self._base_index(output_slice, models)
        resolved: list[TensorSource] = []
        missing = []
        for model_ref, input_name in zip(models, input_names):
            model = self.models[model_ref]
            actual = model.resolve_tensor(input_name)
            if actual is None:
                missing.append(str(model_ref))
            else:
                resolved.append(TensorSource(model, actual))
        if missing:
            raise InputError(f"tensor {input_names[0]!r} is missing from {', '.join(missing)}",
                             fix="every model of a merge must have the same architecture")
        shapes = [s.model.shape(s.tensor) for s in resolved]
        vocabulary = layer is None and layout.is_vocabulary_tensor(
            name, shapes[0], layout.vocabulary_size(resolved[0].model.config))
        rows_only = len({shape[1:] for shape in shapes}) == 1  # only the number of rows (tokens) differs
        if len(set(shapes)) > 1 and not (vocabulary and rows_only and self.recipe.tokenizer_choice):
            listing = ", ".join(f"{s.model.label} {list(shape)}" for s, shape in zip(resolved, shapes))
            if vocabulary and rows_only:
                fix = "the vocabularies differ: set `tokenizer_source: base` (or union) to align them"
            else:
                fix = "the models differ in their architecture (hidden size, layers' widths): merge models of one " \
                      "architecture and size"
            raise InputError(f"shape mismatch for tensor {name!r}: {listing}", fix=fix)
        params, model_params = self._resolve(module, output_slice, name, input_names, models, base_index, t)
        working = precision.working_dtype(self.read_dtype,
                                          (s.model.dtype(s.tensor) for s in resolved))
        self.tensors.append(TensorPlan(
            name=name, shape=shapes[0], sources=resolved, params=params, model_params=model_params,
            base_index=base_index, working_dtype=working,
            compute_dtype=precision.compute_dtype(self.method, working, self.math),
            out_dtype=precision.result_dtype(self.method, working, self.math, self.out_dtype),
            layer=layer, module=module.prefix, vocabulary=vocabulary))

    def _loose_names(self, module: ModuleSlices, shape: ModelShape, output_slice: OutputSlice,
                     before: bool) -> list[str]:
        names: dict[str, None] = {}
        for source in output_slice.sources:
            for name in self.models[source.model].names:
                if split_layer_name(name) is None and layout.before_layers(name) == before and \
                        layout.owner(name, shape.prefixes, shape.language) == module.prefix:
                    names[name] = None
        return list(names)

    def plan(self, modules: list[ModuleSlices], shape: ModelShape) -> dict[str, int]:
        """Fill ``self.tensors``; returns each module's number of output layers."""
        counts = {}
        post_t = float(self.recipe.mtool.post_layer_t)
        for module in modules:
            self.check_slices(module)
            first, last = module.slices[0], module.slices[-1]
            first_models = [s.model for s in first.sources]
            for name in self._loose_names(module, shape, first, before=True):
                self.add_tensor(module, first, name, [name] * len(first_models), first_models, 0.0, None)
            out_layer = 0
            for output_slice in module.slices:
                count = output_slice.sources[0].layer_range[1] - output_slice.sources[0].layer_range[0]
                lead = self.models[output_slice.sources[0].model]
                models = [s.model for s in output_slice.sources]
                for offset in range(count):
                    t = offset / (count - 1) if count > 1 else 1.0
                    for rest in lead.layer_rests(module.prefix, output_slice.sources[0].layer_range[0] + offset):
                        inputs = [f"{module.prefix}.{s.layer_range[0] + offset}.{rest}" for s in output_slice.sources]
                        self.add_tensor(module, output_slice, f"{module.prefix}.{out_layer}.{rest}", inputs, models,
                                        t, out_layer)
                    out_layer += 1
            counts[module.prefix] = out_layer
            last_models = [s.model for s in last.sources][:len(first_models)]
            if len(last.sources) > len(first_models):
                left_out = ", ".join(str(s.model) for s in last.sources[len(first_models):])
                self.diagnostics.note(f"the tensors after the layers of {module.prefix} leave out {left_out}: "
                                      "mergekit merges them from as many of the last slice's models as the first "
                                      "slice has")
            for name in self._loose_names(module, shape, last, before=False):
                self.add_tensor(module, last, name, [name] * len(last_models), last_models, post_t, None)
        return counts


def build_plan(recipe: Recipe, *, strict: bool = False) -> MergePlan:
    """Resolve the recipe's models, check everything, and list every output tensor."""
    diagnostics = Diagnostics(strict=strict)
    for key in recipe.ignored_keys:
        known = recipe.resembled_key(key)
        diagnostics.ignored(f"recipe key {key!r} is not read (mergekit ignores it too)", where=recipe.where(key),
                            fix=f"did you mean `{known}`?" if known else None)
    models = {reference: load_input(reference) for reference in recipe.referenced_models()}
    planner = _Planner(recipe, models, diagnostics)
    base = recipe.base_model
    first = next(iter(recipe.referenced_models()))
    config_model = models[base] if base else models[first]
    shape = ModelShape.of(config_model.names)
    modules = normalize(recipe, shape, lambda model, prefix: models[model].layer_count(prefix), diagnostics)
    counts = planner.plan(modules, shape)
    choice = recipe.tokenizer_choice
    if choice in (None, "base", "union"):
        tokenizer_model = config_model
    else:
        reference = ModelReference.parse(choice)
        if reference not in models:
            raise ConfigError(f"tokenizer source {choice} is not one of the recipe's models", where="tokenizer_source")
        tokenizer_model = models[reference]
    plan = MergePlan(recipe=recipe, method=planner.method, models=models, tensors=planner.tensors,
                     num_layers=counts.get(shape.language, 0), read_dtype=planner.read_dtype,
                     out_dtype=planner.out_dtype, config_model=config_model, tokenizer_model=tokenizer_model,
                     base_reference=base, settings=recipe.mtool, diagnostics=diagnostics, module_layers=counts)
    if choice is not None:
        from mtool.merger.tokenizer import plan_vocabulary

        plan.vocabulary = plan_vocabulary(plan)
    if recipe.chat_template:
        from mtool.chat_templates import BUILTIN_TEMPLATES

        if recipe.chat_template in BUILTIN_TEMPLATES:
            diagnostics.note(f"chat_template {recipe.chat_template!r} is mtool's own template; mergekit ships its own "
                             "file of that name, whose whitespace may differ (its chatml adds a blank line before "
                             "the assistant's turn)")
        plan.chat_template = resolve_chat_template(recipe.chat_template, where="chat_template",
                                                   auto_from=[m.checkpoint.folder for m in models.values()])
    return plan
