"""The closed list of Methods a model name may carry, and the Hub ``base_model_relation`` each implies.

A Method names the operation that made the artifact: a training objective (SFT, DPO, ...) implies the
relation ``finetune``; a merge method (SLERP, TIES, ...) implies ``merge``; an adapter operation
(Extract, Resize) implies ``adapter``. Whatever the Method, a name ending in ``-LoRA`` is an ``adapter``
of its base, and a name with an encoding part (``-GGUF``, ``-Q4_K_M``) is ``quantized``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Relation = Literal["finetune", "merge", "adapter", "quantized"]
Kind = Literal["training", "merge", "adapter"]


@dataclass(frozen=True)
class Method:
    """One entry of the closed list.

    ``name`` is the canonical spelling used in names; ``aliases`` are the lower-case spellings found in
    lineage records (mergekit method names, PEFT combination types, training objectives) and in
    community names; ``record_aliases`` are words that name the Method in a lineage record but are too
    generic to be read as a Method inside a name ("cat", "svd", "full").
    """

    name: str
    kind: Kind
    description: str
    aliases: tuple[str, ...] = ()  # found in lineage records and in community names
    record_aliases: tuple[str, ...] = ()  # found in lineage records only (too generic inside a name)

    @property
    def relation(self) -> Relation:
        """The Hub relation the Method implies for a full model (``-LoRA`` makes any Method ``adapter``)."""
        return {"training": "finetune", "merge": "merge", "adapter": "adapter"}[self.kind]


METHODS: tuple[Method, ...] = (
    # training objectives
    Method("SFT", "training", "supervised fine-tuning", ("sft",), ("ft", "finetune", "fine-tune", "sft_lora")),
    Method("CPT", "training", "continued pre-training", ("cpt",), ("pretrain", "pretraining", "continued_pretraining")),
    Method("DPO", "training", "direct preference optimization", ("dpo",)),
    Method("IPO", "training", "identity preference optimization", ("ipo",)),
    Method("KTO", "training", "Kahneman-Tversky optimization", ("kto",)),
    Method("ORPO", "training", "odds-ratio preference optimization", ("orpo",)),
    Method("SimPO", "training", "simple preference optimization", ("simpo",)),
    Method("CPO", "training", "contrastive preference optimization", ("cpo",)),
    Method("GRPO", "training", "group relative policy optimization", ("grpo",)),
    Method("PPO", "training", "reinforcement learning from feedback with PPO", ("ppo", "rlhf")),
    # merges (mergekit method names, PEFT combination types)
    Method("Linear", "merge", "weighted average", ("linear",), ("cat", "svd")),
    Method("SLERP", "merge", "spherical linear interpolation", ("slerp",)),
    Method("NuSLERP", "merge", "normalized SLERP", ("nuslerp",)),
    Method("MultiSLERP", "merge", "SLERP of more than two models", ("multislerp",)),
    Method("Karcher", "merge", "Karcher (Riemannian) mean", ("karcher",)),
    Method("TaskArith", "merge", "task arithmetic", ("task_arithmetic", "taskarith", "taskarithmetic")),
    Method("TIES", "merge", "TIES merging", ("ties",), ("ties_svd",)),
    Method("DARE-TIES", "merge", "DARE with TIES sign consensus",
           ("dare_ties", "dare", "dareties"), ("dare_ties_svd",)),
    Method("DARE-Linear", "merge", "DARE without sign consensus",
           ("dare_linear", "darelinear"), ("dare_linear_svd",)),
    Method("Breadcrumbs", "merge", "model breadcrumbs", ("breadcrumbs",)),
    Method("Breadcrumbs-TIES", "merge", "model breadcrumbs with TIES sign consensus",
           ("breadcrumbs_ties",)),
    Method("DELLA", "merge", "DELLA (magnitude-ranked drop) with sign consensus", ("della",)),
    Method("DELLA-Linear", "merge", "DELLA without sign consensus", ("della_linear",)),
    Method("ModelStock", "merge", "Model Stock", ("model_stock", "modelstock")),
    Method("SCE", "merge", "select, calculate, erase", ("sce",)),
    Method("NearSwap", "merge", "interpolation toward the base where models are near", ("nearswap",)),
    Method("MagPrune", "merge", "magnitude-pruned sum", ("magprune", "magnitude_prune"), ("magnitude_prune_svd",)),
    Method("Passthrough", "merge", "layer stacking (passthrough)", ("passthrough", "frankenmerge")),
    Method("ArceeFusion", "merge", "important changes of one model fused into the base", ("arcee_fusion",
                                                                                        "arceefusion")),
    Method("RAM", "merge", "reinforced agent merging: unique changes kept, shared ones averaged", ("ram",)),
    Method("RAMPlus", "merge", "RAM with unique changes boosted per tensor", ("ramplus_tl", "ramplus")),
    Method("MoE", "merge", "mixture of experts assembled from dense models", ("moe",), ("mergekit_moe",)),
    # adapter operations
    Method("Extract", "adapter", "low-rank adapter extracted from a fine-tune", ("extract",), ("extracted",)),
    Method("Resize", "adapter", "adapter re-factored to another rank", ("resize",), ("resized",)),
)

def _key(text: str) -> str:
    return text.strip().lower().replace(" ", "_").replace("-", "_")


_IN_NAMES: dict[str, Method] = {}
for _method in METHODS:
    for _alias in (_method.name, *_method.aliases):
        _IN_NAMES.setdefault(_key(_alias), _method)
_IN_RECORDS: dict[str, Method] = dict(_IN_NAMES)
for _method in METHODS:
    for _alias in _method.record_aliases:
        _IN_RECORDS.setdefault(_key(_alias), _method)


def find_method(text: str) -> Method | None:
    """The Method a word of a name spells, in any case, as its canonical name or an alias; None when unknown.

    ``find_method("dare_ties")``, ``find_method("DARE-TIES")`` and ``find_method("dare")`` are DARE-TIES.
    """
    return _IN_NAMES.get(_key(text))


def method_of_record(text: str) -> Method | None:
    """The Method a lineage record's ``method`` (mergekit name, PEFT combination type, objective) means."""
    return _IN_RECORDS.get(_key(text))


def canonical_method(text: str) -> Method | None:
    """The Method whose canonical spelling is exactly ``text`` (case-sensitive), else None."""
    return next((method for method in METHODS if method.name == text), None)


def method_names(kind: Kind | None = None) -> list[str]:
    """The canonical names, optionally of one kind, in list order."""
    return [method.name for method in METHODS if kind is None or method.kind == kind]


def relation_of(method: Method, *, lora: bool, encoding: str | None = None) -> Relation:
    """The Hub relation a name implies: ``quantized`` with an encoding, ``adapter`` with ``-LoRA``, else the
    Method's own."""
    if encoding:
        return "quantized"
    if lora:
        return "adapter"
    return method.relation
