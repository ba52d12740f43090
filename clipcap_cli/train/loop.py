"""Training a ClipCap model on a features store: ``prepare`` builds a run, ``fit`` is the loop.

The recipe is the original train.py's (AdamW without weight decay, linear warm-up then linear
decay, one sample per caption, no BOS/EOS), minus its waste: batches are padded to their own
longest caption, padding leaves the loss through a mask, and a frozen GPT-2 gets no gradients.
It runs in one process or under ``torchrun`` (DistributedDataParallel, one process per GPU).
Ctrl-C saves the run, and ``--resume`` continues it on exactly the uninterrupted trajectory.
Nothing here prints: progress goes to ``TrainCallback`` hooks (``commands/train.py`` draws them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from clipcap_cli.distributed import Distributed
from clipcap_cli.errors import ClipCapError, UsageError
from clipcap_cli.model import ClipCaptionModel
from clipcap_cli.train import monitor, noise, state
from clipcap_cli.train.callbacks import Callbacks, MetricsLog, StartInfo, StepInfo, TrainCallback, TrainResult
from clipcap_cli.train.data import Batch
from clipcap_cli.train.options import TrainOptions, auto_warmup
from clipcap_cli.train.rundata import TrainData, load_data
from clipcap_cli.train.state import RESUME_FILE, Position
from clipcap_cli.weights import backbones, lm

log = logging.getLogger(__name__)
ADAM_BETAS = (0.9, 0.999)  # transformers' old AdamW defaults, which the original used
ADAM_EPS = 1e-6
FEW_STEPS = 100  # a run with fewer optimizer steps is warned that it will learn little
LOSS_EMA = 0.95  # smoothing of the loss shown while training


class NonFiniteError(ClipCapError):
    """The loss or the weights stopped being finite numbers: training stops, nothing broken is saved."""


class TrainingInterrupted(ClipCapError):
    """Ctrl-C / SIGTERM: the resume state was saved and the run can be continued."""

    exit_code = 130

    def __init__(self, message: str, out_dir: Path, step: int):
        super().__init__(message)
        self.out_dir = out_dir
        self.step = step


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The original's schedule (get_linear_schedule_with_warmup) at optimizer step ``step`` (0-based).

    Rises linearly from 0 over ``warmup`` steps, then falls linearly to 0 at ``total``. Step 0
    therefore runs at lr 0 when there is a warm-up, exactly as in the original.
    """
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


# --------------------------------------------------------------------------- the run


def train(
    opts: TrainOptions,
    data: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callback: TrainCallback | Sequence[TrainCallback] | None = None,
) -> TrainResult:
    """Train a ClipCap model on the features store ``data``, writing the run to ``out_dir``.

    ``out_dir`` receives ``config.json``, ``metrics.jsonl``, ``epoch-NNN.safetensors`` checkpoints
    (loadable with no other flags) and ``resume.pt``. With ``resume=True`` the run continues from
    ``resume.pt`` with the same schedule and data order. Under torchrun every process calls this;
    only rank 0 writes files, and ``callback`` (one TrainCallback or several) runs on rank 0 only
    unless it sets ``all_ranks``.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM, after saving the resume state.
        PeerFailed: under torchrun, when another process failed (its message is the message).
    """
    dist = Distributed.setup(opts.device)
    out = Path(out_dir)
    given = list(callback) if isinstance(callback, Sequence) else [callback]
    metrics = MetricsLog(out, opts.log_every, opts.batch_size * opts.grad_accum * dist.world_size)
    callbacks = Callbacks([*given, metrics], main=dist.main)
    try:
        with _tf32(dist.device):
            result = fit(prepare(opts, Path(data), out, resume, dist, callbacks), callbacks)
        # Every process leaves together: a gloo group torn down while its peer is still busy (rank 0
        # writing its report) can abort the process at exit ("terminate called without an active exception").
        dist.barrier()
        return result
    finally:
        metrics.close()
        dist.close()


