"""A run folder on disk: its ``config.json``, the epoch checkpoints, and ``resume.pt``, the exact
state (weights, optimizer, RNG streams, position in the data) that ``--resume`` continues from.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import atomic_write, check_folder, remove_stale_temps, write_text_atomic
from clipcap_cli.train.options import TrainOptions, resume_conflicts
from clipcap_cli.version import __version__
from clipcap_cli.weights import lora

if TYPE_CHECKING:
    from clipcap_cli.model import ClipCaptionModel

RESUME_FILE = "resume.pt"
CONFIG_FILE = "config.json"
STATE_FORMAT = "clipcap-train-state"


@dataclass
class Position:
    """Where a run is, and what it has measured so far. Next: epoch ``epoch``, its micro-batch ``batch``."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done
    batch: int = 0  # micro-batches done in the current epoch
    loss_ema: float | None = None  # smoothed training loss
    val_loss: float | None = None  # last validation loss
    elapsed: float = 0.0  # seconds of training, across resumes
    # metrics.jsonl's open window: losses and seconds since its last line (see StartInfo.log_window)
    log_window: dict[str, Any] = field(default_factory=lambda: {"losses": [], "seconds": 0.0})
    # the monitor's (monitor.py): the best held-out loss, for best.safetensors and --early-stop ...
    best_val_loss: float | None = None
    best_epoch: int = 0  # the epoch (1-based) that reached it; 0 = none yet
    stale_epochs: int = 0  # epochs since the held-out loss last improved
    # ... and the training loss by epoch, for the "not moving" warning
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each finished epoch
    epoch_loss_sum: float = 0.0  # the current epoch's step losses so far
    epoch_loss_steps: int = 0


# --------------------------------------------------------------------------- the run folder


def check_out_dir(out: Path, resume: bool) -> None:
    """A new run needs a folder without one; ``--resume`` needs its resume state.

    Temporary files that an interrupted save left in ``out`` are removed here (``fsutil.remove_stale_temps``).
    """
    check_folder(out)
    remove_stale_temps(out)
    if resume:
        if not (out / RESUME_FILE).is_file():
            raise UsageError(f"nothing to resume in {out}: no {RESUME_FILE}")
        return
    if (out / RESUME_FILE).exists() or any(out.glob("epoch-*.safetensors")):
        raise UsageError(f"{out} already holds a training run: add --resume to continue it, or choose another --out")


def write_config(out: Path, info: dict[str, Any]) -> None:
    """``config.json``: how the run was started (``read_run`` reads it back for ``--resume``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / CONFIG_FILE, json.dumps({**info, "clipcap_version": __version__}, indent=2) + "\n")


def read_run(out_dir: str | Path) -> tuple[TrainOptions, Path]:
    """The options and features path a run folder was started with (for ``--resume``)."""
    out_dir = Path(out_dir)
    cfg = out_dir / CONFIG_FILE
    if not (out_dir / RESUME_FILE).is_file() or not cfg.is_file():
        raise UsageError(f"nothing to resume in {out_dir}: no {RESUME_FILE} (start a new run without --resume)")
    saved = json.loads(cfg.read_text(encoding="utf-8"))
    return TrainOptions.from_dict(saved["train_options"]), Path(saved["data"])


def save_epoch_checkpoint(
    model: ClipCaptionModel, path: Path, epoch: int, step: int, opts: TrainOptions, val_loss: float | None = None
) -> Path:
    """An epoch's checkpoint: usable by ``clipcap caption --model`` with no other flags."""
    from clipcap_cli.weights import checkpoint

    extra = {
        "epoch": str(epoch),
        "step": str(step),
        "train_options": json.dumps(opts.to_dict()),
        # CapDec: trained on text embeddings, and with how much noise (resolved: never "auto" here)
        "from_text": json.dumps(model.config.from_text),
        "noise_variance": json.dumps(opts.noise_variance),
    }
    if val_loss is not None:
        extra["val_loss"] = repr(float(val_loss))
    if lora.settings_of(model):  # the mapper and the adapters, merged into the named LM at load time
        extra.update(lora.checkpoint_metadata(model))
        return checkpoint.save(model, path, extra_metadata=extra, tensors=lora.checkpoint_tensors(model))
    return checkpoint.save(model, path, extra_metadata=extra)


# --------------------------------------------------------------------------- resume.pt


