"""``mtool train`` from start to finish: config -> tokenizer + data -> model -> loop -> adapter folder.

The output folder (written atomically when training succeeded) holds the PEFT adapter
(``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer with the chat template the data was
rendered with, ``train-config.yaml`` (the resolved config), ``metrics.jsonl``, ``loss.png``, the lineage
record ``mtool-lineage.json`` and the model card ``README.md``. Checkpoints live in ``<out>-checkpoints``
(``checkpoints.dir``) and stay there after the run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool import ui
from mtool.errors import ConfigError, InputError, OutputExistsError
from mtool.hub import ModelRef, resolve_model
from mtool.io.dtypes import dtype_label
from mtool.io.folders import check_output_target, require_free_space, require_writable
from mtool.io.hashing import FileHasher
from mtool.io.reading import open_checkpoint
from mtool.lora.adapter import refuse_adapter
from mtool.train.config import CONFIG_FILENAME, TrainConfig, read_config_file, resume_differences, validate_config
from mtool.train.data import (
    DataSource,
    DataStats,
    data_fingerprint,
    find_data,
    load_records,
    split_for_eval,
    tokenize_dataset,
)
from mtool.train.distributed import Processes, barrier, join_processes, leave_processes, unwrap, wrap_for_data_parallel
from mtool.train.formats import check_columns, detect_format
from mtool.train.loop import Loop, run_loop
from mtool.train.metrics import MetricsLog, smoothed_final_loss
from mtool.train.records import RecordError, locate
from mtool.train.state import latest_checkpoint, load_checkpoint, read_progress

if TYPE_CHECKING:
    import datasets


@dataclass
class PreparedData:
    """The tokenized training (and evaluation) examples and where they came from."""

    source: DataSource
    sha256: str  # of the training data files (see DataSource.sha256)
    data_format: str
    template: str | None
    added_tokens: list[str]
    train: "datasets.Dataset"
    eval: "datasets.Dataset | None"
    stats: DataStats


@dataclass(frozen=True)
class TrainResult:
    out: Path
    metrics: dict[str, Any]
    merged: Path | None


def train(config: TrainConfig, *, resume: bool = False, force: bool = False,
          hasher: FileHasher | None = None) -> TrainResult | None:
    """Train as ``config`` says; the main process returns the result, the others None."""
    processes = join_processes()
    try:
        return _train(config, processes, resume=resume, force=force, hasher=hasher or FileHasher.default())
    finally:
        leave_processes(processes)


def _train(config: TrainConfig, processes: Processes, *, resume: bool, force: bool,
           hasher: FileHasher) -> TrainResult | None:
    base = resolve_model(config.base, config.model.revision)
    refuse_adapter(base.path, what="a base model (base:)")
    open_checkpoint(base.path)  # safetensors weights with sound headers, before transformers sees the folder: a
    # folder of pickle weights (pytorch_model.bin) is refused here, as every other command refuses it
    out = Path(config.out)
    inputs = [base.path, *config.data.path, *config.data.eval_path]
    check_output_target(out, force=force, inputs=inputs)
    require_writable(out.parent)  # before training, not after it
    require_writable(config.checkpoint_dir.parent)
    if config.merge:
        check_output_target(config.merged_dir, force=force, inputs=inputs)
    resume_from = _checkpoint_to_resume(config, resume=resume, force=force, processes=processes)

    from mtool.train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(base.path), trust_remote_code=config.model.trust_remote_code)
    if not processes.is_main:
        barrier(processes)  # the main process tokenizes first; the others then read its cache
    data = prepare_data(config, tokenizer, hasher=hasher)
    if processes.is_main:
        barrier(processes)
        ui.info("config:\n  " + config.to_yaml().strip().replace("\n", "\n  "))  # once the data is known good
        _report_data(config, data)
        _preflight(config, base, processes)
    loop, modes = _build_loop(config, base, tokenizer, data, processes)
    if resume_from is not None:
        _resume(loop, resume_from)
    elif processes.is_main:
        loop.metrics.path.write_text("", encoding="utf-8")
    final_metrics = run_loop(loop)
    if processes.is_main:
        final_metrics.update(smoothed_final_loss(loop.metrics.rows()))
    result = None
    from mtool.train.fsdp import gather_trainable_state, is_sharded

    model = unwrap(loop.model)
    trainable = gather_trainable_state(model) if is_sharded(model) else None  # every process takes part
    if processes.is_main:
        from mtool.train.output import OutputFacts, write_output

        facts = OutputFacts(config=config, base=base, data_sha256=data.sha256, data_format=data.data_format,
                            stats=data.stats, added_tokens=data.added_tokens, total_steps=loop.total_steps,
                            warmup_steps=loop.warmup_steps, world_size=processes.world_size,
                            compute_dtype=dtype_label(loop.compute_dtype), modes=modes,
                            train_examples=len(data.train), eval_examples=len(data.eval) if data.eval else 0)
        folder = write_output(out, model, tokenizer, facts, final_metrics, loop.metrics, force=force,
                              hasher=hasher, trainable=trainable)
        ui.info(f"adapter written to {folder}")
        merged = None
        if config.merge:
            from mtool.train.output import merge_into_base

            merged = merge_into_base(base, folder, config.merged_dir, force=force, hasher=hasher)
            ui.info(f"merged model written to {merged}")
        result = TrainResult(folder, final_metrics, merged)
    barrier(processes)
    return result


def _build_loop(config: TrainConfig, base: ModelRef, tokenizer: Any, data: PreparedData,
                processes: Processes) -> tuple[Loop, Any]:
    """The model (LoRA attached, wrapped for data parallelism), optimizer, step plan and logs of a run."""
    import torch

    from mtool.train.batching import plan_steps
    from mtool.train.model import build_model, resolve_compute_dtype, trainable_parameters
    from mtool.train.optim import build_optimizer, warmup_steps_for

    sharded = processes.distributed and config.training.parallelism == "fsdp"
    peft_model, modes = build_model(str(base.path), tokenizer, config.model, config.lora, device=processes.device,
                                    seed=config.seed, sharded=sharded)
    if processes.is_main:  # the adapter's size is known now: refuse a disk that cannot take it, before training
        from mtool.train.output import output_bytes

        require_free_space(Path(config.out).parent, output_bytes(peft_model, base))
    model = wrap_for_data_parallel(peft_model, processes, config.training.parallelism)
    optimizer = build_optimizer(trainable_parameters(peft_model), config.training, processes.device)
    compute_dtype = resolve_compute_dtype(config.model.compute_dtype, processes.device)
    scaler = torch.amp.GradScaler("cuda") if compute_dtype == torch.float16 and processes.device.type == "cuda" \
        else None
    settings = config.training
    plan = plan_steps(data.train["length"], seed=config.seed, epochs=settings.epochs, max_steps=settings.max_steps,
                      batch_size=settings.micro_batch_size, seq_len=config.data.seq_len, packing=config.data.packing,
                      grad_accum=settings.grad_accum, world_size=processes.world_size, rank=processes.rank)
    checkpoint_dir = config.checkpoint_dir
    if processes.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    barrier(processes)
    loop = Loop(config=config, model=model, optimizer=optimizer,
                train_data=data.train, eval_data=data.eval, plan=plan,
                warmup_steps=warmup_steps_for(settings, len(plan)), processes=processes,
                pad_id=tokenizer.pad_token_id, checkpoint_dir=checkpoint_dir,
                metrics=MetricsLog(checkpoint_dir / "metrics.jsonl"), config_yaml=config.to_yaml(), scaler=scaler,
                compute_dtype=compute_dtype, eval_kwargs={"skip_logits": True} if modes.loss != "full" else {})
    if processes.is_main:
        trainable = sum(p.numel() for p in trainable_parameters(peft_model))
        layout = f"{processes.world_size} processes, {settings.parallelism.upper()}" if processes.distributed \
            else "1 process"
        ui.info(f"{len(plan)} steps of {settings.grad_accum * processes.world_size} micro-batches ({layout}); "
                f"{trainable:,} trainable parameters; {modes.describe()}; device {processes.device}")
    return loop, modes


def _resume(loop: Loop, folder: Path) -> None:
    """Load a checkpoint's weights, optimizer and progress into ``loop``; drop the metrics after it."""
    loop.progress = load_checkpoint(folder, model=unwrap(loop.model), optimizer=loop.optimizer)
    if loop.scaler is not None and loop.progress.scaler:
        loop.scaler.load_state_dict(loop.progress.scaler)
    if loop.processes.is_main:
        loop.metrics.keep_until(loop.progress.step)
        ui.info(f"resuming from {folder} (step {loop.progress.step} of {loop.total_steps})")


