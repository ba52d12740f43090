"""`clipcap train`'s LoRA options (``--lora RANK`` and its settings), declared here to keep train.py short.

Their defaults live in ``TrainOptions`` (train/options.py); what they do, in ``clipcap_cli/weights/lora.py``.
"""

from __future__ import annotations

from typing import Any, Optional

import typer
from typing_extensions import Annotated

LORA = "LoRA"  # the help panel

LoraOption = Annotated[
    int,
    typer.Option(
        "--lora",
        help="Train rank-R LoRA adapters on the LM (peft; pip install 'clipcap-cli\\[lora]'), its own weights"
        " frozen: between --only-prefix and the whole LM. Checkpoints hold the mapper and adapters, merged at"
        " load time. 0 = off.",
        rich_help_panel=LORA,
    ),
]
LoraAlphaOption = Annotated[
    Optional[float],
    typer.Option(
        "--lora-alpha",
        help="LoRA scale numerator: adapters add (B @ A) * alpha / rank \\[default: the rank (a scale of 1)].",
        show_default=False,
        rich_help_panel=LORA,
    ),
]
LoraDropoutOption = Annotated[
    float, typer.Option("--lora-dropout", help="Dropout on the adapters' input.", rich_help_panel=LORA)
]
LoraTargetsOption = Annotated[
    Optional[str],
    typer.Option(
        "--lora-targets",
        help="Comma-separated LM module names to adapt \\[default: by LM type: GPT-2 c_attn,c_proj,c_fc;"
        " OPT q_proj,k_proj,v_proj,out_proj; Llama-style q_proj,k_proj,v_proj,o_proj].",
        show_default=False,
        rich_help_panel=LORA,
    ),
]


def values(lora: int, alpha: float | None, dropout: float, targets: str | None) -> dict[str, Any]:
    """The options as ``TrainOptions`` fields; ``--lora-targets a,b`` as a tuple (None: the family's defaults)."""
    return {
        "lora": lora,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "lora_targets": tuple(targets.split(",")) if targets else None,
    }