def save_resume_state(
    path: Path,
    *,
    opts: TrainOptions,
    data_key: str,
    embeddings_sha256: str | None,
    world_size: int,
    pos: Position,
    model: ClipCaptionModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rngs: list[dict[str, Any]],
) -> None:
    """Write everything a resume needs; ``rngs`` holds every process's RNG state, by rank."""
    state = {
        "format": STATE_FORMAT,
        "format_version": 1,
        "clipcap_version": __version__,
        "options": opts.to_dict(),
        "data_key": data_key,
        "embeddings_sha256": embeddings_sha256,
        "world_size": world_size,
        "step": pos.step,
        "epoch": pos.epoch,
        "batch": pos.batch,
        "loss_ema": pos.loss_ema,
        "val_loss": pos.val_loss,
        "elapsed": pos.elapsed,
        "log_window": {
            "losses": [float(x) for x in pos.log_window["losses"]],
            "seconds": float(pos.log_window["seconds"]),
        },
        "best_val_loss": pos.best_val_loss,
        "best_epoch": pos.best_epoch,
        "stale_epochs": pos.stale_epochs,
        "epoch_losses": [float(x) for x in pos.epoch_losses],
        "epoch_loss_sum": float(pos.epoch_loss_sum),
        "epoch_loss_steps": pos.epoch_loss_steps,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rngs,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(
    path: Path,
    *,
    opts: TrainOptions,
    data_key: str,
    embeddings_sha256: str | None,
    data_path: Path,
    world_size: int,
    rank: int,
    model: ClipCaptionModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> Position:
    """Restore weights, optimizer, loss scaler and this process's RNG streams; return the position.

    Refused (UsageError) when the run would not continue the same trajectory: other options
    (beyond RESUMABLE_CHANGES), another number of processes, or changed captions.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if state.get("format") != STATE_FORMAT:
        raise UsageError(f"{path} is not a clipcap resume state")
    saved = TrainOptions.from_dict(state["options"])
    conflicts = resume_conflicts(saved, opts)
    if conflicts:
        used = ", ".join(f"{k}={saved.flat()[k]!r}" for k in conflicts)
        raise UsageError(f"cannot resume {path.parent} with a different {', '.join(conflicts)}: the run used {used}")
    if state["world_size"] != world_size:
        raise UsageError(
            f"{path.parent} was trained by {state['world_size']} process(es): resume it with the same number"
            f" (got {world_size}), or the data order and schedule would change"
        )
    if state["data_key"] != data_key:
        raise UsageError(f"the captions of {data_path} changed since this run started: cannot resume it")
    saved_sha = state.get("embeddings_sha256")  # states saved before 0.3 have none
    if saved_sha and embeddings_sha256 and saved_sha != embeddings_sha256:
        raise UsageError(
            f"the CLIP embeddings of {data_path} changed since this run started (sha256 {saved_sha[:12]}... then, "
            f"{embeddings_sha256[:12]}... now; re-extracted?): resume with the store it started with, "
            "or start a new run"
        )
    if lora.settings_of(model):  # the mapper and the adapters; the base LM comes from --gpt2
        lora.load_trainable_state(model, state["model"])
    elif model.config.only_prefix:  # the state holds the mapper alone; GPT-2 comes from --gpt2
        model.clip_project.load_state_dict({k.removeprefix("clip_project."): v for k, v in state["model"].items()})
    else:
        model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank])
    window = state.get("log_window") or {"losses": [], "seconds": 0.0}  # states saved before 0.3 have none
    return Position(
        state["step"],
        state["epoch"],
        state["batch"],
        state["loss_ema"],
        state["val_loss"],
        state["elapsed"],
        {"losses": list(window["losses"]), "seconds": float(window["seconds"])},
        # states saved before the monitor existed have none of its fields: the defaults
        best_val_loss=state.get("best_val_loss"),
        best_epoch=int(state.get("best_epoch", 0)),
        stale_epochs=int(state.get("stale_epochs", 0)),
        epoch_losses=[float(x) for x in state.get("epoch_losses", [])],
        epoch_loss_sum=float(state.get("epoch_loss_sum", 0.0)),
        epoch_loss_steps=int(state.get("epoch_loss_steps", 0)),
    )


def trainable_state(model: ClipCaptionModel) -> dict[str, torch.Tensor]:
    """The weights a resume needs: the mapper only when GPT-2 is frozen (it comes from --gpt2), the mapper
    and the adapters with LoRA."""
    if lora.settings_of(model):
        return lora.trainable_state(model)
    state = model.state_dict()
    if model.config.only_prefix:
        state = {k: v for k, v in state.items() if k.startswith("clip_project.")}
    return {k: v.detach().cpu() for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """Every RNG stream training draws from (dropout: torch; DataLoader workers: python, numpy)."""
    import numpy as np

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights-only loading refuses: keep it as a tensor
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), *rest))
