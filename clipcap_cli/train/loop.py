"""Training a ClipCap model on a features store: the options, the caption data, and a resumable
loop that runs in one process or under ``torchrun`` (DistributedDataParallel).

The recipe is the original train.py's (AdamW without weight decay, linear warm-up then linear
decay, one sample per caption, no BOS/EOS), minus its waste: batches are padded to their own
longest caption, padding leaves the loss through a mask, and a frozen GPT-2 gets no gradients.
Nothing here prints: progress goes to a ``TrainCallback``; ``commands/train.py`` draws it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

from clipcap_cli import backbones
from clipcap_cli.config import DEFAULT_CLIP_MODEL, MAPPINGS, ModelConfig
from clipcap_cli.distributed import Distributed
from clipcap_cli.fsutil import atomic_write
from clipcap_cli.errors import ClipCapError, UsageError
from clipcap_cli.version import __version__

if TYPE_CHECKING:  # torch is imported on first use: `clipcap --help` reads TrainOptions without it
    import torch
    from torch import nn

    from clipcap_cli.features import FeatureSet
    from clipcap_cli.model import ClipCaptionModel

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUME_FILE = "resume.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATE_FORMAT = "clipcap-train-state"
TOKENS_FORMAT = "clipcap-tokens"
TOKENIZE_RULE = "encode, no special tokens"  # part of the cache key: change it and old caches are rebuilt
ADAM_BETAS = (0.9, 0.999)  # transformers' old AdamW defaults, which the original used
ADAM_EPS = 1e-6
LOSS_EMA = 0.95  # smoothing of the loss shown while training
DEBUG_DDP_ENV = "CLIPCAP_DEBUG_DDP_DIR"  # test hook: each rank dumps its sample ids and a weight hash here


class TrainingInterrupted(ClipCapError):
    """Ctrl-C / SIGTERM: the resume state was saved and the run can be continued."""

    exit_code = 130

    def __init__(self, message: str, out_dir: Path, step: int):
        super().__init__(message)
        self.out_dir = out_dir
        self.step = step


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides a training run. Defaults are the original train.py's."""

    # model
    mapping: str = "mlp"  # "mlp" or "transformer"
    only_prefix: bool = False  # freeze GPT-2 and train the mapper only
    prefix_length: int = 10  # K: GPT-2 input embeddings per image
    clip_length: int = 10  # transformer mapper only
    num_layers: int = 8  # transformer mapper only
    normalize_prefix: bool = False  # L2-normalise CLIP embeddings before the mapper
    gpt2: str = "gpt2"  # language model (and tokenizer): hub name or local folder
    # optimisation
    epochs: int = 10
    batch_size: int = 40  # per process and per micro-batch; global = batch_size * grad_accum * processes
    lr: float = 2e-5  # peak learning rate
    warmup: int = 5000  # optimizer steps of linear warm-up, then linear decay to 0 at the last step
    weight_decay: float = 0.0  # AdamW decoupled weight decay (the original: none)
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # mapper init, data order, dropout, validation split
    # data
    val_fraction: float = 0.0  # share of the images (with all their captions) held out for validation
    val_data: str | None = None  # a separate features store for validation (instead of val_fraction)
    max_tokens: int | None = None  # longest caption in tokens; None = GPT-2's window minus the prefix
    num_workers: int = 0  # DataLoader worker processes (batches are cheap to build: 0 is usually best)
    # run
    save_every: int = 1  # write epoch-NNN.safetensors every this many epochs (and after the last)
    checkpoint_every: int = 1000  # write the resume state every this many optimizer steps (and each epoch)
    log_every: int = 10  # one metrics.jsonl line every this many optimizer steps
    device: str | None = None  # None = best available; under torchrun each process uses cuda:LOCAL_RANK
    precision: str = "auto"  # auto = bf16 autocast on CUDA (fp16 + loss scaling without bf16), fp32 elsewhere

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise UsageError(f"unknown mapping {self.mapping!r}: choose one of {', '.join(MAPPINGS)}")
        for name in ("prefix_length", "clip_length", "num_layers", "epochs", "batch_size", "grad_accum",
                     "save_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"lr must be positive, got {self.lr}")
        if self.warmup < 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise UsageError("warmup, weight-decay and num-workers cannot be negative")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction > 0 and self.val_data:
            raise UsageError("give either --val-fraction or --val-data, not both")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"max-tokens must be at least 1, got {self.max_tokens}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def replace(self, **changes: Any) -> TrainOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Options that may change when a run is resumed: they do not touch the trajectory of the weights.
RESUMABLE_CHANGES = frozenset({"device", "num_workers", "save_every", "checkpoint_every", "log_every", "precision"})


def model_config(opts: TrainOptions, meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a run: the mapper from ``opts``, the CLIP side from the features' meta."""
    gpt2 = opts.gpt2
    if backbones.is_local(gpt2):  # checkpoints must find a local LM from any working directory
        gpt2 = str(Path(gpt2).expanduser().resolve())
    return ModelConfig(
        mapping=opts.mapping,
        prefix_length=opts.prefix_length,
        clip_length=opts.clip_length,
        num_layers=opts.num_layers,
        prefix_size=int(meta["embed_dim"]),
        normalize_prefix=opts.normalize_prefix,
        only_prefix=opts.only_prefix,
        clip_model=str(meta.get("clip_model") or DEFAULT_CLIP_MODEL),
        clip_pretrained=meta.get("clip_pretrained"),
        gpt2=gpt2,
    )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The original's schedule (get_linear_schedule_with_warmup) at optimizer step ``step`` (0-based).

    Rises linearly from 0 over ``warmup`` steps, then falls linearly to 0 at ``total``. Step 0
    therefore runs at lr 0 when there is a warm-up, exactly as in the original.
    """
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


# --------------------------------------------------------------------------- caption data


@dataclass
class TokenizedCaptions:
    """All captions of a features store as GPT-2 tokens, back to back (``tokens.safetensors``)."""

    tokens: torch.Tensor  # (total_tokens,) int32
    offsets: torch.Tensor  # (N_captions + 1,) int64: caption c is tokens[offsets[c] : offsets[c + 1]]
    image_rows: torch.Tensor  # (N_captions,) int64: the embeddings row of caption c
    key: str  # hash of the tokenizer and the captions this was made from
    path: Path | None = None  # where it is cached

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole vocabulary, merges and normaliser: any change shows up
        body = backend.to_str()
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{TOKENIZE_RULE}\n{body}".encode()).hexdigest()


def captions_key(records: Sequence[dict], tokenizer: Any) -> str:
    """The cache key of a store's tokens: the tokenizer's identity and every caption, in order."""
    h = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode())
    for row, record in enumerate(records):
        h.update(f"\x1e{row}".encode())
        for caption in record["captions"]:
            h.update(b"\x1f" + str(caption).encode("utf-8"))
    return h.hexdigest()


def tokenize_captions(
    fs: FeatureSet, tokenizer: Any, callback: TrainCallback | None = None, chunk: int = 8192
) -> TokenizedCaptions:
    """Tokenise every caption of ``fs`` once, cached as ``tokens.safetensors`` next to the features.

    A cache whose key (tokenizer + captions) differs is rebuilt, never reused. Like the original:
    ``tokenizer.encode(caption)``, no BOS/EOS, no leading space. Where the store's folder is
    read-only the cache goes under clipcap's data directory instead.
    """
    import torch

    key = captions_key(fs.records, tokenizer)
    for path in _token_cache_paths(fs.path, key):
        cached = _read_token_cache(path, key)
        if cached is not None:
            return cached

    captions: list[str] = []
    rows: list[int] = []
    for row, record in enumerate(fs.records):
        for caption in record["captions"]:
            captions.append(str(caption))
            rows.append(row)
    flat: list[int] = []
    offsets = [0]
    for start in range(0, len(captions), chunk):
        ids = tokenizer(captions[start : start + chunk], add_special_tokens=False)["input_ids"]
        for seq in ids:
            flat.extend(seq)
            offsets.append(len(flat))
        if callback is not None:
            callback.on_tokenize(min(start + chunk, len(captions)), len(captions))
    result = TokenizedCaptions(
        tokens=torch.tensor(flat, dtype=torch.int32),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        image_rows=torch.tensor(rows, dtype=torch.int64),
        key=key,
    )
    for path in _token_cache_paths(fs.path, key):
        try:
            _write_token_cache(path, result)
            result.path = path
            break
        except OSError:
            continue  # read-only store: try the next place
    return result


def _token_cache_paths(store: Path, key: str) -> list[Path]:
    from clipcap_cli import paths
    from clipcap_cli.features import TOKENS_FILE

    return [store / TOKENS_FILE, paths.home() / "tokens" / f"{key[:32]}.safetensors"]


def _read_token_cache(path: Path, key: str) -> TokenizedCaptions | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != TOKENS_FORMAT or meta.get("key") != key:
            return None  # stale (other captions or tokenizer): rebuilt by the caller
        t = load_file(str(path))
        return TokenizedCaptions(t["tokens"], t["offsets"], t["image_rows"], key, path)
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def _write_token_cache(path: Path, tc: TokenizedCaptions) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": TOKENS_FORMAT, "key": tc.key, "clipcap_version": __version__}
    tensors = {"tokens": tc.tokens, "offsets": tc.offsets, "image_rows": tc.image_rows}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


class Batch(NamedTuple):
    tokens: torch.Tensor  # (B, T) int64, right-padded with 0 to the batch's longest caption
    mask: torch.Tensor  # (B, T) bool, True on real tokens
    prefix: torch.Tensor  # (B, D) float32 CLIP embeddings
    index: torch.Tensor  # (B,) int64 caption ids (which samples these are)

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=nb) for t in self))


class CaptionDataset:
    """One sample per caption (as the original); its prefix is the CLIP row of its image.

    Items are caption ids; ``collate`` builds the whole batch at once, padded to the longest
    caption *in the batch* (the original padded every batch to a dataset-wide maximum).
    """

    def __init__(self, embeddings: torch.Tensor, captions: TokenizedCaptions, ids: torch.Tensor, max_tokens: int):
        self.embeddings = embeddings
        self.tokens = captions.tokens
        self.offsets = captions.offsets
        self.image_rows = captions.image_rows
        self.ids = ids  # (N,) caption ids in this split
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        return int(self.ids[i])

    def subset(self, ids: torch.Tensor) -> CaptionDataset:
        """The same captions and embeddings, restricted to caption ``ids``."""
        out = CaptionDataset.__new__(CaptionDataset)
        out.__dict__.update(self.__dict__, ids=ids)
        return out

    def collate(self, ids: Sequence[int]) -> Batch:
        import torch

        caps = torch.as_tensor(ids, dtype=torch.int64)  # (B,)
        starts = self.offsets[caps]
        lengths = (self.offsets[caps + 1] - starts).clamp(max=self.max_tokens)  # truncation
        pos = torch.arange(int(lengths.max()))  # (T,)
        mask = pos < lengths[:, None]  # (B, T)
        where = (starts[:, None] + pos).clamp(max=max(len(self.tokens) - 1, 0))  # (B, T)
        tokens = self.tokens[where].long().masked_fill(~mask, 0)
        prefix = self.embeddings[self.image_rows[caps]].float()  # (B, D)
        return Batch(tokens, mask, prefix, caps)


def split_ids(captions: TokenizedCaptions, n_images: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) caption ids. Captions without tokens are dropped. The split is by image, so
    no image has captions on both sides."""
    import torch

    keep = captions.lengths > 0
    val_image = torch.zeros(n_images, dtype=torch.bool)
    if val_fraction > 0:
        n_val = max(1, round(n_images * val_fraction))
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
        val_image[order[:n_val]] = True
    is_val = val_image[captions.image_rows]
    ids = torch.arange(len(captions.lengths))
    return ids[keep & ~is_val], ids[keep & is_val]


# --------------------------------------------------------------------------- the loss


def loss_module(model: ClipCaptionModel) -> nn.Module:
    """The module DDP wraps: ``(tokens, mask, prefix) -> mean caption loss`` of a batch.

    Same value as ``caption_loss(model(tokens, prefix), tokens, mask, K)``, but GPT-2's LM head
    (E x 50257, the biggest matmul) runs only on the T+1 positions from K-1 on, not on the K-1
    prefix positions whose predictions are never scored.
    """
    return _loss_class()(model)


@functools.cache
def _loss_class() -> type:
    import torch
    from torch import nn

    from clipcap_cli.model import caption_loss

    class CaptionLoss(nn.Module):
        def __init__(self, model: ClipCaptionModel):
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            m = self.model
            k = m.prefix_length
            embeds = torch.cat((m.embed_prefix(prefix), m.embed_tokens(tokens)), dim=1)  # (B, K+T, E)
            # No attention mask: padding is on the right and GPT-2 is causal, so no real token sees
            # it, and SDPA keeps its fast causal kernel.
            hidden = m.gpt.transformer(inputs_embeds=embeds, use_cache=False).last_hidden_state  # (B, K+T, E)
            logits = m.gpt.lm_head(hidden[:, k - 1 :])  # (B, T+1, V): position K-1+i predicts token i
            # The prefix is already cut to its last position, so caption_loss's [K-1 : -1] is [0 : -1].
            return caption_loss(logits, tokens, mask, prefix_length=1)

    return CaptionLoss


# --------------------------------------------------------------------------- progress reporting


@dataclass
class StartInfo:
    out_dir: Path
    total_steps: int
    steps_per_epoch: int
    start_step: int  # > 0 when resumed
    epochs: int
    train_samples: int  # captions (per epoch, all processes)
    val_samples: int
    world_size: int
    global_batch: int  # samples per optimizer step, all processes
    device: str
    precision: str
    trainable_params: int
    truncated: int  # captions cut to max_tokens
    max_tokens: int


@dataclass
class StepInfo:
    step: int  # optimizer steps done (1-based after the first step)
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    loss: float  # this step's loss (mean over processes)
    loss_ema: float  # smoothed, for display
    lr: float  # the lr this step used
    samples_per_s: float
    elapsed: float  # seconds of training so far (across resumes)


class TrainCallback:
    """Hooks the loop calls on the main process (rank 0). Override what you need."""

    def on_tokenize(self, done: int, total: int) -> None: ...
    def on_start(self, info: StartInfo) -> None: ...
    def on_step(self, info: StepInfo) -> None: ...
    def on_validation(self, epoch: int, step: int, loss: float) -> None: ...
    def on_checkpoint(self, path: Path, kind: str) -> None: ...  # kind: "epoch" | "resume"
    def on_warning(self, message: str) -> None: ...


@dataclass
class TrainResult:
    out_dir: Path
    checkpoints: list[Path]  # epoch checkpoints written by this call
    step: int
    train_loss: float | None  # smoothed loss at the end
    val_loss: float | None  # last validation loss


# --------------------------------------------------------------------------- processes


class _StopFlag:
    """Set by SIGINT/SIGTERM while the loop runs; the loop saves and stops after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once (the last saved resume state then stands).
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return

        def handle(signum: int, frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum

        saved = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in saved.items():
                signal.signal(s, h)


# --------------------------------------------------------------------------- the run


def read_run(out_dir: str | Path) -> tuple[TrainOptions, Path]:
    """The options and features path a run folder was started with (for ``--resume``)."""
    out_dir = Path(out_dir)
    cfg = out_dir / CONFIG_FILE
    if not (out_dir / RESUME_FILE).is_file() or not cfg.is_file():
        raise UsageError(f"nothing to resume in {out_dir}: no {RESUME_FILE} (start a new run without --resume)")
    saved = json.loads(cfg.read_text(encoding="utf-8"))
    return TrainOptions.from_dict(saved["train_options"]), Path(saved["data"])


def resume_conflicts(saved: TrainOptions, new: TrainOptions) -> list[str]:
    """Options that differ between a run and its resumption and would change its trajectory."""
    return [
        f.name
        for f in dataclasses.fields(TrainOptions)
        if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(new, f.name)
    ]


def _mixed_precision(device: torch.device, precision: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    import torch

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
    return torch.bfloat16, False


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights-only loading refuses: keep it as a tensor
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), *rest))


def _trainable_state(model: ClipCaptionModel) -> dict[str, torch.Tensor]:
    """The weights a resume needs: the mapper only when GPT-2 is frozen (it comes from --gpt2)."""
    state = model.state_dict()
    if model.config.only_prefix:
        state = {k: v for k, v in state.items() if k.startswith("clip_project.")}
    return {k: v.detach().cpu() for k, v in state.items()}


def _weights_hash(model: ClipCaptionModel) -> str:
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_store(path: str | Path) -> FeatureSet:
    from clipcap_cli.features import load_features

    return load_features(path)


def train(
    opts: TrainOptions,
    data: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callback: TrainCallback | None = None,
) -> TrainResult:
    """Train a ClipCap model on the features store ``data``, writing the run to ``out_dir``.

    ``out_dir`` receives ``config.json``, ``metrics.jsonl``, ``epoch-NNN.safetensors`` checkpoints
    (loadable with no other flags) and ``resume.pt``. With ``resume=True`` the run continues from
    ``resume.pt`` with the same schedule and data order. Under torchrun every process calls this;
    only rank 0 writes files and calls ``callback``.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM, after saving the resume state.
    """
    dist = Distributed.setup(opts.device)
    try:
        run = _Run(opts, Path(data), Path(out_dir), resume, dist, callback or TrainCallback())
        return run.fit()
    finally:
        dist.close()


class _Run:
    """One training run's state (model, optimizer, position) and the steps of the loop."""

    def __init__(self, opts: TrainOptions, data: Path, out: Path, resume: bool, dist: Distributed, cb: TrainCallback):
        import torch

        from clipcap_cli.model import ClipCaptionModel

        self.opts, self.out, self.dist = opts, out, dist
        self.cb = cb if dist.main else TrainCallback()
        self.device = dist.device
        self._check_out_dir(resume)
        torch.manual_seed(opts.seed)
        random.seed(opts.seed)

        # ---- data
        fs = _load_store(data)
        self.data_path = fs.path.resolve()
        if not fs.records:
            raise UsageError(f"{fs.path} holds no images")
        self.config = model_config(opts, fs.meta)
        tokenizer = backbones.load_tokenizer(opts.gpt2)
        # Rank 0 tokenises (and writes the cache) while the others wait, then they read the cache.
        caps = tokenize_captions(fs, tokenizer, self.cb) if dist.main else None
        dist.barrier()
        if caps is None:
            caps = tokenize_captions(fs, tokenizer)
        gpt = backbones.load_gpt2(opts.gpt2)
        window = int(gpt.config.n_positions) - opts.prefix_length
        self.max_tokens = opts.max_tokens or window
        if self.max_tokens > window:
            raise UsageError(f"max-tokens {self.max_tokens} does not fit GPT-2's window ({gpt.config.n_positions} - K={opts.prefix_length})")
        if len(caps.tokens) and int(caps.tokens.max()) >= gpt.config.vocab_size:
            raise UsageError(f"the tokenizer of {opts.gpt2} makes ids beyond the LM's vocabulary ({gpt.config.vocab_size})")
        train_ids, val_ids = split_ids(caps, len(fs.records), opts.val_fraction, opts.seed)
        self.truncated = int((caps.lengths[torch.cat([train_ids, val_ids])] > self.max_tokens).sum())
        if opts.val_data:
            vfs = _load_store(opts.val_data)
            if int(vfs.meta["embed_dim"]) != self.config.prefix_size or vfs.meta.get("clip_model") != fs.meta.get("clip_model"):
                raise UsageError(f"--val-data {vfs.path} was extracted with another CLIP than {fs.path}")
            vcaps = tokenize_captions(vfs, tokenizer) if dist.main else None
            dist.barrier()
            if vcaps is None:
                vcaps = tokenize_captions(vfs, tokenizer)
            val_ids = torch.nonzero(vcaps.lengths > 0).flatten()
            self.truncated += int((vcaps.lengths[val_ids] > self.max_tokens).sum())
            self.val_set = CaptionDataset(vfs.embeddings, vcaps, val_ids, self.max_tokens)
        else:
            self.val_set = CaptionDataset(fs.embeddings, caps, val_ids, self.max_tokens)
        self.train_set = CaptionDataset(fs.embeddings, caps, train_ids, self.max_tokens)
        self.data_key = caps.key

        # DistributedSampler for one process too: the same seeded order (seed + epoch) either way.
        self.sampler = torch.utils.data.DistributedSampler(
            self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=opts.seed, drop_last=True
        )
        # Like the original's drop_last: an incomplete last batch (and, with --grad-accum, an
        # incomplete last group of micro-batches) is left out of the epoch.
        self.steps_per_epoch = len(self.sampler) // opts.batch_size // opts.grad_accum
        if self.steps_per_epoch < 1:
            raise UsageError(
                f"{len(train_ids)} training captions are too few for one step of {opts.batch_size} x {opts.grad_accum}"
                f" x {dist.world_size} process(es): lower --batch-size or --grad-accum"
            )
        self.total_steps = opts.epochs * self.steps_per_epoch

        # ---- model
        torch.manual_seed(opts.seed)  # the mapper's initial weights: the same on every rank
        self.model = ClipCaptionModel(self.config, gpt).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_module = loss_module(self.model)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Frozen GPT-2 parameters have requires_grad False, so DDP neither waits for nor syncs
            # them; every trainable parameter is used each step, so no unused-parameter search.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_module = DistributedDataParallel(self.loss_module, device_ids=ids, find_unused_parameters=False)
        # One fused kernel per step instead of ~10 elementwise passes per tensor: 8x faster on CPU.
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opts.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=opts.weight_decay, fused=fused
        )
        self.amp_dtype, use_scaler = _mixed_precision(self.device, opts.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # ---- position
        self.step, self.epoch, self.batch = 0, 0, 0  # next: epoch `epoch`, its batch `batch`
        self.loss_ema: float | None = None
        self.val_loss: float | None = None
        self.elapsed = 0.0
        if resume:
            self._load_resume_state()
        else:
            # Dropout differs across ranks (they see different data); the order stays seeded.
            torch.manual_seed(opts.seed + dist.rank)
        self.debug_dir = os.environ.get(DEBUG_DDP_ENV)
        self.seen: list[int] = []

    # ------------------------------------------------------------------ files

    def _check_out_dir(self, resume: bool) -> None:
        if resume:
            if not (self.out / RESUME_FILE).is_file():
                raise UsageError(f"nothing to resume in {self.out}: no {RESUME_FILE}")
            return
        if (self.out / RESUME_FILE).exists() or any(self.out.glob("epoch-*.safetensors")):
            raise UsageError(f"{self.out} already holds a training run: add --resume to continue it, or choose another --out")

    def _write_config(self) -> None:
        info = {
            "train_options": self.opts.to_dict(),
            "model_config": self.config.to_dict(),
            "data": str(self.data_path),
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "clipcap_version": __version__,
        }
        text = json.dumps(info, indent=2) + "\n"
        atomic_write(self.out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _open_metrics(self) -> Any:
        path = self.out / METRICS_FILE
        if self.step and path.is_file():
            # Lines past the resumed step were written after the resume point: drop them so the
            # file describes one continuous run.
            keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in keep), encoding="utf-8"))
        elif not self.step:
            path.unlink(missing_ok=True)
        return open(path, "a", encoding="utf-8")

    def _log(self, metrics: Any, record: dict[str, Any]) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def _save_resume_state(self) -> None:
        import torch

        rngs = self.dist.all_gather(_rng_state())  # every rank's own dropout stream
        if self.dist.main:
            state = {
                "format": STATE_FORMAT,
                "format_version": 1,
                "clipcap_version": __version__,
                "options": self.opts.to_dict(),
                "data_key": self.data_key,
                "world_size": self.dist.world_size,
                "step": self.step,
                "epoch": self.epoch,
                "batch": self.batch,
                "loss_ema": self.loss_ema,
                "val_loss": self.val_loss,
                "elapsed": self.elapsed,
                "model": _trainable_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
            }
            atomic_write(self.out / RESUME_FILE, lambda tmp: torch.save(state, tmp))
            self.cb.on_checkpoint(self.out / RESUME_FILE, "resume")
        self.dist.barrier()

    def _load_resume_state(self) -> None:
        import torch

        path = self.out / RESUME_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        if state.get("format") != STATE_FORMAT:
            raise UsageError(f"{path} is not a clipcap resume state")
        saved = TrainOptions.from_dict(state["options"])
        conflicts = resume_conflicts(saved, self.opts)
        if conflicts:
            used = ", ".join(f"{k}={getattr(saved, k)!r}" for k in conflicts)
            raise UsageError(f"cannot resume {self.out} with a different {', '.join(conflicts)}: the run used {used}")
        if state["world_size"] != self.dist.world_size:
            raise UsageError(
                f"{self.out} was trained by {state['world_size']} process(es): resume it with the same number"
                f" (got {self.dist.world_size}), or the data order and schedule would change"
            )
        if state["data_key"] != self.data_key:
            raise UsageError(f"the captions of {self.data_path} changed since this run started: cannot resume it")
        target = self.model.clip_project if self.config.only_prefix else self.model
        model_state = state["model"]
        if self.config.only_prefix:
            model_state = {k[len("clip_project."):]: v for k, v in model_state.items()}
        target.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.loss_ema, self.val_loss, self.elapsed = state["loss_ema"], state["val_loss"], state["elapsed"]
        _set_rng_state(state["rng"][self.dist.rank])

    def _save_epoch_checkpoint(self, epoch: int) -> Path:
        from clipcap_cli import checkpoint

        path = self.out / f"epoch-{epoch:03d}.safetensors"
        if self.dist.main:
            extra = {"epoch": str(epoch), "step": str(self.step), "train_options": json.dumps(self.opts.to_dict())}
            checkpoint.save(self.model, path, extra_metadata=extra)
            self.cb.on_checkpoint(path, "epoch")
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ loop

    def _loader(self, dataset: CaptionDataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        import torch

        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=dataset.collate,
            num_workers=self.opts.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator, so creating a loader never draws from the global (dropout) RNG.
            generator=torch.Generator().manual_seed(self.opts.seed),
        )

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        b = self.opts.batch_size
        n = self.steps_per_epoch * self.opts.grad_accum
        return [order[i * b : (i + 1) * b] for i in range(n)]

    def _autocast(self) -> Any:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, batches: Iterator[Batch]) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (on device)."""
        import torch

        accum = self.opts.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = next(batches).to(self.device)
            if self.debug_dir:
                self.seen.extend(batch.index.tolist())
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = contextlib.nullcontext() if micro == accum - 1 or not self.dist.enabled else self.loss_module.no_sync()
            with sync:
                with self._autocast():
                    loss = self.loss_module(batch.tokens, batch.mask, batch.prefix) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        lr = self.opts.lr * lr_factor(self.step, self.opts.warmup, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def validate(self) -> float | None:
        """Token-weighted mean loss over the validation captions (sharded across processes)."""
        import torch

        if len(self.val_set) == 0:
            return None
        shard = self.val_set.subset(self.val_set.ids[self.dist.rank :: self.dist.world_size])
        b = self.opts.batch_size
        loader = self._loader(shard, [list(range(i, min(i + b, len(shard)))) for i in range(0, len(shard), b)])
        plain = loss_module(self.model)  # no DDP wrapper: there are no gradients to sync
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of token losses, tokens)
        try:
            with torch.no_grad():
                for batch in loader:
                    batch = batch.to(self.device)
                    with self._autocast():
                        loss = plain(batch.tokens, batch.mask, batch.prefix)
                    n = batch.mask.sum()
                    sums += torch.stack([loss.double() * n, n.double()])
        finally:
            self.model.train()
        self.dist.all_reduce_sum(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else None

    def fit(self) -> TrainResult:
        import torch

        opts, dist = self.opts, self.dist
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config()
        dist.barrier()
        if self.truncated:
            self.cb.on_warning(f"{self.truncated} caption(s) longer than {self.max_tokens} tokens were truncated")
        global_batch = opts.batch_size * opts.grad_accum * dist.world_size
        self.cb.on_start(StartInfo(
            out_dir=self.out, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, start_step=self.step,
            epochs=opts.epochs, train_samples=len(self.train_set), val_samples=len(self.val_set),
            world_size=dist.world_size, global_batch=global_batch, device=str(self.device),
            precision=str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
            trainable_params=sum(p.numel() for p in self.params), truncated=self.truncated, max_tokens=self.max_tokens,
        ))
        metrics = self._open_metrics() if dist.main else None
        checkpoints: list[Path] = []
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        self.model.train()
        stop = _StopFlag()
        try:
            with stop.installed():
                while self.epoch < opts.epochs:
                    batches = self._epoch_batches(self.epoch)[self.batch :]
                    it = iter(self._loader(self.train_set, batches))
                    while self.batch < self.steps_per_epoch * opts.grad_accum:
                        t0 = time.perf_counter()
                        loss = self._train_step(it)
                        lr = self.opts.lr * lr_factor(self.step, opts.warmup, self.total_steps)
                        self.step += 1
                        self.batch += opts.grad_accum
                        # One small all-reduce: the mean loss, and whether any rank was asked to stop
                        # (all ranks must stop after the same step, or the next collective hangs).
                        shared = dist.all_reduce_sum(torch.stack([loss, torch.tensor(float(stop.signal is not None), device=self.device)]))
                        loss_value = float(shared[0]) / dist.world_size
                        dt = time.perf_counter() - t0
                        self.elapsed += dt
                        self.loss_ema = loss_value if self.loss_ema is None else LOSS_EMA * self.loss_ema + (1 - LOSS_EMA) * loss_value
                        info = StepInfo(self.step, self.total_steps, self.epoch + 1, opts.epochs, loss_value,
                                        self.loss_ema, lr, global_batch / max(dt, 1e-9), self.elapsed)
                        self.cb.on_step(info)
                        window_loss, window_steps, window_time = window_loss + loss_value, window_steps + 1, window_time + dt
                        if metrics and (self.step % opts.log_every == 0 or self.batch == self.steps_per_epoch * opts.grad_accum):
                            self._log(metrics, {
                                "type": "train", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                                "loss": window_loss / window_steps, "loss_ema": self.loss_ema, "lr": lr,
                                "samples_per_s": global_batch * window_steps / max(window_time, 1e-9), "time": time.time(),
                            })
                            window_loss, window_steps, window_time = 0.0, 0, 0.0
                        if float(shared[1]) > 0:
                            self._save_resume_state()
                            raise TrainingInterrupted(
                                f"interrupted at step {self.step}/{self.total_steps}; the run was saved to {self.out / RESUME_FILE}",
                                self.out, self.step,
                            )
                        if self.step % opts.checkpoint_every == 0:
                            self._save_resume_state()
                    # ---- end of epoch
                    self.epoch += 1
                    self.batch = 0
                    self.val_loss = self.validate()
                    if self.val_loss is not None:
                        self.cb.on_validation(self.epoch, self.step, self.val_loss)
                        if metrics:
                            self._log(metrics, {"type": "val", "step": self.step, "epoch": self.epoch,
                                                "val_loss": self.val_loss, "time": time.time()})
                    if self.epoch % opts.save_every == 0 or self.epoch == opts.epochs:
                        checkpoints.append(self._save_epoch_checkpoint(self.epoch))
                    self._save_resume_state()
        finally:
            if metrics:
                metrics.close()
            if self.debug_dir:
                self._write_debug()
        return TrainResult(self.out, checkpoints, self.step, self.loss_ema, self.val_loss)

    def _write_debug(self) -> None:
        folder = Path(self.debug_dir)  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        info = {"rank": self.dist.rank, "world_size": self.dist.world_size, "step": self.step,
                "indices": self.seen, "weights_sha256": _weights_hash(self.model)}
        (folder / f"rank{self.dist.rank}.json").write_text(json.dumps(info))
