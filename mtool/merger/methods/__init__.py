"""Merge methods: pure tensor functions, one module per method family, and the registry of their names.

``get_method("ties")`` returns a :class:`~mtool.merger.methods.base.MergeMethod`; the names are mergekit's, and
the registry holds the 20 methods mergekit 0.1.5 registers.
"""

from __future__ import annotations

from mtool.errors import ConfigError
from mtool.merger.methods.arcee_fusion import ARCEE_FUSION
from mtool.merger.methods.base import MergeMethod
from mtool.merger.methods.linear import LINEAR, NEARSWAP, PASSTHROUGH
from mtool.merger.methods.model_stock import MODEL_STOCK
from mtool.merger.methods.ram import RAM, RAMPLUS_TL
from mtool.merger.methods.sce import SCE
from mtool.merger.methods.spherical import KARCHER, MULTISLERP, NUSLERP, SLERP
from mtool.merger.methods.task_arithmetic import (
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DARE_LINEAR,
    DARE_TIES,
    DELLA,
    DELLA_LINEAR,
    TASK_ARITHMETIC,
    TIES,
)

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        LINEAR, SLERP, NUSLERP, MULTISLERP, KARCHER, TASK_ARITHMETIC, TIES, DARE_TIES, DARE_LINEAR, BREADCRUMBS,
        BREADCRUMBS_TIES, DELLA, DELLA_LINEAR, MODEL_STOCK, SCE, NEARSWAP, PASSTHROUGH, ARCEE_FUSION, RAM,
        RAMPLUS_TL,
    )
}


def get_method(name: str) -> MergeMethod:
    """The method called ``name`` (ConfigError listing the known names otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}", where="merge_method",
                          fix=f"use one of: {', '.join(sorted(METHODS))}") from None