def _checkpoint_to_resume(config: TrainConfig, *, resume: bool, force: bool, processes: Processes) -> Path | None:
    """The checkpoint to continue from (``--resume``), after checking it belongs to this run's config."""
    directory = config.checkpoint_dir
    newest = latest_checkpoint(directory)
    if not resume:
        if newest is not None:
            if not force:
                raise OutputExistsError(f"checkpoints of an earlier run exist in {directory} (the newest is "
                                        f"{newest.name})", fix="pass --resume to continue that run, or --force to "
                                                               "start over")
            barrier(processes)
            if processes.is_main:
                shutil.rmtree(directory)
            barrier(processes)
        elif directory.exists() and processes.is_main:  # an earlier run stopped before its first checkpoint
            ui.info(f"no checkpoint in {directory}: an earlier run stopped before its first one; starting over")
        return None
    if newest is None:
        if processes.is_main:
            ui.warn(f"--resume: there is no checkpoint in {directory} (the earlier run stopped before its first "
                    "one, or never ran): starting from step 0")
        return None
    saved = validate_config(read_config_file(newest / CONFIG_FILENAME), where=str(newest / CONFIG_FILENAME))
    differences = resume_differences(saved, config)
    if differences:
        raise ConfigError("the config differs from the one the checkpoint was trained with: " + "; ".join(differences),
                          where=str(newest), fix="resume with the same settings, or start over with --force")
    progress = read_progress(newest)
    saved_per_step = saved.training.grad_accum * progress.world_size
    per_step = config.training.grad_accum * processes.world_size
    if saved_per_step != per_step:
        raise ConfigError(f"the checkpoint's steps have {saved_per_step} micro-batches ({progress.world_size} "
                          f"process(es) x grad_accum {saved.training.grad_accum}), this run's {per_step} "
                          f"({processes.world_size} x {config.training.grad_accum})", where=str(newest),
                          fix="keep processes x training.grad_accum the same (the data of a step depends on it)")
    return newest


