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
    compute = tensor.compute_dtype.itemsize
    inputs = len(tensor.sources)
    out = tensor.out_dtype.itemsize
    if streams(plan, tensor) and not (tensor.vocabulary and plan.vocabulary is not None):
        chunk = min(count, CHUNK_ELEMENTS)
        working = chunk * compute * (inputs + 6) + MERGE_LIMITS.pending_writes * chunk * out
        if plan.method.prepare is not None:
            working += plan.method.prepare_scratch(count, inputs, compute)
        return working
    storage = sum(s.model.dtype(s.tensor).itemsize for s in tensor.sources)
    return count * (storage + compute * (inputs + 3) + out)


def estimate_peak_bytes(plan: MergePlan) -> int:
    """Upper estimate of the executor's working memory: the largest tensor's working memory plus what is read
    ahead for the next ones."""
    if not plan.tensors:
        return 0
    return max(tensor_working_bytes(plan, t) for t in plan.tensors) + MERGE_LIMITS.lookahead_bytes


RANDOM_NOTE = ("random draws: mtool's own, seeded by --seed and the tensor's name (the same output whatever the "
               "order, device or chunking); mergekit draws from torch's global generator in its execution order, so "
               "the two tools keep different random entries, with the same probabilities")


def describe_plan(plan: MergePlan) -> str:
    """The plan as text for ``--dry-run``: outputs grouped by module and layer, their sources and parameters."""
    computes = sorted({dtype_label(t.compute_dtype) for t in plan.tensors})
    math = "float32 math" if plan.settings.math == "float32" else "as mergekit"
    lines = [f"merge method: {plan.method.name}; {len(plan.tensors)} output tensors, {plan.num_layers} layers; "
             f"compute {'/'.join(computes) or '-'} ({math})"]
    differences = plan.settings.differences()
    if differences:
        lines.append("mtool settings (differ from mergekit): " + ", ".join(f"{k}={v}" for k, v in differences.items()))
    if plan.method.random:
        lines.append(RANDOM_NOTE)
    for (module, layer), tensors in plan.by_layer().items():
        where = "embeddings / head / norms" if layer is None else f"layer {layer}"
        lines.append(f"\n{module + ' ' if len(plan.module_layers) > 1 else ''}{where}:")
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
    if plan.diagnostics.messages:
        lines.append("warnings:\n" + "\n".join(f"  {message}" for message in plan.diagnostics.messages))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
