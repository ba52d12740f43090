"""The writers that print caption records, keyed by format name (like whisper's get_writer).

Records come from ``records.make_record`` (their fields are described there). Writers receive
records batch by batch, so streaming formats (jsonl, csv, text) print as batches finish.

Adding a format: subclass ``Writer`` and decorate it with ``@register_writer("name")``
(``suffixes=(".ext",)`` lets ``--output file.ext`` pick it).
"""

from __future__ import annotations

import abc
import csv
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from clipcap_cli.fsutil import atomic_open
from clipcap_cli.records import Record, dumps

# ``--output FILE``: written under a temporary name, fsynced, renamed into place on success only.
AtomicFile = atomic_open


class Writer(abc.ABC):
    """Base writer: ``write(records)`` for each finished batch, ``close()`` once at the end."""

    def __init__(self, stream: IO[str], **options: Any):
        self.stream = stream
        self.options = options

    @abc.abstractmethod
    def write(self, records: list[Record]) -> None:
        """Handle one finished batch of records."""

    def close(self) -> None:
        self.stream.flush()


class CollectingWriter(Writer):
    """For formats that need every record before printing (json, table, html): ``close`` renders."""

    def __init__(self, stream: IO[str], **options: Any):
        super().__init__(stream, **options)
        self.records: list[Record] = []

    def write(self, records: list[Record]) -> None:
        self.records.extend(records)


_WRITERS: dict[str, type[Writer]] = {}
_SUFFIXES: dict[str, str] = {}


def register_writer(name: str, suffixes: Iterable[str] = ()) -> Callable[[type[Writer]], type[Writer]]:
    def add(cls: type[Writer]) -> type[Writer]:
        _WRITERS[name] = cls
        for suffix in suffixes:
            _SUFFIXES[suffix.lower()] = name
        return cls

    return add


def available_formats() -> list[str]:
    return list(_WRITERS)


def get_writer(fmt: str, stream: IO[str], **options: Any) -> Writer:
    """The writer for ``fmt`` on ``stream``; ``options`` are passed through (e.g. ``title=``)."""
    from clipcap_cli.errors import UsageError

    if fmt not in _WRITERS:
        raise UsageError(f"unknown output format {fmt!r}: choose one of {', '.join(_WRITERS)}")
    return _WRITERS[fmt](stream, **options)


def format_for_path(path: str | Path) -> str | None:
    """The format a file name implies (``out.csv`` -> "csv"), or None."""
    return _SUFFIXES.get(Path(path).suffix.lower())


@register_writer("jsonl", suffixes=(".jsonl", ".ndjson"))
class JsonLinesWriter(Writer):
    def write(self, records: list[Record]) -> None:
        for record in records:
            self.stream.write(dumps(record) + "\n")
        self.stream.flush()


@register_writer("json", suffixes=(".json",))
class JsonWriter(CollectingWriter):
    """One JSON array, written at the end."""

    def close(self) -> None:
        self.stream.write(dumps(self.records, indent=2))
        self.stream.write("\n")
        super().close()


@register_writer("csv", suffixes=(".csv",))
class CsvWriter(Writer):
    """A header row, then one row per input; ``captions``/``scores`` cells hold JSON arrays."""

    def __init__(self, stream: IO[str], **options: Any):
        super().__init__(stream, **options)
        self.csv = csv.writer(stream, lineterminator="\n")
        self.columns: list[str] | None = None

    def write(self, records: list[Record]) -> None:
        for record in records:
            if self.columns is None:
                self.columns = list(record)
                self.csv.writerow(self.columns)
            self.csv.writerow([_cell(record.get(c)) for c in self.columns])
        self.stream.flush()


def name_of(record: Record) -> str:
    """What names a record's input: its ``path``, or the ``key`` of a sharded or stored-embedding record."""
    return str(record["path"] if "path" in record else record.get("key"))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return dumps(value) if isinstance(value, list) else value


@register_writer("text", suffixes=(".txt",))
class TextWriter(Writer):
    """``path<TAB>caption`` per line (one line per caption with several); a failed input gets an
    empty caption (its error goes to stderr)."""

    def write(self, records: list[Record]) -> None:
        for record in records:
            captions = record.get("captions") or [record.get("caption") or ""]
            for caption in captions:
                self.stream.write(f"{name_of(record)}\t{caption}\n")
        self.stream.flush()


@register_writer("table")
class TableWriter(CollectingWriter):
    """A rich table for a terminal (colours follow rich: NO_COLOR is honoured)."""

    def close(self) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(show_lines=False, expand=False)
        table.add_column("image", overflow="fold", style="cyan")
        table.add_column("caption", overflow="fold")
        table.add_column("score", justify="right", style="dim")
        clip = any("clip_score" in r for r in self.records)
        if clip:
            table.add_column("CLIP-S", justify="right")
        for r in self.records:
            if r["error"] is not None:
                table.add_row(escape(name_of(r)), f"[red]{escape(r['error'])}[/]", "", *([""] if clip else []))
                continue
            captions = r.get("captions") or [r["caption"]]
            scores = r.get("scores") or [r["score"]]
            clip_scores = r.get("clip_scores") or [r.get("clip_score")]
            for k, (caption, score) in enumerate(zip(captions, scores)):  # one row per caption: scores line up
                extra = [f"{clip_scores[k]:.3f}"] if clip else []
                table.add_row(
                    escape(name_of(r)) if k == 0 else "",
                    escape(caption),
                    f"{score:.3f}",
                    *extra,
                    end_section=len(captions) > 1 and k == len(captions) - 1,
                )
        Console(file=self.stream, soft_wrap=False).print(table)
        super().close()


@register_writer("html", suffixes=(".html", ".htm"))
class HtmlWriter(CollectingWriter):
    """A self-contained contact sheet: thumbnails embedded, caption and score under each image."""

    def close(self) -> None:
        from clipcap_cli.cli import html

        self.stream.write(html.render(self.records, settings=str(self.options.get("settings", ""))))
        super().close()
