"""mergekit-moe's YAML, read as mergekit 0.1.5 reads it.

``base_model`` gives every tensor outside the MLPs (attention, norms, embeddings, head) and the hidden states the
routers are built from; each of ``experts`` gives its MLP as one expert (``source_model``, with
``positive_prompts`` / ``negative_prompts`` for the router, ``noise_scale`` to add Gaussian noise to its tensors,
``residual_scale`` to scale its ``down_proj``); ``shared_experts`` (Qwen-MoE, DeepSeek) an always-active expert;
``gate_mode`` how routers are made (``hidden``, ``hidden_avg``, ``cheap_embed``, ``random``, ``uniform_random``);
``experts_per_token`` (2), ``dtype`` (the base config's by default), ``architecture`` (``mixtral``, ``qwen``,
``qwen3``, ``deepseek``: a prefix of the output architecture's name; by default Mixtral when it fits, else the
first that does). Keys mergekit does not know are ignored, with a warning (an error with ``--strict``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mtool.errors import ConfigError

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None

    @field_validator("gate_mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        if value not in GATE_MODES:
            raise ValueError(f"unknown gate_mode {value!r}; use one of {', '.join(GATE_MODES)}")
        return value

    def check(self, *, allow_identical: bool = False) -> None:
        """mergekit-moe's refusals, as errors: too few experts, missing or identical prompts, one model
        repeated (unless ``allow_identical``: the result only makes sense after training)."""
        if self.experts_per_token < 1:
            raise ConfigError("experts_per_token must be at least 1", where="experts_per_token")
        if len(self.experts) < self.experts_per_token:
            raise ConfigError(f"{len(self.experts)} experts for {self.experts_per_token} experts per token",
                              where="experts", fix="give at least experts_per_token experts")
        if self.gate_mode == "random":
            return
        for index, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise ConfigError(f"expert {index} has no positive_prompts (gate_mode {self.gate_mode} routes by "
                                  "prompts)", where=f"experts[{index}]", fix="add positive_prompts or use "
                                  "gate_mode: random")
        if len(self.experts) > 1 and all(e.prompts() == self.experts[0].prompts() for e in self.experts[1:]):
            raise ConfigError("every expert has the same prompts: the routers could not tell them apart",
                              where="experts", fix="give each expert prompts of what should go to it")
        if not allow_identical and len(self.experts) > 1 and \
                all(e.source_model == self.experts[0].source_model for e in self.experts[1:]):
            raise ConfigError("every expert is the same model: the mixture would compute what that model "
                              "computes, with more memory", where="experts",
                              fix="use different models, or --allow-identical-experts to train the mixture afterwards")


def _ignored_keys(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    ignored = [key for key in data if key not in MoEConfig.model_fields]
    data = {key: value for key, value in data.items() if key in MoEConfig.model_fields}
    for field_name in ("experts", "shared_experts"):
        for index, expert in enumerate(data.get(field_name) or []):
            if isinstance(expert, dict):
                for key in [k for k in expert if k not in Expert.model_fields]:
                    ignored.append(f"{field_name}[{index}].{key}")
                    del expert[key]
    return data, ignored


def load_moe_config(path: str | os.PathLike) -> tuple[MoEConfig, list[str], str]:
    """The config, the keys it has that mergekit ignores, and its text (for the lineage record)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except OSError as error:
        raise ConfigError(f"cannot read the config: {error.strerror}", where=str(path)) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"malformed YAML: {error}", where=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("a mergekit-moe config is a mapping with base_model and experts", where=str(path))
    data, ignored = _ignored_keys(data)
    try:
        return MoEConfig.model_validate(data), ignored, text
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "config"
        raise ConfigError(f"{key}: {first['msg'].removeprefix('Value error, ')}", where=str(path)) from None
