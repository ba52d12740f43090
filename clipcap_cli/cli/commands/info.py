"""`clipcap info`: versions, device and what is cached, for bug reports."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata

from clipcap_cli.cli.commands.options import JsonOption

HELP = """Show versions, the device clipcap would use, the CPU's capability (native bf16 or not), and the cache directory.

Example: [bold]clipcap info --json[/]
"""


def _version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    from clipcap_cli import paths
    from clipcap_cli.cpu import capability
    from clipcap_cli.device import pick_device
    from clipcap_cli.version import __version__

    home = paths.home()
    cached = sorted(
        str(p.relative_to(home))
        for p in home.rglob("*")
        if p.is_file() and p.suffix in {".pt", ".safetensors", ".bin", ".pth"}
    )
    return {
        "clipcap": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            d: _version_of(d)
            for d in ("torch", "transformers", "open_clip_torch", "typer", "rich", "safetensors", "pycocoevalcap")
        },
        "device": str(pick_device()),
        "cuda_available": torch.cuda.is_available(),
        "cpu": capability().as_dict(),  # torch's ISA report and native bf16: what --precision fast picks
        "home": str(home),
        "offline": paths.offline_requested(),
        "cached_files": cached,
    }


def command(
    json_: JsonOption = False,
) -> None:
    from clipcap_cli.cli.ui import cli_errors, stdout

    with cli_errors():
        info = collect()
        if json_ or not sys.stdout.isatty():
            stdout.print_json(json.dumps(info)) if sys.stdout.isatty() else print(json.dumps(info))
            return
        from rich.table import Table

        table = Table(show_header=False, box=None)
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {'-' if v is None else v}" for k, v in value.items())
            elif isinstance(value, list):
                value = "\n".join(value) or "(nothing cached)"
            table.add_row(f"[bold]{key}[/]", str(value))
        stdout.print(table)
