"""``adapter_config.json`` of a PEFT LoRA adapter: the keys that decide a merge, validated with a schema.

PEFT writes some forty keys (more with each release); the ones below decide what an adapter computes, and each
must have the type PEFT's ``LoraConfig`` needs, or the folder is refused with the key named: ``r`` and
``rank_pattern`` values positive integers, ``lora_alpha`` and ``alpha_pattern`` values finite numbers, the
switches booleans, the patterns valid regular expressions, ``target_modules`` a name or a list of names. Other
keys are kept as they are (``extra="allow"``: a newer PEFT's keys are not an error). What the config says is then
checked against the tensors by :class:`mtool.lora.adapter.LoraAdapter` (a rank that contradicts the factors'
shapes is refused, as PEFT refuses to load such a folder).

``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched as PEFT matches them; they are matched
with the ``regex`` package under a time limit, so a pathological pattern cannot hang a command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import regex
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from mtool.errors import InputError, kind_of, printable, shown

PATTERN_TIMEOUT_S = 1.0
MAX_PATTERN_CHARS = 1000

PositiveInt = Annotated[StrictInt, Field(gt=0)]
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TokenIndex = Annotated[StrictInt, Field(ge=0)]


class AdapterConfigFile(BaseModel):
    """The merge-relevant keys of ``adapter_config.json`` (module docstring). Defaults are PEFT's."""

    model_config = ConfigDict(extra="allow", frozen=True)

    peft_type: StrictStr | None = None
    r: PositiveInt = 8
    lora_alpha: FiniteNumber = 8.0
    use_rslora: StrictBool | None = False
    use_dora: StrictBool | None = False
    fan_in_fan_out: StrictBool | None = False
    rank_pattern: dict[StrictStr, PositiveInt] | None = None
    alpha_pattern: dict[StrictStr, FiniteNumber] | None = None
    modules_to_save: list[StrictStr] | None = None
    target_modules: StrictStr | list[StrictStr] | None = None
    trainable_token_indices: list[TokenIndex] | dict[StrictStr, list[TokenIndex]] | None = None
    base_model_name_or_path: StrictStr | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_compile(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for pattern in value or {}:
            if len(pattern) > MAX_PATTERN_CHARS:
                raise ValueError(f"a pattern of {len(pattern):,} characters (at most {MAX_PATTERN_CHARS})")
            try:
                regex.compile(pattern)
            except regex.error as error:
                raise ValueError(f"{shown(pattern, 60)} is not a regular expression ({error})") from None
        return value


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any, *, where: str = "") -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` rule: the first key that, as a regex, matches the end of the
    module name at a dot boundary (``re.match(rf"(.*\\.)?({key})$", module)``) gives the value."""
    for pattern, value in (patterns or {}).items():
        try:
            if regex.match(rf"(.*\.)?({pattern})$", module, timeout=PATTERN_TIMEOUT_S):
                return value
        except TimeoutError:
            raise InputError(f"the pattern {shown(pattern, 60)} takes too long to match {shown(module, 80)}",
                             where=where, fix="write a simpler pattern (a module name, or names joined by |)") \
                from None
    return default


# What each validated key must be, in the words of the error messages.
RULES = {
    "peft_type": "must be a string such as LORA",
    "r": "must be a positive integer",
    "lora_alpha": "must be a finite number",
    "use_rslora": "must be true or false",
    "use_dora": "must be true or false",
    "fan_in_fan_out": "must be true or false",
    "rank_pattern": "must map regular expressions to positive integers",
    "alpha_pattern": "must map regular expressions to finite numbers",
    "modules_to_save": "must be a list of module names",
    "target_modules": "must be a module name, a regular expression or a list of module names",
    "trainable_token_indices": "must be a list of token ids, or map module names to such lists",
    "base_model_name_or_path": "must be a string",
}


def read_adapter_config(data: object, where: str) -> AdapterConfigFile:
    """``data`` (the parsed JSON) validated; :class:`InputError` names the first bad key and what it holds."""
    if not isinstance(data, dict):
        raise InputError(f"adapter_config.json must be a JSON object, not {kind_of(data)}", where=where,
                         fix="restore the adapter_config.json PEFT wrote with these weights")
    try:
        return AdapterConfigFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        detail = printable(first["msg"].removeprefix("Value error, "))[:200] if first["type"] == "value_error" \
            else RULES.get(key, "has the wrong type")
        raise InputError(f"adapter_config.json: {key} {detail}, got {shown(data.get(key), 60)}", where=where,
                         fix="restore the adapter_config.json PEFT wrote with these weights") from None


@dataclass(frozen=True)
class AdapterSettings:
    """The parts of ``adapter_config.json`` that decide the merge."""

    rank: int
    alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    target_modules: Any = None
    trainable_token_indices: Any = None
    base_model: str | None = None
    where: str = ""

    @classmethod
    def from_file(cls, config: AdapterConfigFile, where: str) -> "AdapterSettings":
        return cls(
            rank=config.r,
            alpha=float(config.lora_alpha),
            use_rslora=bool(config.use_rslora),
            use_dora=bool(config.use_dora),
            fan_in_fan_out=bool(config.fan_in_fan_out),
            rank_pattern=dict(config.rank_pattern or {}),
            alpha_pattern={key: float(value) for key, value in (config.alpha_pattern or {}).items()},
            modules_to_save=tuple(config.modules_to_save or ()),
            target_modules=config.target_modules,
            trainable_token_indices=config.trainable_token_indices,
            base_model=config.base_model_name_or_path,
            where=where,
        )

    def alpha_for(self, module: str) -> float:
        return float(pattern_value(self.alpha_pattern, module, self.alpha, where=self.where))

    def rank_for(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.rank, where=self.where))
