"""``mtool adapters ...``: inspect, merge, combine, extract and resize PEFT LoRA adapters.

Only click and light mtool modules are imported here; torch, peft and bitsandbytes are imported by the
functions a command calls.
"""

from __future__ import annotations

import json

import click

from mtool.sizes import BYTE_SIZE
from mtool.ui import info

DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def parse_weights(values: tuple[str, ...]) -> tuple[float, ...] | None:
    """``--weights 0.7,0.3`` (or repeated ``--weights``) -> (0.7, 0.3)."""
    parts = [part for value in values for part in value.replace(",", " ").split()]
    if not parts:
        return None
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise click.BadParameter(f"{' '.join(values)!r} is not a list of numbers like 0.7,0.3",
                                 param_hint="--weights") from None


def _dtype(name: str | None):
    if name is None:
        return None
    from mtool.io.dtypes import parse_dtype

    return parse_dtype(name)


def _positive_rank(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise click.BadParameter(f"the rank must be a positive integer, got {value}")
    return value


weights_option = click.option(
    "--weights", multiple=True, metavar="W1,W2,...",
    help="One weight per adapter, in order (comma-separated or repeated). Default: 1 each.")
force_option = click.option("--force", is_flag=True,
                            help="Replace OUT if it exists (only once the new one is complete).")


@click.group()
def adapters() -> None:
    """Inspect, merge, combine, extract and resize PEFT LoRA adapters (plain LoRA, rsLoRA, DoRA)."""


@adapters.command("inspect")
@click.argument("adapter")
@click.option("--base", help="A base model to check the adapter against: every target's shape is compared.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (stdout).")
def inspect_command(adapter: str, base: str | None, as_json: bool) -> None:
    """Describe ADAPTER: type (LoRA/rsLoRA/DoRA), rank(s), alpha, scale, target modules, modules_to_save,
    trainable parameters, dtype, size and base model id; with --base, whether it fits that base.

    Exits with status 1 when --base is given and the adapter does not fit it.
    """
    from mtool.adapters.inspect import format_summary, inspect_adapter

    summary = inspect_adapter(adapter, base)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        click.echo(format_summary(summary))
    if summary.base_check is not None and not summary.base_check.compatible:
        raise SystemExit(1)


@adapters.command("merge")
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER [ADAPTER...] OUT")
@weights_option
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), help="Output dtype. Default: each tensor keeps the base's.")
@click.option("--dequantized-base", is_flag=True,
              help="Merge into the base as a QLoRA run saw it: every linear weight rounded through bitsandbytes "
                   "4-bit (quantize then dequantize, with the --quant-* settings of the training run). Use it "
                   "for an adapter trained with QLoRA when the merged model must behave exactly as the adapter did "
                   "in training. The default merges into the original 16-bit base: full precision, what is "
                   "usually published, and off from the training-time model only by the 4-bit rounding error.")
@click.option("--quant-type", type=click.Choice(("nf4", "fp4")), default="nf4", show_default=True,
              help="With --dequantized-base: bnb_4bit_quant_type of the training run.")
