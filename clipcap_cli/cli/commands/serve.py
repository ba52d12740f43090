"""`clipcap serve`: caption images over HTTP (needs the serve extra)."""

from __future__ import annotations

from typing import Any, Optional

import typer
from typing_extensions import Annotated

from clipcap_cli.cli.commands.options import (
    ClipOption,
    ClipPretrainedOption,
    DeviceOption,
    Gpt2AliasOption,
    LmOption,
    ModelOption,
    NormalizePrefixOption,
    PrecisionOption,
    lm_choice,
)
from clipcap_cli.decoding.precision import DEFAULT_PRECISION
from clipcap_cli.serve import INSTALL_HINT, ServeOptions

_HINT = INSTALL_HINT.replace("[", "\\[")  # rich markup: a literal [
HELP = f"""Serve captions over HTTP: POST /caption, an OpenAI-compatible POST /v1/chat/completions, GET /v1/models, GET /health.

The model is loaded once; one worker thread captions concurrent requests together, in batches of up to --max-batch images gathered for at most --max-wait-ms. Bad images get a 4xx JSON error. SIGTERM or Ctrl+C finishes the requests in flight, then stops. Listens on 127.0.0.1 unless --host says otherwise. Image URLs are fetched from public addresses only unless --urls says otherwise.

Needs the serve extra: {_HINT}. See docs/serving.md.

Example: [bold]clipcap serve --model coco --port 8000[/]   ·   [bold]curl -F image=@photo.jpg http://127.0.0.1:8000/caption[/]
"""

D = ServeOptions  # the defaults
SERVER = "Server"
LIMITS = "Limits"


def command(
    model: ModelOption = "coco",
    clip: ClipOption = None,
    clip_pretrained: ClipPretrainedOption = None,
    lm: LmOption = None,
    gpt2: Gpt2AliasOption = None,
    normalize_prefix: NormalizePrefixOption = None,
    precision: PrecisionOption = DEFAULT_PRECISION,
    device: DeviceOption = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on (0.0.0.0: every interface; think of --api-key).",
            rich_help_panel=SERVER,
        ),
    ] = D.host,
    port: Annotated[
        int, typer.Option("--port", "-p", help="Port to listen on (0: any free port).", rich_help_panel=SERVER)
    ] = D.port,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="CLIPCAP_API_KEY",
            help="Require this key (Authorization: Bearer KEY, or X-API-Key) on every endpoint but /health; 401 without it.",
            rich_help_panel=SERVER,
            show_default=False,
        ),
    ] = D.api_key,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Most images captioned in one batch.", rich_help_panel=SERVER)
    ] = D.max_batch,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            "--max-wait-ms",
            help="How long a request waits for others to fill its batch (milliseconds).",
            rich_help_panel=SERVER,
        ),
    ] = D.max_wait_ms,
    max_upload_mb: Annotated[
        float,
        typer.Option(
            "--max-upload-mb", help="Largest image file a request may send or name by URL (MB).", rich_help_panel=LIMITS
        ),
    ] = D.max_upload_mb,
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            help="Largest image (width x height) accepted; checked before decoding.",
            rich_help_panel=LIMITS,
        ),
    ] = D.max_pixels,
    urls: Annotated[
        str,
        typer.Option(
            "--urls",
            help="Image URLs requests may name: public (public addresses only, redirects included), "
            "any (also loopback, LAN and cloud-metadata addresses), off (no URL is fetched).",
            rich_help_panel=LIMITS,
        ),
    ] = D.urls,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Seconds one request may take in all (URL download, queue, captioning); then 504.",
            rich_help_panel=LIMITS,
        ),
    ] = D.timeout,
) -> None:
    """Serve captions over HTTP."""
    from clipcap_cli.cli.ui import cli_errors

    with cli_errors():
        from clipcap_cli.serve import require_extra

        require_extra()  # one line with the install command, before the model is loaded
        options = ServeOptions(
            host=host,
            port=port,
            api_key=api_key,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_upload_mb=max_upload_mb,
            max_pixels=max_pixels,
            timeout=timeout,
            urls=urls,
        )
        _check(options)
        from clipcap_cli.weights.registry import check_model_argument

        check_model_argument(model)
        _serve(
            dict(
                name_or_path=model,
                clip_model=clip,
                clip_pretrained=clip_pretrained,
                gpt2=lm_choice(lm, gpt2),
                normalize_prefix=normalize_prefix,
                precision=precision,
                device=device,
            ),
            options,
        )


def _check(options: ServeOptions) -> None:
    """``options.check()`` with its field names written as this command's flags."""
    import dataclasses
    import re

    from clipcap_cli.errors import UsageError

    try:
        options.check()
    except UsageError as exc:
        text = str(exc)
        for f in dataclasses.fields(options):
            text = re.sub(rf"(?<![\w-]){f.name}(?![\w-])", "--" + f.name.replace("_", "-"), text)
        raise UsageError(text) from None


def _serve(model_args: dict[str, Any], options: ServeOptions) -> None:
    from rich.markup import escape

    from clipcap_cli.cli.ui import say, stderr
    from clipcap_cli.loading import load_model
    from clipcap_cli.serve.app import create_app, make_server, model_id

    captioner = load_model(**model_args)
    say(f"model {model_args['name_or_path']}: {captioner!r}")
    name = model_id(str(model_args["name_or_path"]))
    app = create_app(captioner, name, options)

    def ready(url: str) -> None:
        key = ", API key required" if options.api_key else ""
        stderr.print(
            f"serving {escape(name)} on {url} (batches of up to {options.max_batch}, {options.max_wait_ms:g} ms wait{key}); "
            "Ctrl+C or SIGTERM stops it",
            highlight=False,
        )

    server = make_server(app, options, ready)
    server.run()
    if not server.started:
        from clipcap_cli.errors import ClipCapError

        raise ClipCapError(f"could not listen on {options.host}:{options.port} (in use? try another --port)")
    stderr.print("stopped: every request in flight was answered", highlight=False)
