"""The training loop: micro-batches -> gradients -> optimizer steps, with checkpoints, evaluation and logs.

Loss normalization. A step sees ``grad_accum`` micro-batches on each of ``P`` processes. Let ``N`` be the number
of trained token positions in all of them together (summed across processes before the first forward pass).
Each micro-batch's loss is its *sum* of token cross-entropies divided by ``N`` (``num_items_in_batch``), and
the backward pass uses that loss times ``P`` because data parallelism averages gradients over processes. The
gradient is then exactly the gradient of the token mean over the whole step, however the tokens are split into
micro-batches, padded or packed, and the logged loss (the sum of those losses over every micro-batch and
process) is that token mean. Dividing each micro-batch by its own token count and averaging, as naive
accumulation does, weights tokens of short micro-batches more.

Determinism. The random state (dropout) of the ``m``-th micro-batch of step ``s`` (counted over all processes:
process ``r``'s ``i``-th micro-batch is ``m = i P + r``) is seeded from ``(seed, m, s)``, the data of step ``s`` is
a function of ``(seed, s)`` (:mod:`mtool.train.batching`), and the learning rate a function of ``s``
(:func:`mtool.train.optim.lr_factor`): a run resumed from the checkpoint of step ``s`` computes exactly the
losses the uninterrupted run computed, and ``P`` processes accumulating ``a`` micro-batches compute what one
process accumulating ``a P`` computes, dropout included.

Stopping. The first Ctrl-C (or SIGTERM) lets the current step finish, writes a checkpoint and stops; a second
Ctrl-C stops at once. A loss or gradient that is NaN or infinite stops the run before the optimizer applies it,
with the newest checkpoint (all of whose steps were finite) left as it was.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtool import ui
from mtool.errors import ComputeError
from mtool.train.batching import StepPlan, group_micro_batches, load_micro_batches
from mtool.train.distributed import Processes, barrier, gradient_sync, sum_across, unwrap
from mtool.train.metrics import MetricsLog, memory_in_use_gib
from mtool.train.optim import lr_factor, set_learning_rate
from mtool.train.state import Progress, latest_checkpoint, prune_checkpoints, save_checkpoint, step_folder

if TYPE_CHECKING:
    import datasets
    import torch

    from mtool.train.config import TrainConfig


def step_seed(seed: int, micro_batch: int, step: int) -> int:
    """The seed of the random state of a step's ``micro_batch`` (its index among all processes' micro-batches of
    the step): ``(seed * 1000003 + micro_batch) * 1000033 + step`` modulo 2**63 (distinct for every micro-batch
    of a run)."""
    return ((seed * 1_000_003 + micro_batch) * 1_000_033 + step) % 2**63


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        ui.warn("stopping after this step to write a checkpoint (press Ctrl-C again to stop at once)")


@dataclass
class Loop:
    """Everything the loop works with (built by :mod:`mtool.train.run`)."""

    config: "TrainConfig"
    model: Any  # the PEFT model, wrapped in DistributedDataParallel when there are several processes
    optimizer: "torch.optim.Optimizer"
    train_data: "datasets.Dataset"
    eval_data: "datasets.Dataset | None"
    plan: StepPlan
    warmup_steps: int
    processes: Processes
    pad_id: int
    checkpoint_dir: Path
    metrics: MetricsLog
    config_yaml: str
    scaler: Any = None  # torch.amp.GradScaler for float16 compute
    compute_dtype: Any = None  # torch.dtype of the base's computations
    eval_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. skip_logits=True under a chunked loss
    progress: Progress = field(default_factory=Progress)

    @property
    def total_steps(self) -> int:
        return len(self.plan)

    @property
    def packing(self) -> bool:
        return self.config.data.packing


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    trained_tokens: int
    seconds: float
    stop: bool


def run_loop(loop: Loop) -> dict[str, Any]:
    """Train from ``loop.progress.step`` to the end of the plan; return the final metrics."""
    settings = loop.config.training
    eval_loss = None
    bar = ui.progress(total=loop.total_steps, desc="train", unit="step") if loop.processes.is_main else None
    if bar is not None and loop.progress.step:
        bar.update(loop.progress.step)
    last_loss = math.nan
    try:
        with StopRequest() as stop:
            while loop.progress.step < loop.total_steps:
                result = train_step(loop, stop)
                last_loss = result.loss
                _record_step(loop, result, bar)
                step = loop.progress.step
                if loop.eval_data is not None and settings.eval_every and step % settings.eval_every == 0 \
                        and step < loop.total_steps:
                    eval_loss = _evaluate_and_log(loop)
                if result.stop:
                    path = write_checkpoint(loop)
                    ui.info(f"stopped at step {step}; checkpoint {path}; continue with --resume")
                    raise KeyboardInterrupt
                if loop.config.checkpoints.every and step % loop.config.checkpoints.every == 0 \
                        and step < loop.total_steps:
                    write_checkpoint(loop)
    finally:
        if bar is not None:
            bar.close()
    if loop.eval_data is not None:
        eval_loss = _evaluate_and_log(loop)
    metrics: dict[str, Any] = {"train_loss": last_loss, "steps": loop.progress.step, "epochs": loop.progress.epoch + 1,
                               "tokens": loop.progress.tokens, "trained_tokens": loop.progress.trained_tokens,
                               "train_seconds": round(loop.progress.elapsed_s, 2)}
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    return metrics


def train_step(loop: Loop, stop: StopRequest) -> StepResult:
    """One optimizer step over this process's micro-batches of step ``loop.progress.step``."""
    import torch

    started = time.perf_counter()
    step = loop.progress.step
    processes = loop.processes
    batches = [b.to(processes.device) for b in load_micro_batches(
        loop.train_data, loop.plan.steps[step], packing=loop.packing, pad_id=loop.pad_id, fallback=[0])]
    local_trained = sum(b.trained for b in batches)
    (global_trained,) = sum_across([local_trained], processes)
    normalizer = max(1, int(global_trained))
    local_loss = torch.zeros((), dtype=torch.float64, device=processes.device)
    for index, batch in enumerate(batches):
        torch.manual_seed(step_seed(loop.config.seed, index * processes.world_size + processes.rank, step))
        with gradient_sync(loop.model, enabled=index == len(batches) - 1):
            loss = loop.model(**batch.inputs, num_items_in_batch=normalizer, use_cache=False).loss
            scaled = loss * processes.world_size
            (loop.scaler.scale(scaled) if loop.scaler is not None else scaled).backward()
        local_loss += loss.detach()  # stays on the device: one synchronization per step, not per micro-batch
    step_loss, tokens, stop_votes = sum_across([float(local_loss), sum(b.tokens for b in batches),
                                                float(stop.requested)], processes)
    if not math.isfinite(step_loss):
        _fail_non_finite(loop, "loss", step_loss)
    parameters = [p for p in loop.model.parameters() if p.requires_grad]
    if loop.scaler is not None:
        loop.scaler.unscale_(loop.optimizer)
    max_norm = loop.config.training.max_grad_norm or math.inf
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded norm
    if not math.isfinite(grad_norm) and loop.scaler is None:
        _fail_non_finite(loop, "gradient norm", grad_norm)
    factor = lr_factor(step, total_steps=loop.total_steps, warmup_steps=loop.warmup_steps,
                       schedule=loop.config.training.schedule, min_ratio=loop.config.training.min_lr_ratio)
    set_learning_rate(loop.optimizer, loop.config.training.lr * factor)
    if loop.scaler is not None:
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    progress = loop.progress
    progress.step += 1
    progress.epoch = loop.plan.epochs[step]
    progress.tokens += int(tokens)
    progress.trained_tokens += int(global_trained)
    progress.elapsed_s += seconds
    return StepResult(step_loss, grad_norm, int(tokens), int(global_trained), seconds, stop_votes > 0)


