"""clipcap: ClipCap image captioning (CLIP prefix + a causal language model, GPT-2 by default) as a library and a command line.

The public API is small: ``load_model(name_or_path)`` returns a captioner with ``.caption(images)``.
Heavy modules (torch, transformers, open_clip) are imported on first use, not at import.
"""

from __future__ import annotations

from typing import Any

from clipcap_cli.decoding.decode import DecodingOptions, DecodingResult
from clipcap_cli.version import __version__

__all__ = ["DecodingOptions", "DecodingResult", "__version__", "load_features", "load_model"]


def load_model(name_or_path: str = "coco", **kwargs: Any) -> Any:
    """Load a registry model ("coco", "conceptual", "coco-transformer") or a checkpoint file.

    See ``clipcap_cli.loading.load_model`` for the keyword arguments.
    """
    from clipcap_cli.loading import load_model as _load

    return _load(name_or_path, **kwargs)


def load_features(path: str) -> Any:
    """Read a features store written by ``clipcap extract`` (see ``clipcap_cli.data.features``)."""
    from clipcap_cli.data.features import load_features as _load

    return _load(path)
