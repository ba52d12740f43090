"""`clipcap caption --sidecar .txt`: a caption file beside each image (or in a mirrored tree), the
layout diffusion-model trainers read (``photo.jpg`` -> ``photo.txt``).

What happens when a caption file already exists is ``SidecarOptions.exists``: ``skip`` (the
default: the image is not even captioned, so a rerun over a huge folder resumes where the last one
stopped), ``overwrite``, ``append`` or ``prepend``. New files are created exclusively
(``fsutil.create_exclusive``): of two runs over one folder, one writes each file and the other
counts it as skipped; replaced files are written to a temporary file and renamed over the old one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipcap_cli.data.images import is_image_path
from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    from clipcap_cli.data.inputs import Source

EXISTS_MODES = ("skip", "overwrite", "append", "prepend")
JOINER = " "  # between an existing caption and the new one (append, prepend)


@dataclass(frozen=True)
class SidecarOptions:
    """Where caption files go and what happens to existing ones. The CLI takes its defaults from here."""

    extension: str = ".txt"  # photo.jpg -> photo.txt
    folder: Path | None = None  # None: beside each image; else a tree mirroring the inputs' folders
    exists: str = "skip"  # skip, overwrite, append or prepend (see the module docstring)
    prefix: str = ""  # text before the caption, e.g. a trigger word "sks person, "
    suffix: str = ""  # text after the caption

    def __post_init__(self) -> None:
        ext = self.extension
        if not ext.startswith(".") or len(ext) < 2 or "/" in ext or os.sep in ext:
            raise UsageError(f"--sidecar {ext!r}: give a file extension that starts with a dot, e.g. --sidecar .txt")
        if is_image_path(Path("x" + ext)):
            raise UsageError(f"--sidecar {ext}: an image extension; the caption files would replace images")
        if self.exists not in EXISTS_MODES:
            raise UsageError(f"--sidecar-exists {self.exists!r}: choose one of {', '.join(EXISTS_MODES)}")

    def text(self, caption: str) -> str:
        """The file's text for a new caption: prefix, caption, suffix."""
        return f"{self.prefix}{caption}{self.suffix}"


@dataclass
class SidecarCounts:
    written: int = 0  # files created, replaced or extended
    skipped: int = 0  # existing files left alone (the image was not captioned, or another run won the race)
    failed: int = 0  # images that failed, or files that could not be written

    def line(self) -> str:
        return f"caption files: {self.written} written, {self.skipped} skipped, {self.failed} failed"


@dataclass
class Sidecars:
    """The caption file of each input, and the writing of them."""

    options: SidecarOptions
    targets: dict[str, Path]  # source location -> caption file
    counts: SidecarCounts = field(default_factory=SidecarCounts)

    @classmethod
    def plan(cls, options: SidecarOptions, sources: Sequence[Source], args: Iterable[str]) -> Sidecars:
        """Map every local source to its caption file; URL inputs are refused (they have no folder)."""
        from clipcap_cli.data.inputs import is_url

        urls = [s.name for s in sources if s.location and is_url(s.location)]
        if urls:
            raise UsageError(f"{urls[0]}: --sidecar writes caption files beside local images, not for URLs")
        local = [s for s in sources if s.location is not None]
        root = _mirror_root(args, [s.location for s in local]) if options.folder is not None and local else None
        targets = {}
        for s in local:
            image = Path(os.path.abspath(s.location))
            if options.folder is None:
                targets[s.location] = image.with_suffix(options.extension)
            else:
                assert root is not None
                targets[s.location] = options.folder / Path(os.path.relpath(image, root)).with_suffix(options.extension)
        seen: dict[Path, str] = {}
        for location, target in targets.items():
            if target in seen:
                raise UsageError(
                    f"{seen[target]} and {location} would share the caption file {target}: "
                    "rename one (images that differ only in extension need --sidecar-dir per folder)"
                )
            seen[target] = location
        return cls(options, targets)

    def pending(self, sources: Sequence[Source]) -> list[Source]:
        """The sources still to caption: with ``exists=skip``, those whose caption file exists are left
        out (counted as skipped). Sources that already failed stay, to get their error record."""
        if self.options.exists != "skip":
            return list(sources)
        kept = []
        for s in sources:
            target = self.targets.get(s.location or "")
            if target is not None and os.path.lexists(target):
                self.counts.skipped += 1
            else:
                kept.append(s)
        return kept

    def write(self, source: Source, caption: str | None) -> str | None:
        """Write ``source``'s caption file; None when done (or skipped), else why it failed (one line).
        ``caption`` None: the image failed, counted as a failed file."""
        if caption is None:
            self.counts.failed += 1
            return None
        target = self.targets[source.location or ""]
        try:
            outcome = write_caption_file(target, self.options.text(caption), self.options.exists)
        except OSError as exc:
            self.counts.failed += 1
            return f"caption file {target}: {exc.strerror or exc}"
        if outcome == "written":
            self.counts.written += 1
        else:
            self.counts.skipped += 1
        return None


def write_caption_file(path: Path, text: str, exists: str) -> str:
    """Write ``text`` to ``path`` by the ``exists`` rule; "written", or "skipped" when ``exists`` is
    skip and the file appeared (another run made it after the check: it is not clobbered)."""
    from clipcap_cli.fsutil import create_exclusive, write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    if create_exclusive(path, text):
        return "written"
    if exists == "skip":
        return "skipped"
    if exists == "overwrite":
        write_text_atomic(path, text)
        return "written"
    old = path.read_text(encoding="utf-8", errors="replace").strip()
    if not old:
        joined = text
    else:
        joined = f"{old}{JOINER}{text}" if exists == "append" else f"{text}{JOINER}{old}"
    write_text_atomic(path, joined)
    return "written"


def _mirror_root(args: Iterable[str], locations: Sequence[str]) -> str:
    """The folder the mirrored tree starts from: the common folder of the folder inputs and of the
    other images' folders (``photos/ -r`` mirrors ``photos/a/b.jpg`` as ``DIR/a/b.txt``)."""
    folders = [
        os.path.abspath(os.path.expanduser(a)) for a in args if a != "-" and os.path.isdir(os.path.expanduser(a))
    ]
    bases = list(folders)
    for loc in locations:
        image = os.path.abspath(loc)
        if not any(image.startswith(f.rstrip(os.sep) + os.sep) for f in folders):
            bases.append(os.path.dirname(image))
    return os.path.commonpath(bases)


def from_flags(
    extension: str | None, folder: Path | None, exists: str, prefix: str, suffix: str
) -> SidecarOptions | None:
    """--sidecar and its companions as options, or None when no caption files are asked for."""
    if extension is None and folder is None:
        given = [
            flag
            for flag, on in (
                ("--sidecar-exists", exists != SidecarOptions.exists),
                ("--prefix", prefix != SidecarOptions.prefix),
                ("--suffix", suffix != SidecarOptions.suffix),
            )
            if on
        ]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --sidecar EXT or --sidecar-dir DIR")
        return None
    return SidecarOptions(
        extension=extension or SidecarOptions.extension,
        folder=folder.expanduser().absolute() if folder is not None else None,
        exists=exists,
        prefix=prefix,
        suffix=suffix,
    )
