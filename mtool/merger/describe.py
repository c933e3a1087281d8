"""``mtool merge --dry-run``: the plan as text, with the executor's working memory estimated tensor by tensor."""

from __future__ import annotations

from mtool.io.dtypes import dtype_label, dtype_to_safetensors
from mtool.merger.chunks import CHUNK_ELEMENTS
from mtool.merger.plan import MergePlan, TensorPlan
from mtool.merger.run import MERGE_LIMITS, streams


def tensor_working_bytes(plan: MergePlan, tensor: TensorPlan) -> int:
    """Memory the executor needs for ``tensor`` beyond the interpreter itself.

    Streamed from disk: a chunk of every input in the compute dtype plus a few chunk-sized temporaries and the
    parts queued for the writer, plus what the method's statistics pass holds (``prepare_scratch``). Read whole:
    every input in its storage dtype and in the compute dtype, about three tensors of scratch, and the output."""
    count = tensor.numel
    compute = plan.compute_dtype.itemsize
    inputs = len(tensor.sources)
    out = tensor.out_dtype.itemsize
    if streams(plan, tensor) and not (tensor.vocabulary and plan.vocabulary is not None):
        chunk = min(count, CHUNK_ELEMENTS)
        working = chunk * compute * (inputs + 6) + MERGE_LIMITS.pending_writes * chunk * out
        if plan.method.prepare is not None:
            working += plan.method.prepare_scratch(count, inputs, compute)
        return working
    storage = sum(s.model.checkpoint.info(s.tensor).dtype.itemsize for s in tensor.sources)
    return count * (storage + compute * (inputs + 3) + out)


def estimate_peak_bytes(plan: MergePlan) -> int:
    """Upper estimate of the executor's working memory: the largest tensor's working memory plus what is read
    ahead for the next ones."""
    if not plan.tensors:
        return 0
    return max(tensor_working_bytes(plan, t) for t in plan.tensors) + MERGE_LIMITS.lookahead_bytes


def describe_plan(plan: MergePlan) -> str:
    """The plan as text for ``--dry-run``: outputs grouped by layer, their sources and parameters."""
    lines = [f"merge method: {plan.method.name}; {len(plan.tensors)} output tensors, {plan.num_layers} layers; "
             f"compute {dtype_label(plan.compute_dtype)}"]
    for layer, tensors in plan.by_layer().items():
        lines.append(f"\n{'embeddings / head / final norm' if layer is None else f'layer {layer}'}:")
        for tensor in tensors:
            sources = ", ".join(f"{s.model.label}:{s.tensor}" for s in tensor.sources)
            params = dict(tensor.params)
            per_model = [p for p in tensor.model_params if p]
            text = f"  {tensor.name} {list(tensor.shape)} {dtype_to_safetensors(tensor.out_dtype)} <- {sources}"
            if params:
                text += f" | {', '.join(f'{k}={_fmt(v)}' for k, v in params.items())}"
            if per_model:
                text += " | " + "; ".join(", ".join(f"{k}={_fmt(v)}" for k, v in p.items()) for p in per_model)
            lines.append(text)
    total = sum(t.numel * t.out_dtype.itemsize for t in plan.tensors)
    lines.append(f"\noutput size {total / 1e9:.3f} GB; estimated peak working memory (beyond Python and torch) "
                 f"{estimate_peak_bytes(plan) / 2**20:.0f} MiB")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
