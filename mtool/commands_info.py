"""``mtool info MODEL``: what a model or adapter folder holds, read from headers only (no tensor data)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from mtool.errors import printable


def leftovers_of(path: str) -> list[str]:
    """The hidden build folders beside ``path`` that runs writing it left (see mtool.io.staging), described."""
    from mtool.io.staging import leftover_folders

    return [leftover.describe() for leftover in leftover_folders(Path(path).absolute())]


def summarize_checkpoint(path: str) -> dict:
    """Files, tensor count, parameter count, dtypes, architecture and lineage of a folder, and the build folders
    of interrupted runs beside it."""
    from mtool.errors import CheckpointError
    from mtool.io.reading import open_checkpoint
    from mtool.lineage import read_lineage

    leftovers = leftovers_of(path)
    if not Path(path).exists() and leftovers:
        raise CheckpointError(f"no such file or folder, but {len(leftovers)} hidden build folder(s) of interrupted "
                              f"runs lie beside it: {'; '.join(leftovers[:3])}", where=path,
                              fix="run the command again (it removes the stale ones) or delete them")
    checkpoint = open_checkpoint(path)
    config = checkpoint.read_json("config.json") or {}
    adapter_config = checkpoint.read_json("adapter_config.json") if checkpoint.is_adapter else None
    dtypes = Counter()
    for tensor in checkpoint.tensors.values():
        dtypes[tensor.dtype_name] += tensor.numel
    lineage = read_lineage(checkpoint.folder)
    return {
        "path": str(checkpoint.path),
        "kind": "adapter" if checkpoint.is_adapter else "model",
        "files": [f.name for f in checkpoint.weight_files],
        "bytes": checkpoint.total_bytes(),
        "tensors": len(checkpoint.tensors),
        "parameters": checkpoint.parameter_count(),
        "dtypes": dict(dtypes.most_common()),
        "architecture": _text((config.get("architectures") or [None])[0]
                              if isinstance(config.get("architectures"), list) else None),
        "model_type": _text(config.get("model_type")),
        "peft_type": _text(adapter_config.get("peft_type")) if adapter_config else None,
        "lineage": lineage.operation if lineage else None,
        "leftovers": leftovers,
    }


def _text(value: object) -> str | None:
    """A string field of a config as shown (None when it is not a string)."""
    return value[:200] if isinstance(value, str) else None


@click.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--tensors", is_flag=True, help="Also list every tensor with its shape and dtype.")
def info(model: str, as_json: bool, tensors: bool) -> None:
    """Summarize a model or adapter folder (or one .safetensors file) without reading its weights; also list the
    hidden build folders that interrupted runs writing it left beside it."""
    summary = summarize_checkpoint(model)
    if tensors:
        from mtool.io.reading import open_checkpoint

        summary["tensor_list"] = [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype_name, "file": t.file.name}
            for t in open_checkpoint(model).tensors.values()
        ]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key in ("path", "kind", "architecture", "model_type", "peft_type", "files", "tensors", "parameters",
                "bytes", "dtypes", "lineage"):
        value = summary[key]
        if value is None:
            continue
        if key == "files":
            value = ", ".join(value)
        elif key == "dtypes":
            value = ", ".join(f"{name} {count:,}" for name, count in value.items())
        elif isinstance(value, int):
            value = f"{value:,}"
        click.echo(printable(f"{key:>12}: {value}"))
    for leftover in summary["leftovers"]:
        click.echo(printable(f"{'leftover':>12}: {leftover}"))
    for entry in summary.get("tensor_list", []):
        click.echo(printable(f"  {entry['name']}  {entry['shape']}  {entry['dtype']}  ({entry['file']})"))
