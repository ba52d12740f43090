"""Training a ClipCap model on a features store (``clipcap train``), as a small package:

- ``options``: ``TrainOptions`` (the model to train is a ``ModelConfig`` inside it);
- ``data``: the captions as cached GPT-2 tokens, one sample per caption;
- ``stream``: the captions streamed from the store a group of shards at a time, each epoch's batches;
- ``rundata``: a run's data (``load_data``): the streams, planned from per-shard counts;
- ``state``: the run folder: config, epoch checkpoints, and the exact resume state;
- ``callbacks``: the hooks the loop reports through, and the ``metrics.jsonl`` writer;
- ``loop``: ``train()``, which sets a run up, and ``fit()``, the training loop itself;
- ``monitor``: what each epoch's end watches (samples, warnings, best checkpoint, early stop),
  and ``report``: the run's ``report.html``.

``from clipcap_cli.train import TrainOptions`` imports no torch (``clipcap --help`` stays fast);
the torch-side names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from clipcap_cli.train.callbacks import (
    METRICS_FILE,
    Callbacks,
    MetricsLog,
    Sample,
    StartInfo,
    StepInfo,
    TrainCallback,
    TrainResult,
)
from clipcap_cli.train.options import RESUMABLE_CHANGES, TrainOptions, model_config, resume_conflicts

_LAZY = {
    "loop": (
        "train",
        "fit",
        "prepare",
        "train_step",
        "validate",
        "Trainer",
        "TrainingInterrupted",
        "NonFiniteError",
        "lr_factor",
        "ADAM_BETAS",
        "ADAM_EPS",
        "LOSS_EMA",
    ),
    "data": (
        "TokenizedCaptions",
        "tokenize_captions",
        "captions_key",
        "Batch",
        "CaptionDataset",
        "split_ids",
        "split_images",
    ),
    "rundata": ("TrainData", "load_data"),
    "stream": ("CaptionStream", "ShardTokens"),
    "state": ("Position", "read_run", "RESUME_FILE", "CONFIG_FILE"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "METRICS_FILE",
    "Callbacks",
    "MetricsLog",
    "Sample",
    "StartInfo",
    "StepInfo",
    "TrainCallback",
    "TrainResult",
    "RESUMABLE_CHANGES",
    "TrainOptions",
    "model_config",
    "resume_conflicts",
    *_WHERE,
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