@contextlib.contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """TF32 matrix products on CUDA while this run trains; the process's settings come back after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Trainer:
    """A run ready to go, built by ``prepare``; ``fit`` moves it on (weights, optimizer, ``pos``)."""

    opts: TrainOptions
    dist: Distributed
    out: Path
    data: TrainData
    model: ClipCaptionModel
    ddp: nn.Module  # what the steps call: the model, wrapped by DDP (gradients averaged) under torchrun
    params: list[nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a no-op otherwise
    amp_dtype: torch.dtype | None  # autocast dtype; None = plain fp32
    pos: Position

    @property
    def total_steps(self) -> int:
        return self.opts.epochs * self.data.steps_per_epoch

    @property
    def batches_per_epoch(self) -> int:  # micro-batches
        return self.data.steps_per_epoch * self.opts.grad_accum

    @property
    def global_batch(self) -> int:
        return self.opts.batch_size * self.opts.grad_accum * self.dist.world_size

    def lr(self, step: int) -> float:
        return self.opts.lr * lr_factor(step, self.opts.warmup, self.total_steps)

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)


def prepare(opts: TrainOptions, data: Path, out: Path, resume: bool, dist: Distributed, cb: TrainCallback) -> Trainer:
    """Data, model, optimizer, and the position: fresh, or restored from ``out/resume.pt``."""
    state.check_out_dir(out, resume)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    tokenizer = lm.training_tokenizer(backbones.load_tokenizer(opts.model.lm), opts.model.stop_token)
    gpt = backbones.load_lm(opts.model.lm)
    run_data = load_data(opts, data, tokenizer, gpt.config, dist, cb)
    opts = noise.resolve(opts, run_data.config)  # --noise-variance auto: from the store's modality
    opts = opts.replace(warmup=auto_warmup(opts.warmup, run_data.steps_per_epoch * opts.epochs))
    monitor.check_options(opts, run_data)

    device = dist.device
    torch.manual_seed(opts.seed)  # the mapper's initial weights: the same on every rank
    model = ClipCaptionModel(run_data.config, gpt)
    if opts.lora:  # adapters on the LM, its own weights frozen (lora.py); drawn from the seeded RNG, after the mapper
        from clipcap_cli.weights import lora

        lora.wrap(model, opts.lora, opts.lora_alpha, opts.lora_dropout, opts.lora_targets)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    ddp: nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Frozen GPT-2 parameters have requires_grad False, so DDP neither waits for nor syncs
        # them; every trainable parameter is used each step, so no unused-parameter search.
        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
    # One fused kernel per step instead of ~10 elementwise passes per tensor: 8x faster on CPU.
    optimizer = torch.optim.AdamW(
        params,
        lr=opts.lr,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        weight_decay=opts.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    amp_dtype, use_scaler = _mixed_precision(device, opts.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    if resume:
        pos = state.load_resume_state(
            out / RESUME_FILE,
            opts=opts,
            data_key=run_data.key,
            embeddings_sha256=run_data.embeddings_sha256,
            data_path=run_data.path,
            world_size=dist.world_size,
            rank=dist.rank,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
        )
    else:
        pos = Position()
        torch.manual_seed(opts.seed + dist.rank)  # dropout differs across ranks; the data order stays seeded
    return Trainer(opts, dist, out, run_data, model, ddp, params, optimizer, scaler, amp_dtype, pos)


def _mixed_precision(device: torch.device, precision: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "fp16":
        if device.type != "cuda":
            raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32)")
        return torch.float16, True
    if device.type == "cpu":
        from clipcap_cli.decoding.precision import bf16_fallback_message, cpu_has_bf16

        if not cpu_has_bf16():  # emulated bf16 autocast: many times slower than fp32
            log.warning(bf16_fallback_message(instead="the default, fp32"))
            return None, False
    return torch.bfloat16, False


# --------------------------------------------------------------------------- the loop


def fit(t: Trainer, cb: TrainCallback) -> TrainResult:
    """Epochs of optimizer steps, each epoch ending in validation and checkpoints.

    Runs from ``t.pos`` (the start, or where a resumed run stopped) to the last epoch. Under
    torchrun every process runs this same loop on its own share of each epoch's captions.
    """
    opts, dist, pos = t.opts, t.dist, t.pos
    _start(t, cb)
    checkpoints: list[Path] = []
    mon = monitor.Monitor(t)
    t.model.train()
    with _StopFlag().installed() as stop:
        while pos.epoch < opts.epochs and not monitor.early_stopped(opts, pos):
            # This epoch's batches in their seeded order, from the first a resumed run has not done.
            it = t.data.batches(pos.epoch, pos.batch, opts.batch_size, opts.grad_accum, opts.num_workers, dist.device)
            while pos.batch < t.batches_per_epoch:
                t0 = time.perf_counter()
                lr = t.lr(pos.step)
                loss, caption_ids = train_step(t, it)
                pos.step += 1
                pos.batch += opts.grad_accum
                # One small all-reduce: the mean loss, and whether any process was asked to stop
                # (all must stop after the same step, or the next collective would hang).
                loss_value, stopping = _mean_loss_and_stop(dist, loss, stop.requested)
                if not math.isfinite(loss_value):
                    raise NonFiniteError(
                        f"loss is {loss_value} at step {pos.step} (epoch {pos.epoch + 1}): training stopped; "
                        f"{_last_good(t)}; lower --lr (now {opts.lr:g}) or check the data"
                    )
                dt = time.perf_counter() - t0
                pos.elapsed += dt
                pos.loss_ema = (
                    loss_value if pos.loss_ema is None else LOSS_EMA * pos.loss_ema + (1 - LOSS_EMA) * loss_value
                )
                monitor.add_step_loss(pos, loss_value)
                info = StepInfo(
                    step=pos.step,
                    total_steps=t.total_steps,
                    epoch=pos.epoch + 1,
                    epochs=opts.epochs,
                    loss=loss_value,
                    loss_ema=pos.loss_ema,
                    lr=lr,
                    samples_per_s=t.global_batch / max(dt, 1e-9),
                    elapsed=pos.elapsed,
                    seconds=dt,
                    caption_ids=caption_ids,
                )
                with dist.fail_together():  # rank 0's callbacks (progress, metrics.jsonl) may fail
                    cb.on_step(info)
                if stopping:
                    save_resume(t, cb)
                    raise TrainingInterrupted(
                        f"interrupted at step {pos.step}/{t.total_steps}; the run was saved to {t.out / RESUME_FILE}",
                        t.out,
                        pos.step,
                    )
                if pos.step % opts.checkpoint_every == 0:
                    save_resume(t, cb)
            checkpoints += _end_epoch(t, cb, mon)
    result = TrainResult(
        t.out,
        checkpoints,
        pos.step,
        pos.loss_ema,
        pos.val_loss,
        best=t.out / monitor.BEST_FILE if pos.best_epoch else None,
        best_val_loss=pos.best_val_loss,
        best_epoch=pos.best_epoch,
        stopped_early=monitor.early_stopped(opts, pos) and pos.epoch < opts.epochs,
        report=mon.report,
    )
    with dist.fail_together():
        cb.on_end(result, t.model)
    return result


def _mean_loss_and_stop(dist: Distributed, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    shared = dist.all_reduce_sum(torch.stack([loss, torch.tensor(float(stop), device=dist.device)]))  # (2,)
    return float(shared[0]) / dist.world_size, float(shared[1]) > 0


def _start(t: Trainer, cb: TrainCallback) -> None:
    """Write config.json and tell the callbacks what is about to run."""
    with t.dist.fail_together():
        if t.dist.main:
            state.write_config(
                t.out,
                {
                    "train_options": t.opts.to_dict(),
                    "model_config": t.data.config.to_dict(),
                    "data": str(t.data.path),
                    "world_size": t.dist.world_size,
                    "steps_per_epoch": t.data.steps_per_epoch,
                    "total_steps": t.total_steps,
                },
            )
        if t.data.truncated:
            cb.on_warning(f"{t.data.truncated} caption(s) longer than {t.data.max_tokens} tokens were truncated")
        if t.total_steps < FEW_STEPS and t.pos.step == 0:
            cb.on_warning(
                f"this run has only {t.total_steps} optimizer step(s) ({len(t.data.train)} captions, "
                f"{t.global_batch} a step, {t.opts.epochs} epoch(s)): a small collection learns little that way; "
                "lower --batch-size or raise --epochs"
            )
        cb.on_start(
            StartInfo(
                out_dir=t.out,
                total_steps=t.total_steps,
                steps_per_epoch=t.data.steps_per_epoch,
                start_step=t.pos.step,
                epochs=t.opts.epochs,
                train_samples=len(t.data.train),
                val_samples=len(t.data.val),
                world_size=t.dist.world_size,
                global_batch=t.global_batch,
                device=str(t.dist.device),
                precision=str(t.amp_dtype).removeprefix("torch.") if t.amp_dtype else "fp32",
                trainable_params=sum(p.numel() for p in t.params),
                truncated=t.data.truncated,
                max_tokens=t.data.max_tokens,
                log_window=t.pos.log_window,
                stopped_early=monitor.early_stopped(t.opts, t.pos),
            )
        )


def train_step(t: Trainer, batches: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns:
        (the mean loss, on the device, shape = (); the caption ids trained on, shape = (n,)).
    """
    accum = t.opts.grad_accum
    total = torch.zeros((), device=t.dist.device)
    ids = []
    for micro in range(accum):
        batch = next(batches)
        ids.append(batch.index)
        batch = batch.to(t.dist.device)
        batch = batch._replace(prefix=noise.inject_noise(batch.prefix, t.opts.noise_variance or 0.0))  # CapDec
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = micro == accum - 1 or not t.dist.enabled
        with contextlib.nullcontext() if sync else t.ddp.no_sync():
            with t.autocast():
                _, loss = t.ddp(batch.tokens, batch.prefix, batch.mask, targets=batch.tokens)
                loss = loss / accum
            t.scaler.scale(loss).backward()
        total += loss.detach().float()
    for group in t.optimizer.param_groups:
        group["lr"] = t.lr(t.pos.step)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    return total, torch.cat(ids)