def _fail_non_finite(loop: Loop, what: str, value: float) -> None:
    newest = latest_checkpoint(loop.checkpoint_dir)
    kept = f"the newest checkpoint ({newest}) is kept; continue from it with --resume" if newest else \
        "no checkpoint was written before it"
    raise ComputeError(f"the {what} became {value} at step {loop.progress.step + 1}; training stopped and {kept}",
                       fix="lower training.lr, keep training.max_grad_norm on, check the data for broken examples, "
                           "or use compute_dtype bfloat16 instead of float16")


def _record_step(loop: Loop, result: StepResult, bar: Any) -> None:
    if not loop.processes.is_main:
        return
    step = loop.progress.step
    lr = loop.optimizer.param_groups[0]["lr"]
    tokens_per_s = result.tokens / result.seconds if result.seconds > 0 else 0.0
    memory = memory_in_use_gib(loop.processes.device)
    row = {"step": step, "epoch": loop.progress.epoch, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
           "tokens": result.tokens, "trained_tokens": result.trained_tokens, "tokens_per_s": round(tokens_per_s, 1),
           "memory_gib": round(memory, 3), "elapsed_s": round(loop.progress.elapsed_s, 3)}
    loop.metrics.append(row)
    summary = f"loss {result.loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  {memory:.2f} GiB"
    if bar is not None and not bar.disable:
        bar.update(1)
        bar.set_postfix_str(summary, refresh=False)
    elif step % loop.config.training.log_every == 0 or step == loop.total_steps:
        ui.info(f"step {step}/{loop.total_steps}  {summary}")


