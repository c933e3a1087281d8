"""``mtool moe CONFIG OUT``: a mixture of experts from dense models, as mergekit-moe's YAML describes it."""

from __future__ import annotations

import click

from mtool.sizes import BYTE_SIZE
from mtool.ui import info


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random routers and expert noise (gate_mode random: mergekit-moe's --random-seed).")
@click.option("--device", default="cpu", show_default=True, help="Where the base model runs for hidden-state routers.")
@click.option("--shard-size", type=BYTE_SIZE, default="5GB", show_default=True, help="Largest output shard.")
@click.option("--no-card", is_flag=True, help="Do not write README.md (the model card).")
@click.option("--strict", is_flag=True, help="Refuse keys mergekit-moe ignores.")
@click.option("--allow-identical-experts", is_flag=True,
              help="Allow every expert to be the same model (useful only if the mixture is trained afterwards).")
def moe(config: str, out: str, force: bool, seed: int, device: str, shard_size: int, no_card: bool, strict: bool,
        allow_identical_experts: bool) -> None:
    """Assemble a mixture-of-experts model from dense models, as CONFIG (mergekit-moe's YAML, unchanged) says.

    The base model gives attention, norms and embeddings; each expert its MLP; routers come from the experts'
    prompts (gate_mode hidden, hidden_avg, cheap_embed) or are random (random, uniform_random). Writes Mixtral,
    Qwen2-MoE, Qwen3-MoE or DeepSeek-MoE layouts, with config, tokenizer, lineage record and card.
    """
    from mtool.errors import ConfigError
    from mtool.moe.build import MoEOptions, execute_moe, plan_moe
    from mtool.moe.config import load_moe_config
    from mtool.ui import warn

    parsed, ignored, text = load_moe_config(config)
    for key in ignored:
        if strict:
            raise ConfigError(f"key {key!r} is not read (mergekit-moe ignores it too)", where=config)
        warn(f"key {key!r} is not read (mergekit-moe ignores it too)")
    plan = plan_moe(parsed, text, seed=seed, device=device, allow_identical=allow_identical_experts)
    for message in plan.warnings:
        warn(message)
    execute_moe(plan, out, MoEOptions(seed=seed, force=force, max_shard_bytes=shard_size, write_card=not no_card))
    info(f"done: {out}")
