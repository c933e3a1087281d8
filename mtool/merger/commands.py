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
@click.option("--search", "space_file", type=click.Path(exists=True, dir_okay=False),
              help="Search the recipe's parameters over this space (YAML) for the best --eval score.")
@click.option("--eval", "eval_file", type=click.Path(exists=True, dir_okay=False),
              help="With --search: the evaluation spec (YAML) each trial's merge is scored on.")
@click.option("--trials", type=click.IntRange(min=1), default=30, show_default=True, help="With --search: trials.")
@click.option("--study", type=click.Path(dir_okay=False),
              help="With --search: the study file that keeps the trials, to resume (default: OUT.search.jsonl).")
@click.option("--scratch", type=click.Path(file_okay=False),
              help="With --search: where each trial's merge is written, one at a time (default: beside OUT).")
def merge(recipe: str, out: str | None, dry_run: bool, force: bool, seed: int, device: str, shard_size: int,
          no_card: bool, strict: bool, intermediate_dir: str | None, space_file: str | None, eval_file: str | None,
          trials: int, study: str | None, scratch: str | None) -> None:
    """Merge models as RECIPE (mergekit YAML, unchanged) says, into the folder OUT.

    The 20 merge methods of mergekit 0.1.5, with its results: linear, slerp, nuslerp, multislerp, karcher,
    task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
    model_stock, sce, nearswap, passthrough (layer-slice stacking), arcee_fusion, ram, ramplus_tl. Models are
    local folders or Hub ids, `path@revision`, and `path+adapter` applies a LoRA adapter on the fly. The whole
    recipe and every input is checked before a byte is written; the output appears atomically with its config,
    tokenizer, lineage record and card. A file of several YAML documents (mergekit-multi's format) runs them
    as stages, each using earlier ones by their `name:`.

    With --search SPACE --eval EVAL, the parameters SPACE names are searched (Optuna TPE, --trials merges,
    each evaluated on EVAL and deleted) and the best merge is written to OUT with the search in its record and
    card; the trials are kept in a study file, and running the command again resumes the search.
    """
    from mtool.errors import InputError
    from mtool.io.hashing import FileHasher
    from mtool.merger.recipe import local_weight_files, parse_recipe
    from mtool.safe_yaml import read_text

    if out is None and not dry_run:
        raise click.UsageError("give OUT (the output folder), or --dry-run")
    if (space_file is None) != (eval_file is None):
        raise click.UsageError("--search SPACE and --eval EVAL go together")
    from pathlib import Path

    from mtool.merger.stages import is_multi_stage

    text = read_text(recipe, what="recipe")  # bounded: the file is read once, and never past its limit
    if is_multi_stage(text):
        if space_file is not None:
            raise click.UsageError("--search works on a single-stage recipe: search one stage's recipe, then use "
                                   "its output in the others")
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
    if space_file is not None:
        searched = _search(parsed, space_file, eval_file, out, dry_run=dry_run, trials=trials, seed=seed, study=study,
                           scratch=scratch, device=device, shard_size=shard_size, force=force, card=not no_card)
        if searched:
            return
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


def _search(recipe, space_file: str, eval_file: str, out: str | None, *, dry_run: bool, trials: int, seed: int,
            study: str | None, scratch: str | None, device: str, shard_size: int, force: bool, card: bool) -> bool:
    """``--search``: run the search (True), or with --dry-run check the space and the evaluation (False: the plan
    is described next)."""
    from pathlib import Path

    from mtool.evaluate.spec import load_eval_spec
    from mtool.merger.search import SearchOptions, check_space, search
    from mtool.merger.space import BoundSpace, load_space

    space, spec = load_space(space_file), load_eval_spec(eval_file)
    if dry_run:
        bound = BoundSpace(space, recipe)
        check_space(bound)
        click.echo("search space:\n" + "".join(f"  {line}\n" for line in bound.describe())
                   + "evaluation: " + ", ".join(f"{task.name} ({task.kind}, weight {task.weight:g})"
                                                for task in spec.tasks) + "\n")
        return False
    options = SearchOptions(trials=trials, seed=seed, study=Path(study) if study else None,
                            scratch=Path(scratch) if scratch else None, device=device, max_shard_bytes=shard_size,
                            force=force, write_card=card)
    result = search(recipe, space, spec, out, options)
    info(f"done: {out} (trial {result.best.position + 1} of {len(result.trials)}, score {result.best.score:.4f}; "
         f"{result.new_trials} trials run in {result.seconds:.0f} s)")
    return True
