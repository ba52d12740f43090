"""Options several commands share, declared once: the same name, help and panel everywhere.

Each is an ``Annotated`` type for a command's signature (``model: ModelOption = "coco"``). Renamed
options keep their old spelling for one release as a hidden option (``deprecated_alias``); the command
merges it into the new one and says so on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.cli.ui import complete_model
from clipcap_cli.decoding.precision import PRECISIONS

MODEL = "Model"
SPEED = "Device and speed"

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Registry name (coco, conceptual, coco-transformer) or checkpoint file.",
        rich_help_panel=MODEL,
        autocompletion=complete_model,
    ),
]
ClipOption = Annotated[
    Optional[str],
    typer.Option(
        "--clip",
        help="CLIP model (open_clip name or local-dir:PATH) instead of the checkpoint's.",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
ClipPretrainedOption = Annotated[
    Optional[str],
    typer.Option(
        "--clip-pretrained",
        help="open_clip pretrained tag for --clip (e.g. openai; none for random weights).",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
LmOption = Annotated[
    Optional[str],
    typer.Option(
        "--lm",
        help="Causal language model (Hugging Face name or local folder: GPT-2, OPT, Llama, Qwen2, ...) instead of"
        " the one the checkpoint records; its tokenizer, and its weights for frozen-LM checkpoints.",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
# --gpt2: the option's name before any causal LM could be chosen, kept working (hidden).
Gpt2AliasOption = Annotated[
    Optional[str], typer.Option("--gpt2", help="The earlier name of --lm.", hidden=True, show_default=False)
]
Gpt2Option = LmOption  # the old name of the type, for code that still imports it


StopTokenOption = Annotated[
    Optional[str],
    typer.Option(
        "--stop-token",
        help="Stop after this token (default: the model's, \".\" for the released models); eos = the tokenizer's"
        " end of text only.",
        rich_help_panel="Decoding",
        show_default=False,
    ),
]
NormalizePrefixOption = Annotated[
    Optional[bool],
    typer.Option(
        "--normalize-prefix/--no-normalize-prefix",
        help="L2-normalise CLIP embeddings before the mapper (default: what the checkpoint implies).",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
PrecisionOption = Annotated[
    Optional[str],
    typer.Option(
        "--precision",
        help=f"The model's precision: {', '.join(PRECISIONS)} \\[default: auto = fp32, exact: the original's captions]. "
        "fast = the fastest good mode on this hardware: bf16 on a CPU with native bf16 (AVX512-BF16/AMX; see clipcap "
        "info), int8 on other CPUs, bf16/fp16 on CUDA; some captions differ from fp32's. bf16 on a CPU without native "
        "bf16 runs in fp32 (emulated bf16 is many times slower), with a warning. int8 (CPU): the LM, mapper and CLIP "
        "quantised. fp16: CUDA only. E.g. --precision fast.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON on stdout (also on a terminal).", show_default=False)]
DeviceOption = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        help="cpu, cuda, cuda:N or mps (default: the best available; under torchrun cuda:LOCAL_RANK).",
        rich_help_panel=SPEED,
        show_default=False,
    ),
]
# The image loader's one worker rule (inputs.default_workers); CPU_WORKERS is its CPU value.
ImageWorkersOption = Annotated[
    Optional[int],
    typer.Option(
        "--workers",
        "-j",
        help="Worker processes that read and decode images (0 = in this process). Default: the CPU count on CUDA"
        " (shared by torchrun's processes), none elsewhere.",
        rich_help_panel=SPEED,
        show_default=False,
    ),
]
# How a dataset is read (extract, and train given images): datasets.read_dataset's arguments.
DATASET = "Dataset"
ImagesRootOption = Annotated[
    Optional[Path],
    typer.Option(
        "--images", "-i", help="Images root for dataset files (default: the file's folder).", rich_help_panel=DATASET
    ),
]
DatasetFormatOption = Annotated[
    str,
    typer.Option(
        "--dataset-format",
        help="auto, coco, karpathy, caption-list, csv, tsv, jsonl, folder or webdataset.",
        rich_help_panel=DATASET,
    ),
]
SplitOption = Annotated[
    Optional[str],
    typer.Option(
        "--split",
        help="Karpathy split: train, val, test, restval, train+restval (ClipCap's 'train') or all.",
        rich_help_panel=DATASET,
    ),
]
RecursiveOption = Annotated[
    bool, typer.Option("--recursive", "-r", help="Image folders: include subfolders.", rich_help_panel=DATASET)
]
QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress bar, warnings or summary on stderr (results still on stdout)."),
]


def lm_choice(lm: str | None, gpt2: str | None, default: str | None = None) -> str | None:
    """The LM of ``--lm`` or its hidden alias ``--gpt2`` (``default``: --lm's own default, if it has one)."""
    if gpt2 is None:
        return lm
    if lm is not None and lm != default and lm != gpt2:
        from clipcap_cli.errors import UsageError

        raise UsageError(f"--lm {lm} and --gpt2 {gpt2} disagree: --gpt2 is --lm's old name, give one")
    return gpt2


def deprecated_alias(old: str, new: str, old_value: object, new_value: object, default: object) -> object:
    """The value of ``new`` when ``old`` (its spelling before 0.3) was given instead; a warning says so."""
    if old_value is None or old_value == default:
        return new_value
    from clipcap_cli.cli.ui import warn

    warn(f"{old} is now {new}; the old spelling will be removed in the next release")
    return old_value if new_value == default else new_value
