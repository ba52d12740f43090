"""What decides a training run: ``TrainOptions``, with the model to train as a ``ModelConfig``.

Imports nothing heavy: ``clipcap train --help`` reads its defaults from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipcap_cli.config import DEFAULT_CLIP_MODEL, ModelConfig
from clipcap_cli.decoding.precision import TRAIN_PRECISIONS
from clipcap_cli.errors import UsageError, check_number
from clipcap_cli.train.noise import check_variance
from clipcap_cli.weights import backbones

# The ModelConfig fields a run chooses; the others (prefix_size, clip_model, clip_pretrained) are
# the features store's. gpt2 is the LM (ModelConfig.lm, under its first name); stop_token "eos" appends
# the tokenizer's end of text to every caption.
MODEL_FIELDS = (
    "mapping",
    "only_prefix",
    "prefix_length",
    "clip_length",
    "num_layers",
    "normalize_prefix",
    "gpt2",
    "stop_token",
)
# Options that may change when a run is resumed: they do not touch the trajectory of the weights.
RESUMABLE_CHANGES = frozenset(
    {"device", "num_workers", "save_every", "checkpoint_every", "log_every", "precision", "samples", "early_stop"}
)
# val_fraction None (the default): AUTO_VAL_FRACTION of the images, at least 1, when the store has at least
# AUTO_VAL_MIN_IMAGES images and there is no --val-data; else no held-out split.
AUTO_VAL_FRACTION = 0.05
AUTO_VAL_MIN_IMAGES = 20


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides a training run. Defaults are the original train.py's.

    ``replace`` and ``create`` also take the ModelConfig fields of ``MODEL_FIELDS`` by name
    (``TrainOptions.create(mapping="transformer", epochs=5)``), as the command line gives them.
    """

    # model: mapper and LM (MODEL_FIELDS); the CLIP side comes from the features store
    model: ModelConfig = ModelConfig()
    # optimisation
    epochs: int = 10
    batch_size: int = 40  # per process and per micro-batch; global = batch_size * grad_accum * processes
    lr: float = 2e-5  # peak learning rate
    warmup: int | None = None  # linear warm-up steps, then linear decay to 0; None = 5000, or a tenth of a shorter run
    weight_decay: float = 0.0  # AdamW decoupled weight decay (the original: none)
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # mapper init, data order, dropout, validation split, sample images
    # data
    val_fraction: float | None = None  # share of the images (with their captions) held out; None = auto (below)
    val_data: str | None = None  # a separate features store for validation (instead of val_fraction)
    max_tokens: int | None = None  # longest caption in tokens; None = GPT-2's window minus the prefix
    num_workers: int = 0  # DataLoader worker processes (batches are cheap to build: 0 is usually best)
    buffer_shards: int = 4  # shards of a sharded store shuffled together (and held in memory) at once
    # run
    save_every: int = 1  # write epoch-NNN.safetensors every this many epochs (and after the last)
    checkpoint_every: int = 1000  # write the resume state every this many optimizer steps (and each epoch)
    log_every: int = 10  # one metrics.jsonl line every this many optimizer steps
    device: str | None = None  # None = best available; under torchrun each process uses cuda:LOCAL_RANK
    precision: str = "auto"  # auto = bf16 autocast on CUDA (fp16 + loss scaling without bf16), fp32 elsewhere
    # CapDec: Gaussian noise of this variance on the normalised prefix, in training only. None = auto:
    # 0.016 (CapDec) on a text store (`clipcap extract --text`), 0 on image features.
    noise_variance: float | None = None
    # LoRA (lora.py): low-rank adapters on the LM, its own weights frozen; 0 = off (the LM trains whole,
    # or not at all with only_prefix)
    lora: int = 0  # the adapters' rank
    lora_alpha: float | None = None  # scale alpha / rank; None = the rank (a scale of 1, as peft's defaults)
    lora_dropout: float = 0.0  # dropout on the adapters' input (peft's default)
    lora_targets: tuple[str, ...] | None = None  # LM module names; None = the family's (lora.DEFAULT_TARGETS)
    # watching the run (monitor.py)
    samples: int = 8  # held-out images captioned (greedy) at each epoch end; 0 = none
    early_stop: int = 0  # stop when the held-out loss has not improved for this many epochs; 0 = never

    def __post_init__(self) -> None:
        for name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "save_every",
            "checkpoint_every",
            "log_every",
            "buffer_shards",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("weight-decay", self.weight_decay, low=0)
        if self.val_fraction is not None:
            check_number("val-fraction", self.val_fraction, low=0, high=1, high_open=True)
        if (self.warmup is not None and self.warmup < 0) or self.num_workers < 0:
            raise UsageError("warmup and num-workers cannot be negative")
        if self.samples < 0 or self.early_stop < 0:
            raise UsageError("samples and early-stop cannot be negative")
        if self.val_fraction and self.val_data:
            raise UsageError("give either --val-fraction or --val-data, not both")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"max-tokens must be at least 1, got {self.max_tokens}")
        check_variance(self.noise_variance)
        self._check_lora()
        if self.precision not in TRAIN_PRECISIONS:  # int8 and fast are for captioning
            raise UsageError(f"unknown precision {self.precision!r}: choose one of {', '.join(TRAIN_PRECISIONS)}")

    def _check_lora(self) -> None:
        if self.lora_targets is not None:  # a list from JSON or the command line: one spelling, for resume checks
            targets = tuple(t.strip() for t in self.lora_targets if t.strip())
            object.__setattr__(self, "lora_targets", targets or None)
        if self.lora < 0:
            raise UsageError(f"lora rank must be at least 1 (or 0 = off), got {self.lora}")
        if self.lora and self.model.only_prefix:
            raise UsageError("--lora trains adapters on the LM and --only-prefix freezes it: give one of them")
        if self.lora_alpha is not None:
            check_number("lora-alpha", self.lora_alpha, low=0, low_open=True)
        check_number("lora-dropout", self.lora_dropout, low=0, high=1, high_open=True)

    @classmethod
    def create(cls, **values: Any) -> TrainOptions:
        """Options from flat values: TrainOptions fields and the ModelConfig fields of MODEL_FIELDS."""
        return cls().replace(**values)

    def replace(self, **changes: Any) -> TrainOptions:
        model = {k: changes.pop(k) for k in MODEL_FIELDS if k in changes}
        if model:
            changes["model"] = dataclasses.replace(self.model, **model)
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """The options as one flat dict: MODEL_FIELDS beside the others (how runs are compared)."""
        out = {k: getattr(self.model, k) for k in MODEL_FIELDS}
        out.update((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "model")
        return out

    def held_out_fraction(self, n_images: int) -> float:
        """The share of a store's ``n_images`` held out for validation (``val_fraction``, or the auto rule)."""
        if self.val_fraction is not None:
            return self.val_fraction
        return AUTO_VAL_FRACTION if not self.val_data and n_images >= AUTO_VAL_MIN_IMAGES else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainOptions:
        """Read ``to_dict``'s output back (and the flat dicts of runs saved before ``model`` existed)."""
        known = {f.name for f in dataclasses.fields(cls)} | set(MODEL_FIELDS)
        values = {k: v for k, v in data.items() if k in known and k != "model"}
        base = cls(model=ModelConfig.from_dict(data["model"])) if isinstance(data.get("model"), dict) else cls()
        return base.replace(**values)


def resume_conflicts(saved: TrainOptions, new: TrainOptions) -> list[str]:
    """Options that differ between a run and its resumption and would change its trajectory."""
    old, now = saved.flat(), new.flat()
    if old["noise_variance"] is None and now["noise_variance"] is not None:
        old["noise_variance"] = 0.0  # a state saved before --noise-variance existed: it trained without noise
    return [name for name in old if name not in RESUMABLE_CHANGES and old[name] != now[name]]


def model_config(opts: TrainOptions, meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a run: the mapper and LM from ``opts``, the CLIP side from the features' meta.

    A text store (``meta["modality"] == "text"``) or a noise variance > 0 forces ``normalize_prefix``,
    so that captioning normalises image embeddings as training normalised the text ones.
    """
    gpt2 = opts.model.gpt2
    if backbones.is_local(gpt2):  # checkpoints must find a local LM from any working directory
        gpt2 = str(Path(gpt2).expanduser().resolve())
    # A text store (CapDec) and any noise need the normalised prefix, in training and at inference.
    from_text = meta.get("modality") == "text"
    normalize = opts.model.normalize_prefix or from_text or bool(opts.noise_variance)
    return dataclasses.replace(
        opts.model,
        normalize_prefix=normalize,
        from_text=from_text,
        prefix_size=int(meta["embed_dim"]),
        clip_model=str(meta.get("clip_model") or DEFAULT_CLIP_MODEL),
        clip_pretrained=meta.get("clip_pretrained"),
        gpt2=gpt2,
    )


DEFAULT_WARMUP = 5000  # the original's warm-up steps (see auto_warmup)


def auto_warmup(warmup: int | None, total_steps: int) -> int:
    """``--warmup`` as given, or by default the original's 5000 steps, cut to a tenth of a shorter run.

    The original's 5000 suits COCO (about 100 k steps in 10 epochs; unchanged here). A run of a few hundred
    steps would otherwise end before its learning rate got anywhere near ``--lr``.
    """
    if warmup is not None:
        return warmup
    return min(DEFAULT_WARMUP, max(1, total_steps // 10))