def write_checkpoint(loop: Loop) -> Path:
    """Every process gathers the full training state (FSDP shards it; DDP processes hold copies of it); the main
    process writes the checkpoint of the current step."""
    from mtool.train.fsdp import gather_optimizer_state, gather_trainable_state, is_sharded

    folder = step_folder(loop.checkpoint_dir, loop.progress.step)
    loop.progress.scaler = loop.scaler.state_dict() if loop.scaler is not None else None
    loop.progress.world_size = loop.processes.world_size
    model = unwrap(loop.model)
    trainable = gather_trainable_state(model) if is_sharded(model) else None
    optimizer_state = gather_optimizer_state(model, loop.optimizer)
    if loop.processes.is_main:
        save_checkpoint(folder, model=model, optimizer_state=optimizer_state, progress=loop.progress,
                        config_yaml=loop.config_yaml, trainable=trainable)
        prune_checkpoints(loop.checkpoint_dir, loop.config.checkpoints.keep)
    barrier(loop.processes)
    return folder


@contextlib.contextmanager
def _evaluation_mode(model: Any) -> Iterator[None]:
    import torch

    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


def evaluate(loop: Loop) -> tuple[float, int]:
    """The token-mean loss over the whole evaluation set (all processes) and its token count."""
    config = loop.config
    lengths = loop.eval_data["length"]
    groups = group_micro_batches(range(len(lengths)), lengths, batch_size=config.training.micro_batch_size,
                                 seq_len=config.data.seq_len, packing=config.data.packing)
    world = loop.processes.world_size
    mine = groups[loop.processes.rank::world]
    mine += [[]] * (-(-len(groups) // world) - len(mine))  # as many passes everywhere (FSDP gathers in step)
    total = 0.0
    count = 0
    with _evaluation_mode(loop.model):
        model = loop.model if hasattr(loop.model, "set_requires_gradient_sync") else unwrap(loop.model)
        for group in mine:
            (batch,) = load_micro_batches(loop.eval_data, [group], packing=loop.packing, pad_id=loop.pad_id,
                                          fallback=[0])
            batch = batch.to(loop.processes.device)
            total += float(model(**batch.inputs, num_items_in_batch=1, use_cache=False, **loop.eval_kwargs).loss)
            count += batch.trained
    total, count = sum_across([total, float(count)], loop.processes)
    return total / max(1.0, count), int(count)


def _evaluate_and_log(loop: Loop) -> float:
    loss, tokens = evaluate(loop)
    if loop.processes.is_main:
        loop.metrics.append({"step": loop.progress.step, "eval_loss": loss, "eval_tokens": tokens})
        ui.info(f"step {loop.progress.step}: eval loss {loss:.4f} over {tokens} tokens")
    return loss
