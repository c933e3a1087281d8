"""``mtool merge RECIPE OUT``: run a mergekit recipe, streamed tensor by tensor."""

from __future__ import annotations

import click

from mtool.sizes import BYTE_SIZE
from mtool.ui import info


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False), required=False)
@click.option("--dry-run", is_flag=True, help="Check everything and print the plan and its peak memory; write nothing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random methods (DARE, DELLA); each tensor draws from its own generator.")
@click.option("--device", default="cpu", show_default=True, help="Where the math runs: cpu, cuda, cuda:1 ...")
@click.option("--shard-size", type=BYTE_SIZE, default="5GB", show_default=True,
              help="Largest output shard, e.g. 2GB or 500MB.")
@click.option("--no-card", is_flag=True, help="Do not write README.md (the model card).")
@click.option("--strict", is_flag=True,
              help="Refuse what mergekit silently ignores (unknown keys, parameters the method does not read).")
@click.option("--intermediate-dir", type=click.Path(file_okay=False), default=None,
              help="Multi-stage recipes: keep the stages' outputs here (and reuse unchanged ones) instead of a "
                   "temporary folder.")
def merge(recipe: str, out: str | None, dry_run: bool, force: bool, seed: int, device: str, shard_size: int,
          no_card: bool, strict: bool, intermediate_dir: str | None) -> None:
    """Merge models as RECIPE (mergekit YAML, unchanged) says, into the folder OUT.

    The 20 merge methods of mergekit 0.1.5, with its results: linear, slerp, nuslerp, multislerp, karcher,
    task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
    model_stock, sce, nearswap, passthrough (layer-slice stacking), arcee_fusion, ram, ramplus_tl. Models are
    local folders or Hub ids, `path@revision`, and `path+adapter` applies a LoRA adapter on the fly. The whole
    recipe and every input is checked before a byte is written; the output appears atomically with its config,
    tokenizer, lineage record and card. A file of several YAML documents (mergekit-multi's format) runs them
    as stages, each using earlier ones by their `name:`.
    """
    from mtool.errors import InputError
    from mtool.io.hashing import FileHasher
    from mtool.merger.recipe import local_weight_files, parse_recipe
    from mtool.safe_yaml import read_text

    if out is None and not dry_run:
        raise click.UsageError("give OUT (the output folder), or --dry-run")
    from pathlib import Path

    from mtool.merger.stages import is_multi_stage

    text = read_text(recipe, what="recipe")  # bounded: the file is read once, and never past its limit
    if is_multi_stage(text):
        from mtool.merger.run import MergeOptions
        from mtool.merger.stages import parse_stages, run_stages

        stages = parse_stages(text, source=recipe)
        options = MergeOptions(seed=seed, device=device, max_shard_bytes=shard_size, force=force,
                               write_card=not no_card)
        run_stages(stages, Path(out or "."), options, strict=strict, dry_run=dry_run,
                   intermediate_dir=Path(intermediate_dir) if intermediate_dir else None)
        if not dry_run:
            info(f"done: {out}")
        return
    parsed = parse_recipe(text, source=recipe)
    hasher = FileHasher.default()
    if not dry_run:  # the lineage record needs the inputs' digests: hash them while torch loads and the plan is made
        hasher.start(local_weight_files(parsed))
    from mtool.merger.plan import build_plan
    from mtool.merger.run import MergeOptions, execute

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available", fix="use --device cpu")
    plan = build_plan(parsed, strict=strict)
    if dry_run:
        from mtool.merger.describe import describe_plan

        click.echo(describe_plan(plan))
        return
    options = MergeOptions(seed=seed, device=device, max_shard_bytes=shard_size, force=force,
                           write_card=not no_card)
    execute(plan, out, options, hasher=hasher)
    info(f"done: {out}")
