"""``mtool demo [OUT]``: the whole life cycle on tiny models, on CPU, with nothing downloaded."""

from __future__ import annotations

import click


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", required=False, default="mtool-demo", type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A reduced run (8 facts per skill, fewer steps), about half the time.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of pre-training, training and merges.")
@click.option("--search-trials", type=click.IntRange(min=1), help="Trials of the searched merge (20; 4 with --quick).")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier demo's folder.")
def demo(out: str, quick: bool, seed: int, search_trials: int | None, force: bool) -> None:
    """Run the whole pipeline on tiny models on CPU (35 s on 2 idle cores) and print the accuracy table.

    \b
    1. pre-train a tiny base model (Llama-shaped, ~0.5M parameters) on general facts;
    2. train two QLoRA adapters with `mtool train`: capitals and chemical symbols;
    3. merge each adapter into the base (`mtool adapters merge`), merge the two fine-tunes with
       linear, SLERP, TIES and DARE-TIES (`mtool merge`), search TIES parameters for the best score on
       the tune half of the questions (`mtool merge --search`), combine the adapters (`mtool adapters combine`);
    4. score every model on the held-out half of the questions of both skills and the general facts
       (`mtool eval`, exact match): table, results.md, accuracy.png, and each model's lineage and card;
    5. name every output with the naming schema, write its model card and lint the name.

    OUT (default ./mtool-demo) holds every model folder, the recipes and configs that made them, the data
    and the results. Each command is printed as you would type it.
    """
    from dataclasses import replace

    from mtool import ui
    from mtool.demo.pipeline import DemoSettings, run_demo
    from mtool.demo.report import text_table

    settings = (DemoSettings.quick() if quick else DemoSettings()).with_seed(seed)
    if search_trials is not None:
        settings = replace(settings, search_trials=search_trials)
    result = run_demo(out, settings, force=force)
    click.echo()
    click.echo(text_table(result.rows, result.tasks))
    click.echo()
    bad = {name: problem for name, problem in result.names.items() if problem != "ok"}
    ui.info(f"names: {len(result.names) - len(bad)} of {len(result.names)} lint clean"
            + "".join(f"\n  {name}: {problem}" for name, problem in bad.items()))
    ui.info(f"results: {result.folder / 'results.md'}, chart: {result.folder / 'accuracy.png'}; "
            f"{sum(result.seconds.values()):.0f} s in all")