@click.option("--quant-blocksize", type=int, default=64, show_default=True,
              help="With --dequantized-base: the 4-bit block size (bitsandbytes' default 64).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="With --dequantized-base: bnb_4bit_use_double_quant of the training run.")
@click.option("--quant-skip", multiple=True, default=("lm_head",), show_default=True,
              help="With --dequantized-base: modules left unquantized in training (llm_int8_skip_modules).")
@click.option("--shard-size", type=BYTE_SIZE, default="5GB", show_default=True,
              help="Largest output shard, e.g. 2GB or 500MB.")
@force_option
def merge_command(paths: tuple[str, ...], weights: tuple[str, ...], dtype: str | None, dequantized_base: bool,
                  quant_type: str, quant_blocksize: int, double_quant: bool, quant_skip: tuple[str, ...],
                  shard_size: int, force: bool) -> None:
    """Merge one or more LoRA adapters into BASE and write the full model to OUT.

    Streams tensor by tensor: W' = W + w * s * B @ A in float32 (s = alpha/r, or alpha/sqrt(r) for rsLoRA;
    DoRA rescales each output row to its learned magnitude), cast once to the output dtype. Handles
    fan_in_fan_out layers, embedding LoRA, modules_to_save, trainable tokens and tied embeddings. Several
    adapters are applied in the order given, each scaled by its --weights entry. OUT gets the base's config
    and tokenizer and a lineage record; transformers loads it directly.
    """
    from mtool.adapters.merge import AdapterMergeOptions, merge_adapters
    from mtool.adapters.quantize import QuantSettings

    if len(paths) < 3:
        raise click.UsageError("give BASE, at least one ADAPTER, and OUT")
    base, adapter_paths, out = paths[0], list(paths[1:-1]), paths[-1]
    if quant_blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise click.BadParameter("the block size must be a power of two from 32 to 4096",
                                 param_hint="--quant-blocksize")
    quant = QuantSettings(quant_type=quant_type, blocksize=quant_blocksize, double_quant=double_quant,
                          skip_modules=tuple(quant_skip)) if dequantized_base else None
    options = AdapterMergeOptions(weights=parse_weights(weights), dtype=_dtype(dtype), dequantized_base=quant,
                                  max_shard_bytes=shard_size, force=force)
    report = merge_adapters(base, adapter_paths, out, options)
    untied = " (embeddings untied: the adapter changes the input embedding and the head differently)" \
        if report.untied else ""
    info(f"merged {len(adapter_paths)} adapter(s) into {report.changed} of {report.tensors} tensors in "
         f"{report.seconds:.1f} s{untied}: {report.output}")


def parse_params(values: tuple[str, ...]) -> dict[str, object]:
    """``--param t=0.3 --param normalize=false`` -> {"t": 0.3, "normalize": False}."""
    params: dict[str, object] = {}
    for value in values:
        name, separator, text = value.partition("=")
        if not separator or not name.strip():
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", param_hint="--param")
        text = text.strip()
        if text.lower() in ("true", "false"):
            params[name.strip()] = text.lower() == "true"
            continue
        try:
            params[name.strip()] = float(text)
        except ValueError:
            raise click.BadParameter(f"{value!r}: the value must be a number, true or false",
                                     param_hint="--param") from None
    return params


@adapters.command("combine")
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER [ADAPTER...] OUT")
@click.option("--method", "method", required=True, metavar="TYPE",
              help="A PEFT add_weighted_adapter type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, "
                   "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd; or merge:<method> to "
                   "merge in weight space with any `mtool merge` method (merge:ties, merge:slerp, "
                   "merge:della ...) and factor the result back by SVD.")
@weights_option
@click.option("--density", type=float, help="Fraction of values kept by ties, dare and magnitude_prune types.")
@click.option("--majority-sign-method", type=click.Choice(("total", "frequency")), default="total",
              show_default=True, help="TIES sign election: sign of the summed values, or of the count of signs.")
@click.option("--rank", type=int, callback=_positive_rank,
              help="Rank of the result of svd types and merge: methods (default: the largest input rank).")
@click.option("--svd-clamp", type=float, help="svd types: clamp the factors at this quantile (PEFT's svd_clamp).")
@click.option("--base", help="merge: methods: the base model; needed by those that interpolate whole weights "
                             "(slerp, nuslerp, karcher...) and to combine DoRA adapters.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="merge: methods: another method parameter (t=0.5, lambda=1.0, normalize=false...).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drops (one per module).")
@force_option
def combine_command(paths: tuple[str, ...], method: str, weights: tuple[str, ...], density: float | None,
                    majority_sign_method: str, rank: int | None, svd_clamp: float | None, base: str | None,
                    params: tuple[str, ...], seed: int, force: bool) -> None:
    """Combine several LoRA adapters into one adapter folder OUT, as PEFT's add_weighted_adapter does (every
    combination type, the same results) or in weight space with an `mtool merge` method.

    cat and svd are exact up to the SVD rank (cat's rank is the sum of the inputs'); linear, ties, dare_*
    and magnitude_prune merge the A and B factors separately (a cheap approximation needing equal ranks).
    OUT loads with PeftModel.from_pretrained.
    """
    from mtool.adapters.combine import CombineOptions, combine_adapters

    if len(paths) < 2:
        raise click.UsageError("give at least one ADAPTER and OUT")
    options = CombineOptions(method=method, weights=parse_weights(weights), density=density,
                             majority_sign_method=majority_sign_method, rank=rank, svd_clamp=svd_clamp, base=base,
                             params=parse_params(params), seed=seed, force=force)
    result = combine_adapters(list(paths[:-1]), paths[-1], options)
    if result.report is not None:
        click.echo(result.report.format())
    info(f"combined {len(paths) - 1} adapter(s) with {result.method} into {result.modules} modules: {result.output}")


@adapters.command("extract")
@click.argument("base")
@click.argument("tuned")
@click.argument("out")
@click.option("--rank", type=int, callback=_positive_rank, help="Rank of every module.")
@click.option("--energy", type=float,
              help="Instead of --rank: per module, the smallest rank keeping this fraction of the update's squared "
                   "Frobenius norm (e.g. 0.99).")
@click.option("--keep-other", is_flag=True,
              help="Store modules whose changed tensors are not 2-D weights (norms, biases) whole, as "
                   "modules_to_save.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float32", show_default=True,
              help="dtype of the adapter's tensors.")
@force_option
def extract_command(base: str, tuned: str, out: str, rank: int | None, energy: float | None, keep_other: bool,
                    dtype: str, force: bool) -> None:
    """Extract a LoRA adapter OUT approximating TUNED - BASE: truncated SVD of every changed 2-D weight
    (linear layers, and embeddings as embedding LoRA). Prints the relative reconstruction error per module
    (worst first) and overall; the lineage record keeps all of them.
    """
    from mtool.adapters.extract import ExtractOptions, extract_adapter
    from mtool.ui import VERBOSITY

    options = ExtractOptions(rank=rank, energy=energy, keep_other=keep_other, dtype=_dtype(dtype), force=force)
    result = extract_adapter(base, tuned, out, options)
    click.echo(result.report.format(limit=None if VERBOSITY.verbose else 12))
    info(f"wrote {result.output}")


@adapters.command("resize")
@click.argument("adapter")
@click.argument("out")
@click.option("--rank", type=int, required=True, callback=_positive_rank,
              help="The new rank (modules below it keep theirs).")
@force_option
def resize_command(adapter: str, out: str, rank: int, force: bool) -> None:
    """Lower ADAPTER's rank to --rank by truncated SVD of each module's B @ A, into OUT. Prints the relative
    error per module and overall (zero when the rank is not lowered)."""
    from mtool.adapters.resize import resize_adapter
    from mtool.ui import VERBOSITY

    result = resize_adapter(adapter, out, rank, force=force)
    click.echo(result.report.format(limit=None if VERBOSITY.verbose else 12))
    info(f"wrote {result.output}")
