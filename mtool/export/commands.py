"""``mtool export gguf``: thin Click wrapper over :mod:`mtool.export.gguf_export` (nothing heavy imported here)."""

from __future__ import annotations

import click

from mtool.sizes import BYTE_SIZE

TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@click.group()
def export() -> None:
    """Export a model to another runtime's format."""


@export.command("gguf")
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--type", "types", multiple=True, metavar="TYPE[,TYPE...]",
              help=f"GGUF file type(s), repeated or comma-separated: {', '.join(TYPE_NAMES)} (default f16). "
                   "K-quants (q4_k_m ...) are made from an f16 file by llama.cpp's llama-quantize.")
@click.option("--name", help="The model's standardized name (default: MODEL's folder name when it is one, else "
                             "derived from its lineage record); the files are NAME-TYPE.gguf.")
@click.option("--base", help="When MODEL is a LoRA adapter: its base model (default: the one the adapter names).")
@click.option("--shard-size", type=BYTE_SIZE, default=None,
              help="Split each GGUF file into shards of at most this size (e.g. 5GB): NAME-TYPE-00001-of-0000N.gguf.")
@click.option("--tokenizer-pre", metavar="NAME",
              help="llama.cpp's pre-tokenizer name, for a byte-level BPE tokenizer whose pre-tokenizer mtool does "
                   "not recognize (e.g. llama-bpe, qwen2, gpt-2).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete).")
def gguf(model: str, out_dir: str, types: tuple[str, ...], name: str | None, base: str | None,
         shard_size: int | None, tokenizer_pre: str | None, force: bool) -> None:
    """Write MODEL (a model folder, a Hub id, or a LoRA adapter: merged into its base first) as GGUF files for
    llama.cpp, Ollama and LM Studio into the folder OUT_DIR, with its lineage record and a model card that says
    how to run them. Streamed: memory stays at a few blocks of rows whatever the model's size.

    \b
    mtool export gguf ./Llama-3.1-8B-Medic-SFT-v1.0 ./Llama-3.1-8B-Medic-SFT-v1.0-GGUF --type q8_0,f16
    """
    from mtool.export.gguf_export import GGUFExportOptions, export_gguf

    chosen = tuple(part for value in types for part in value.replace(",", " ").split()) or ("f16",)
    report = export_gguf(model, out_dir, GGUFExportOptions(types=chosen, name=name, base=base,
                                                           max_shard_bytes=shard_size, tokenizer_pre=tokenizer_pre,
                                                           force=force))
    for filename, type_name in report.files.items():
        click.echo(f"{type_name:6} {report.output / filename}")