def prepare_data(config: TrainConfig, tokenizer: Any, *, hasher: FileHasher | None = None) -> PreparedData:
    """Read, render and tokenize the training data (and the evaluation data or split); ``hasher`` hashes the
    data files for the cache fingerprint and the lineage record."""
    from mtool.train.tokenizer import prepare_tokenizer

    hasher = hasher or FileHasher.default()
    settings = config.data
    source = find_data(settings.path)
    records = load_records(source, split=settings.split)
    if settings.max_examples is not None and settings.max_examples < len(records):
        records = records.select(range(settings.max_examples))
    where = ", ".join(settings.path)
    if settings.format == "auto":
        data_format = detect_format(records.column_names, where)
    else:
        data_format = settings.format
        check_columns(data_format, records.column_names, where)
    setup = prepare_tokenizer(tokenizer, chat_template=settings.chat_template, data_format=data_format,
                              add_tokens=settings.add_tokens)

    def tokenized(dataset: "datasets.Dataset", digest: str, label: str, files: DataSource):
        fingerprint = data_fingerprint(digest, label, data_format, setup.template, settings.seq_len,
                                       settings.train_on_prompt, settings.max_examples,
                                       tokenizer.backend_tokenizer.to_str())
        try:
            return tokenize_dataset(dataset, tokenizer, data_format=data_format, template=setup.template,
                                    seq_len=settings.seq_len, train_on_prompt=settings.train_on_prompt,
                                    fingerprint=fingerprint, where=label)
        except RecordError as error:  # name the file and line of the record
            raise locate(error, files.files, files.builder) from None

    digest = source.sha256(hasher)
    train_data = tokenized(records, digest, where, source)
    if train_data.stats.kept == 0:
        raise_no_trainable(train_data.stats, where)
    eval_data = None
    train_set = train_data.dataset
    if settings.eval_path:
        eval_source = find_data(settings.eval_path, key="data.eval_path")
        eval_records = load_records(eval_source, split=settings.split, key="data.eval_path")
        eval_data = tokenized(eval_records, eval_source.sha256(hasher), ", ".join(settings.eval_path),
                              eval_source).dataset
    elif settings.eval_fraction > 0:
        train_set, eval_data = split_for_eval(train_data, settings.eval_fraction, config.seed)
    return PreparedData(source, digest, data_format, setup.template, setup.added_tokens, train_set, eval_data,
                        train_data.stats)


def raise_no_trainable(stats: DataStats, where: str) -> None:
    raise InputError(f"none of the {stats.examples} examples has a token to train on (every label is masked)",
                     where=where, fix="check the responses are not empty, raise data.seq_len if prompts are long, "
                                      "or set data.train_on_prompt")


def _report_data(config: TrainConfig, data: PreparedData) -> None:
    stats = data.stats
    ui.info(f"data: {data.data_format} format; {stats.describe(config.data.seq_len)}"
            + (f"; {len(data.eval)} held out for evaluation" if data.eval is not None else ""))
    if stats.dropped:
        ui.warn(f"{stats.dropped} of {stats.examples} examples have no token to train on (empty response, or the "
                f"response lies beyond data.seq_len={config.data.seq_len}) and are skipped")
    if stats.truncated:
        ui.warn(f"{stats.truncated} of {stats.examples} examples are longer than data.seq_len={config.data.seq_len} "
                f"and were cut ({stats.tokens_cut} tokens lost)")


def _preflight(config: TrainConfig, base: ModelRef, processes: Processes) -> None:
    """Print the memory estimate; warn when it will not fit the GPU."""
    from mtool.train.estimate import estimate_for_config
    from mtool.train.fit import detected_gpu_memory, fit_report

    estimate = estimate_for_config(config, base.path, device=processes.device, processes=processes.world_size)
    capacity = detected_gpu_memory(processes.device)
    ui.info(fit_report(estimate, capacity, gpus=processes.world_size))
