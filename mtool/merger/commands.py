"""``mtool merge RECIPE OUT``: run a mergekit recipe, streamed tensor by tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mtool.ui import info

if TYPE_CHECKING:
    import threading

    from mtool.merger.recipe import Recipe


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB``, ``1000000`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MB") from None
    if unit not in units or value <= 0:
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MB")
    return int(value * units[unit])


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False), required=False)
@click.option("--dry-run", is_flag=True, help="Check everything and print the plan and its peak memory; write nothing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random methods (DARE, DELLA); each tensor draws from its own generator.")
@click.option("--device", default="cpu", show_default=True, help="Where the math runs: cpu, cuda, cuda:1 ...")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB or 500MB.")
@click.option("--no-card", is_flag=True, help="Do not write README.md (the model card).")
def merge(recipe: str, out: str | None, dry_run: bool, force: bool, seed: int, device: str, shard_size: str,
          no_card: bool) -> None:
    """Merge models as RECIPE (mergekit YAML, unchanged) says, into the folder OUT.

    Every method of mergekit is supported: linear, slerp, nuslerp, multislerp, karcher, task_arithmetic,
    ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, sce,
    nearswap, passthrough (layer-slice stacking). Models are local folders or Hub ids, `path@revision`, and
    `path+adapter` applies a LoRA adapter on the fly. The whole recipe and every input is checked before a
    byte is written; the output appears atomically with its config, tokenizer, lineage record and card.
    """
    from mtool.errors import InputError
    from mtool.merger.recipe import load_recipe

    if out is None and not dry_run:
        raise click.UsageError("give OUT (the output folder), or --dry-run")
    parsed = load_recipe(recipe)
    if not dry_run:
        _start_hashing_inputs(parsed)  # the lineage record needs them: hash while torch loads and the plan is made
    from mtool.merger.plan import build_plan
    from mtool.merger.run import MergeOptions, describe_plan, execute

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available", fix="use --device cpu")
    plan = build_plan(parsed)
    if dry_run:
        click.echo(describe_plan(plan))
        return
    options = MergeOptions(seed=seed, device=device, max_shard_bytes=parse_size(shard_size), force=force,
                           write_card=not no_card)
    execute(plan, out, options)
    info(f"done: {out}")


def _start_hashing_inputs(recipe: "Recipe") -> "threading.Thread | None":
    """Start hashing the weight files of the recipe's local model folders in the background. Anything that
    cannot be found is skipped here: planning reports it."""
    from pathlib import Path

    from mtool.checkpoint import hash_in_background, weight_files_of_folder
    from mtool.errors import MtoolError

    files = []
    for reference in recipe.referenced_models():
        folder = Path(reference.model).expanduser()
        if folder.is_dir():
            try:
                files += weight_files_of_folder(folder)[0]
            except MtoolError:
                continue
    return hash_in_background(files) if files else None