@torch.no_grad()
def validate(t: Trainer) -> float | None:
    """Token-weighted mean loss over the validation captions (sharded across processes)."""
    val = t.data.val
    if len(val) == 0:
        return None
    sums = torch.zeros(2, dtype=torch.float64, device=t.dist.device)  # (sum of token losses, tokens)
    t.model.eval()
    try:
        for batch in t.data.val_batches(t.opts.batch_size, t.opts.num_workers, t.dist.device):
            batch = batch.to(t.dist.device)
            with t.autocast():  # the model itself, not DDP: there are no gradients to sync
                _, loss = t.model(batch.tokens, batch.prefix, batch.mask, targets=batch.tokens)
            n = batch.mask.sum()
            sums += torch.stack([loss.double() * n, n.double()])
    finally:
        t.model.train()
    t.dist.all_reduce_sum(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else None


def _end_epoch(t: Trainer, cb: TrainCallback, mon: monitor.Monitor) -> list[Path]:
    """Validate, write the epoch checkpoint when due, watch (samples, best checkpoint, report: see
    monitor.py), save the resume state; the checkpoints written."""
    pos = t.pos
    pos.epoch += 1
    pos.batch = 0
    _check_weights(t)
    pos.val_loss = validate(t)
    if pos.val_loss is not None:
        with t.dist.fail_together():
            cb.on_validation(pos.epoch, pos.step, pos.val_loss)
    improved = monitor.close_epoch(pos, pos.val_loss)
    written = []
    last = pos.epoch == t.opts.epochs or monitor.early_stopped(t.opts, pos)
    if pos.epoch % t.opts.save_every == 0 or last:
        path = t.out / f"epoch-{pos.epoch:03d}.safetensors"
        with t.dist.fail_together():
            if t.dist.main:
                state.save_epoch_checkpoint(t.model, path, pos.epoch, pos.step, t.opts)
                cb.on_checkpoint(path, "epoch")
        written.append(path)
    with t.dist.fail_together():  # rank 0 captions its samples while the others wait in this all-reduce
        mon.end_epoch(t, cb, improved)
    save_resume(t, cb)
    return written


def save_resume(t: Trainer, cb: TrainCallback) -> None:
    """Save ``resume.pt`` (rank 0 writes it, holding every rank's RNG streams)."""
    _check_weights(t)
    rngs = t.dist.all_gather(state.rng_state())  # every rank's own dropout stream
    with t.dist.fail_together():
        if t.dist.main:
            path = t.out / RESUME_FILE
            state.save_resume_state(
                path,
                opts=t.opts,
                data_key=t.data.key,
                embeddings_sha256=t.data.embeddings_sha256,
                world_size=t.dist.world_size,
                pos=t.pos,
                model=t.model,
                optimizer=t.optimizer,
                scaler=t.scaler,
                rngs=rngs,
            )
            cb.on_checkpoint(path, "resume")


def _last_good(t: Trainer) -> str:
    resume = t.out / RESUME_FILE
    if resume.is_file():
        return f"the last good state, {resume}, stays the one --resume continues from"
    return "nothing was saved"


def _check_weights(t: Trainer) -> None:
    """Refuse to save weights that are not all finite (the last good files on disk stay as they are)."""
    if all(bool(torch.isfinite(p).all()) for p in t.params):
        return
    raise NonFiniteError(
        f"the weights are no longer finite at step {t.pos.step} (epoch {t.pos.epoch}): training stopped; "
        f"{_last_good(t)}; lower --lr (now {t.opts.lr:g})"
    )


class _StopFlag:
    """Set by SIGINT/SIGTERM while the loop runs; the loop saves and stops after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once (the last saved resume state then stands).
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return

        def handle(signum: int, frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum

        # A signal the caller ignores (a background job's SIGINT) stays ignored.
        wanted = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
        saved = {s: signal.signal(s, handle) for s in wanted}
        try:
            yield self
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
