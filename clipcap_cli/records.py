"""The caption record, one for every output, and strict JSON for everything clipcap writes.

A record is a plain dict. Its caption fields are the same wherever it goes (``clipcap caption``'s
writers, ``--output-dir``'s JSON Lines and Parquet, ``eval --save-predictions``): ``caption``,
``score``, ``error`` (None when fine); ``clip_score`` when reranked by CLIP; ``captions``, ``scores``
(and ``clip_scores``) when several captions per image were asked for. What names the input comes
first: ``path`` for plain captioning, ``key`` and ``shard`` for sharded runs.

JSON output never holds NaN or Infinity (strict parsers reject them): a non-finite score makes the
record an error, and ``dumps`` refuses any other non-finite number instead of writing it.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipcap_cli.decoding.decode import DecodingResult

Record = dict[str, Any]


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` for output files and stdout: UTF-8 text kept, NaN and Infinity refused (ValueError)."""
    kwargs.setdefault("ensure_ascii", False)
    return json.dumps(obj, allow_nan=False, **kwargs)


def _finite(values: Any) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def caption_fields(
    result: DecodingResult | None, error: str | None = None, *, alternatives: bool = False, clip: bool = False
) -> Record:
    """The caption fields of a record (see the module docstring); a result whose scores are not
    finite numbers becomes an error, since such a model's captions mean nothing."""
    if result is not None and not _finite(
        [result.score, *result.scores, result.clip_score, *(result.clip_scores or ())]
    ):
        error, result = (
            (
                f"non-finite score ({result.score}): the model produced NaN or infinity; "
                "check its weights (a diverged training run?)"
            ),
            None,
        )
    fields: Record = {
        "caption": result.text if result else None,
        "score": result.score if result else None,
        "error": error,
    }
    if clip:
        fields["clip_score"] = result.clip_score if result else None
    if alternatives:
        fields["captions"] = list(result.texts) if result else []
        fields["scores"] = list(result.scores) if result else []
        if clip:
            fields["clip_scores"] = list(result.clip_scores or ()) if result else []
    return fields


def make_record(
    path: str,
    result: DecodingResult | None = None,
    error: str | None = None,
    alternatives: bool = False,
    clip: bool = False,
) -> Record:
    """The record of one input of plain captioning: ``path``, then the caption fields."""
    return {"path": path, **caption_fields(result, error, alternatives=alternatives, clip=clip)}
