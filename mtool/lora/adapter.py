"""Reading a PEFT LoRA adapter folder into typed per-module factors, and applying it to base tensors.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For each adapted module
``M`` of the base (``model.layers.0.self_attn.q_proj``) the weights file has

* ``base_model.model.M.lora_A.weight`` (r x in) and ``base_model.model.M.lora_B.weight`` (out x r);
  embeddings use ``base_model.model.M.lora_embedding_A`` (r x vocab) / ``lora_embedding_B`` (dim x r);
* ``base_model.model.M.lora_magnitude_vector`` (DoRA, one value per output feature);
* ``base_model.model.M.lora_B.bias`` (``lora_bias=True``), added to ``M.bias`` times the scale;

plus, for ``modules_to_save``, a full copy of the module's tensors under ``base_model.model.M.weight``;
for ``trainable_token_indices``, ``base_model.model.M.token_adapter.trainable_tokens_delta`` (the new rows);
and, when embeddings were adapted, possibly the whole base embedding as ``M.base_layer.weight`` (PEFT's
``save_embedding_layers``: it replaces the base's tensor when PEFT loads the adapter).

The base tensor a module adapts is ``M.weight``; the merged tensor is (see :mod:`mtool.lora.lowrank`)

    W' = W + s * B @ A                               (transposed for fan_in_fan_out layers and embeddings)
    W' = m / ||W + s * B @ A|| * (W + s * B @ A)     (DoRA)

with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA); ``r`` and ``alpha`` come from ``rank_pattern`` /
``alpha_pattern`` when a pattern matches the module. Everything is computed in float32.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool.errors import InputError, printable, shown
from mtool.io.reading import Checkpoint, open_checkpoint
from mtool.lora.config import AdapterSettings, pattern_value, read_adapter_config
from mtool.lora.lowrank import dora_weight, lora_delta, lora_scale

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"

# Config entries of LoRA variants whose merge is not W + s*B@A (or DoRA): refused with a clear message.
UNSUPPORTED_VARIANTS: dict[str, str] = {
    "use_alora": "activated LoRA (aLoRA) applies only after its invocation tokens and cannot be merged",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after its invocation tokens and cannot be merged",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "layer_replication": "layer replication (it changes the model's layer structure)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
}


def settings_from_config(config: dict[str, Any], where: str) -> AdapterSettings:
    """The merge settings of a LoRA adapter's config; other PEFT types and LoRA variants whose merge is not
    ``W + s B A`` (or DoRA) are refused, and every key that decides the merge is validated
    (:mod:`mtool.lora.config`)."""
    validated = read_adapter_config(config, where)
    peft_type = (validated.peft_type or "").upper()
    if peft_type != "LORA":
        shown_type = printable(peft_type[:40]) if peft_type else "unknown (no peft_type)"
        raise InputError(f"adapter type {shown_type} is not supported: mtool handles LoRA adapters (plain, rsLoRA, "
                         "DoRA)", where=where, fix="merge this adapter with PEFT's merge_and_unload instead")
    for key, description in UNSUPPORTED_VARIANTS.items():
        if config.get(key):
            raise InputError(f"this LoRA variant is not supported: {description} ({key} is set)", where=where,
                             fix="merge this adapter with PEFT's merge_and_unload instead")
    return AdapterSettings.from_file(validated, where)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors live and how they combine into the base tensor ``weight_name``."""

    module: str  # base module name, e.g. model.layers.0.self_attn.q_proj
    key_a: str
    key_b: str
    rank: int
    alpha: float
    scale: float
    transposed: bool  # the base tensor is (in x out): fan_in_fan_out layers and embeddings
    is_embedding: bool
    magnitude_key: str | None = None  # DoRA
    bias_key: str | None = None  # lora_bias: lora_B.bias

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.bias"

    @property
    def is_dora(self) -> bool:
        return self.magnitude_key is not None


@dataclass(frozen=True)
class TokenRows:
    """Trainable tokens: rows ``indices`` of ``weight_name`` are replaced by the tensor ``key``."""

    weight_name: str
    key: str
    indices: tuple[int, ...]


