"""`clipcap caption`'s options for caption files (``sidecar_out``) and stored embeddings (``embeddings_in``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

SIDECARS = "Caption files (--sidecar)"
EMBEDDINGS = "Stored embeddings (--embeddings)"

SidecarOption = Annotated[
    Optional[str],
    typer.Option(
        "--sidecar",
        metavar="EXT",
        help="Also write each caption to a file beside its image, e.g. --sidecar .txt: photo.jpg -> photo.txt (what diffusion-model trainers read).",
        rich_help_panel=SIDECARS,
        show_default=False,
    ),
]
SidecarDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--sidecar-dir",
        metavar="DIR",
        help="Write the caption files into DIR, a tree mirroring the input folders, instead of beside the images (implies --sidecar .txt).",
        rich_help_panel=SIDECARS,
        show_default=False,
    ),
]
SidecarExistsOption = Annotated[
    str,
    typer.Option(
        "--sidecar-exists",
        metavar="MODE",
        help="When a caption file exists: skip (its image is not captioned: a rerun resumes), overwrite, append or prepend (joined by a space).",
        rich_help_panel=SIDECARS,
    ),
]
PrefixOption = Annotated[
    str,
    typer.Option(
        "--prefix",
        metavar="TEXT",
        help="Caption files: text before the caption, e.g. a trigger word: --prefix 'sks dog, '.",
        rich_help_panel=SIDECARS,
    ),
]
SuffixOption = Annotated[
    str,
    typer.Option("--suffix", metavar="TEXT", help="Caption files: text after the caption.", rich_help_panel=SIDECARS),
]
EmbeddingsOption = Annotated[
    Optional[List[str]],
    typer.Option(
        "--embeddings",
        metavar="PATH",
        help="Caption stored CLIP embeddings instead of images (no image is read): a clip-retrieval output folder (img_emb/*.npy + metadata/*.parquet), a clipcap features store, or NAME.emb.safetensors from --save-embeddings. Repeatable.",
        rich_help_panel=EMBEDDINGS,
        show_default=False,
    ),
]