_FACTOR_A = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_embedding_A)(?:\.[^.]+)?(?:\.weight)?$")


class LoraAdapter:
    """A PEFT LoRA adapter, read lazily: factors are loaded from disk when a tensor asks for them.

    ``targets`` maps each base tensor name the adapter changes with low-rank factors to its
    :class:`LoraModule`; ``replacements`` maps base tensor names to adapter tensors that replace them
    (``modules_to_save``, saved embedding layers); ``token_rows`` lists trainable-token row updates;
    ``bias_updates`` maps base bias names to the modules whose ``lora_B.bias`` is added to them.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        config_path = self.folder / ADAPTER_CONFIG
        if not self.folder.is_dir():
            raise InputError("adapter folder not found", where=str(self.folder), fix="check the path")
        if not config_path.is_file():
            raise InputError(f"not a PEFT adapter folder: {ADAPTER_CONFIG} is missing", where=str(self.folder),
                             fix="point at the folder PEFT's save_pretrained wrote")
        self.checkpoint: Checkpoint = open_checkpoint(self.folder)
        self.config: dict[str, Any] = self.checkpoint.read_json(ADAPTER_CONFIG) or {}
        self.settings = settings_from_config(self.config, str(config_path))
        self.targets: dict[str, LoraModule] = {}
        self.replacements: dict[str, str] = {}
        self.token_rows: dict[str, TokenRows] = {}
        self._index_tensors()
        if not self.targets and not self.replacements and not self.token_rows:
            raise InputError("the adapter has no LoRA tensors", where=str(self.folder))
        self.bias_updates: dict[str, LoraModule] = {
            module.bias_name: module for module in self.targets.values() if module.bias_key}
        self._changed = frozenset(self.targets) | frozenset(self.replacements) | frozenset(self.token_rows) \
            | frozenset(self.bias_updates)

    # -- reading the folder -------------------------------------------------------------------------

    def _index_tensors(self) -> None:
        names = self.checkpoint.names
        for key in names:
            if not key.startswith(PEFT_PREFIX):
                raise InputError(f"the tensor {shown(key)} is not a PEFT adapter's (PEFT names start with "
                                 f"{PEFT_PREFIX!r})", where=str(self.folder),
                                 fix="point at the folder PEFT's save_pretrained wrote")
        for key in names:
            name = key[len(PEFT_PREFIX):]
            match = _FACTOR_A.match(name)
            if match:
                self._add_module(key, match.group("module"), embedding=match.group("kind") == "lora_embedding_A")
            elif ".token_adapter.trainable_tokens_delta" in name:
                module = name.split(".token_adapter.")[0]
                weight = f"{module}.weight"
                self.token_rows[weight] = TokenRows(weight, key, self._token_indices(module, key))
            elif ".lora_" in name:
                continue  # B factors, magnitudes and biases are found from their A factor
            else:  # a modules_to_save copy or a saved embedding layer: a full replacement of a base tensor
                base_name = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
                self.replacements[base_name] = key

    def _add_module(self, key_a: str, module: str, *, embedding: bool) -> None:
        key_b = (key_a.replace("lora_embedding_A", "lora_embedding_B") if embedding
                 else key_a.replace(".lora_A", ".lora_B"))
        if key_b not in self.checkpoint:
            raise InputError(f"adapter tensor {key_a} has no matching B factor {key_b}", where=str(self.folder))
        info_a, info_b = self.checkpoint.info(key_a), self.checkpoint.info(key_b)
        if len(info_a.shape) != 2 or len(info_b.shape) != 2:
            raise InputError(f"LoRA on convolution layers is not supported ({key_a} has shape {list(info_a.shape)})",
                             where=str(self.folder))
        rank = info_a.shape[0]
        where = str(self.folder)
        if info_b.shape[1] != rank:
            raise InputError(f"LoRA factors of {shown(module)} disagree: A is {list(info_a.shape)}, B is "
                             f"{list(info_b.shape)}", where=where, fix="write the adapter again with PEFT")
        if rank <= 0:
            raise InputError(f"LoRA rank of {shown(module)} is {rank}", where=where, fix="write the adapter again")
        configured = self.settings.rank_for(module)
        if configured != rank:  # PEFT builds the layer with the configured rank and cannot load these factors
            raise InputError(f"{ADAPTER_CONFIG} gives {shown(module)} rank {configured} (r / rank_pattern) but its "
                             f"factors have rank {rank} (A is {list(info_a.shape)})", where=where,
                             fix=f"restore the {ADAPTER_CONFIG} PEFT wrote with these weights")
        alpha = self.settings.alpha_for(module)
        prefix = f"{PEFT_PREFIX}{module}."
        magnitude = next((k for k in (f"{prefix}lora_magnitude_vector", f"{prefix}lora_magnitude_vector.weight")
                          if k in self.checkpoint), None)
        if (magnitude is not None) != self.settings.use_dora:
            state = "use_dora is true but" if self.settings.use_dora else "use_dora is false but"
            found = "it has no DoRA magnitude vector" if magnitude is None else "it has a DoRA magnitude vector"
            raise InputError(f"{ADAPTER_CONFIG} and the weights disagree about {shown(module)}: {state} {found}",
                             where=where, fix=f"restore the {ADAPTER_CONFIG} PEFT wrote with these weights")
        bias = f"{prefix}lora_B.bias" if f"{prefix}lora_B.bias" in self.checkpoint else None
        self.targets[f"{module}.weight"] = LoraModule(
            module=module, key_a=key_a, key_b=key_b, rank=rank, alpha=alpha,
            scale=lora_scale(alpha, rank, rslora=self.settings.use_rslora),
            transposed=embedding or self.settings.fan_in_fan_out, is_embedding=embedding,
            magnitude_key=magnitude, bias_key=bias)

    def _token_indices(self, module: str, key: str) -> tuple[int, ...]:
        indices = self.settings.trainable_token_indices
        if isinstance(indices, dict):
            indices = pattern_value(indices, module, None, where=self.settings.where)
        if not isinstance(indices, list):
            raise InputError(f"trainable tokens of {shown(module)} have no indices in {ADAPTER_CONFIG}",
                             where=str(self.folder), fix=f"restore the {ADAPTER_CONFIG} PEFT wrote")
        rows = self.checkpoint.info(key).shape
        if not rows or rows[0] != len(indices):
            raise InputError(f"{ADAPTER_CONFIG} lists {len(indices)} trainable tokens for {shown(module)} but the "
                             f"adapter holds {rows[0] if rows else 0} rows", where=str(self.folder),
                             fix=f"restore the {ADAPTER_CONFIG} PEFT wrote with these weights")
        return tuple(indices)

    # -- what the adapter changes --------------------------------------------------------------------

    @property
    def base_model_id(self) -> str | None:
        return self.settings.base_model

    @property
    def use_dora(self) -> bool:
        return any(module.is_dora for module in self.targets.values())

    def changed_tensors(self) -> frozenset[str]:
        """Every base tensor name this adapter changes (low-rank targets, replacements, token rows, biases);
        ``bias_updates`` maps a base bias name to the module whose ``lora_B.bias`` (times the scale) it gets."""
        return self._changed

    def touches(self, name: str) -> bool:
        return name in self._changed

    # -- tensors ---------------------------------------------------------------------------------------

    def factors(self, name: str) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(A, B)`` of the module adapting base tensor ``name``, as stored (r x in, out x r), float32."""
        module = self.targets[name]
        return self.checkpoint.read(module.key_a).float(), self.checkpoint.read(module.key_b).float()

    def delta_for(self, name: str) -> "torch.Tensor | None":
        """The low-rank update ``s * B @ A`` of base tensor ``name`` in float32, laid out like that tensor; for a
        bias, ``s * lora_B.bias``. None when the adapter has no low-rank update for ``name``.

        For DoRA modules the merged tensor also depends on the base weight: use :meth:`apply`.
        """
        module = self.targets.get(name)
        if module is not None:
            a, b = self.factors(name)
            return lora_delta(a, b, module.scale, transposed=module.transposed)
        module = self.bias_updates.get(name)
        if module is not None:
            return self.checkpoint.read(module.bias_key).float().mul_(module.scale)
        return None

    def replacement_for(self, name: str) -> "torch.Tensor | None":
        """The adapter's full copy of base tensor ``name`` (``modules_to_save`` / saved embeddings), or None."""
        key = self.replacements.get(name)
        return None if key is None else self.checkpoint.read(key)

    def apply(self, name: str, weight: "torch.Tensor", *, strength: float = 1.0,
              original: "torch.Tensor | None" = None) -> "torch.Tensor":
        """The float32 tensor ``name`` after this adapter, given the base's ``weight`` (any dtype).

        Order as PEFT loads and merges: a replacement (``modules_to_save``, a saved embedding layer) takes the
        base tensor's place, then the low-rank update is added (``strength`` multiplies it), DoRA rescales, and
        trainable-token rows are written. ``original`` is the unmerged base for DoRA's norm when ``weight``
        already holds earlier adapters (defaults to ``weight``).
        """
        weight = weight.float()
        replacement = self.replacement_for(name)
        if replacement is not None:
            self._check_shape(name, tuple(weight.shape), tuple(replacement.shape), "full copy")
            weight = replacement.float()
            original = weight
        delta = self.delta_for(name)
        if delta is not None:
            self._check_shape(name, tuple(weight.shape), tuple(delta.shape), "update")
            if strength != 1.0:
                delta = delta.mul_(strength)
            module = self.targets.get(name)
            if module is not None and module.is_dora:
                magnitude = self.checkpoint.read(module.magnitude_key)
                weight = dora_weight(weight, delta, magnitude, transposed=module.transposed, original=original)
            else:
                weight = weight + delta
        return self.write_token_rows(name, weight)

    def write_token_rows(self, name: str, weight: "torch.Tensor", *, rows_of: str | None = None) -> "torch.Tensor":
        """``weight`` with the trainable-token rows of ``rows_of`` (default ``name``) written in (float32)."""
        rows = self.token_rows.get(rows_of or name)
        if rows is None:
            return weight
        import torch

        if max(rows.indices) >= weight.shape[0]:
            raise InputError(f"trainable token index {max(rows.indices)} is outside {name} ({weight.shape[0]} rows)",
                             where=str(self.folder), fix="use the base model the adapter was trained on")
        values = self.checkpoint.read(rows.key).float()
        return weight.float().index_copy(0, torch.tensor(rows.indices, dtype=torch.long), values)

    def _check_shape(self, name: str, base_shape: tuple, adapter_shape: tuple, what: str) -> None:
        if base_shape != adapter_shape:
            raise InputError(f"the adapter does not fit this base: {name} is {list(base_shape)} in the base but the "
                             f"adapter's {what} is {list(adapter_shape)}", where=str(self.folder),
                             fix="use the base model the adapter was trained on")

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        """The base shape of ``name`` the adapter implies, read from the headers only (None if it does not say)."""
        module = self.targets.get(name)
        if module is not None:
            a, b = self.checkpoint.info(module.key_a).shape, self.checkpoint.info(module.key_b).shape
            out_features, in_features = b[0], a[1]
            return (in_features, out_features) if module.transposed else (out_features, in_features)
        if name in self.replacements:
            return tuple(self.checkpoint.info(self.replacements[name]).shape)
        module = self.bias_updates.get(name)
        if module is not None:
            return tuple(self.checkpoint.info(module.bias_key).shape)
        return None


def refuse_adapter(folder: str | os.PathLike, *, what: str = "a model", fix: str | None = None) -> None:
    """Raise :class:`InputError` when ``folder`` holds a PEFT adapter where ``what`` (a full model) is needed,
    naming the adapter's base model so the user knows what to give instead."""
    config_path = Path(folder) / ADAPTER_CONFIG
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = {}
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    raise InputError(f"this is a LoRA adapter, not {what}" + (f"; its base model is {base}" if base else ""),
                     where=str(folder), fix=fix or (f"give its base model ({base}) here" if base
                                                    else "give the adapter's base model here"))


def load_lora(folder: str | os.PathLike) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder (raises :class:`InputError` with a clear message when it is not one)."""
    return LoraAdapter(folder)
