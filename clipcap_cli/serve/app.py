"""The FastAPI application: /caption, the OpenAI-compatible /v1/chat/completions and /v1/models, /health.

Each request reads and checks its image in a thread of the server's pool (so a bad image is a 4xx for
that request alone), hands CLIP's input pixels to the ``Batcher``, and waits for its caption at most
``ServeOptions.timeout`` seconds in all. Errors are JSON in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``. ``run`` serves the app with uvicorn: on SIGTERM
or Ctrl+C it stops taking connections, finishes the requests in flight, then stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipcap_cli.records import make_record
from clipcap_cli.serve import ServeOptions
from clipcap_cli.serve.batcher import Batcher, BatcherClosed, captioner_runner
from clipcap_cli.serve.protocol import (
    RequestError,
    chat_completion,
    decode_base64,
    decode_image,
    decoding_options,
    fetch_image_bytes,
    models_list,
    parse_chat,
)

if TYPE_CHECKING:
    from clipcap_cli.captioner import Captioner
    from clipcap_cli.decoding.decode import DecodingOptions, DecodingResult

IMAGE_FIELDS = ("image", "file")  # multipart field names an upload may come in
SOURCE_FIELDS = ("url", "base64")  # JSON fields naming the image


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI wrapper: a request body over ``max_bytes`` gets 413, from its Content-Length at once, or
    when the bytes read pass the limit (a chunked upload)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = _error(body_too_large(self.max_bytes))
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        return await self.app(scope, limited, send)


def body_too_large(limit: int) -> RequestError:
    return RequestError(
        413, f"request body too large: at most {limit / (1024 * 1024):.2f} MB here (--max-upload-mb)", param="body"
    )


def _error(exc: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def model_id(name_or_path: str) -> str:
    """The name clients use for the model: the registry name, or a checkpoint file's stem."""
    from pathlib import Path

    path = Path(name_or_path).expanduser()
    return path.stem if path.suffix and path.is_file() else name_or_path


def create_app(
    captioner: Captioner, model: str, options: ServeOptions | None = None, *, batcher: Batcher | None = None
) -> Any:
    """The ASGI app serving ``captioner`` as ``model``; its lifespan starts and stops the batcher."""
    options = options or ServeOptions()
    batcher = batcher or Batcher(captioner_runner(captioner), options.max_batch, options.max_wait_ms)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)  # in-flight requests have finished: drain and stop

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("x-api-key")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if given is None and scheme.lower() == "bearer":
            given = token.strip()
        if given is None or not hmac.compare_digest(given.encode(), options.api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send Authorization: Bearer KEY", "authentication_error")

    app = FastAPI(title="clipcap", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    guarded = [Depends(authorize)]

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc, headers)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(_: Request, exc: _BodyTooLarge) -> JSONResponse:
        return _error(body_too_large(options.max_body_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(RequestError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return _error(RequestError(400, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error(RequestError(500, f"{type(exc).__name__}: {_first_line(exc)}", "server_error"))

    async def caption(fetch: Callable[[float], bytes], decoding: DecodingOptions) -> DecodingResult:
        """Read, check and preprocess the image (in a pool thread), then wait for the worker's caption."""
        deadline = time.monotonic() + options.timeout

        def prepare() -> Any:
            image = decode_image(_limited(fetch(deadline - time.monotonic()), options), options.max_pixels)
            try:
                return captioner.preprocess_image(image)
            except Exception as exc:  # a strange image CLIP's preprocess cannot take: this request's 400
                raise RequestError(400, f"cannot preprocess the image: {_first_line(exc)}", param="image") from None

        pixels = await run_in_threadpool(prepare)
        try:
            future = batcher.submit(pixels, decoding)
        except BatcherClosed:
            raise RequestError(503, "the server is shutting down", "server_error") from None
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(waiting, timeout=max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            future.cancel()  # if the worker has not taken it yet, it never will
            raise RequestError(
                504, f"no caption within {options.timeout:g} s (--timeout): the server is busy", "timeout"
            ) from None
        except Exception as exc:
            raise RequestError(
                500, f"captioning failed: {type(exc).__name__}: {_first_line(exc)}", "server_error"
            ) from None

    @app.get("/health")
    async def health() -> dict:
        s = batcher.stats
        return {
            "status": "ok",
            "model": model,
            "device": str(captioner.device),
            "queued": batcher.waiting,
            "in_flight": batcher.in_flight,
            "batches": s.batches,
            "images": s.images,
            "mean_batch_size": round(s.mean_batch_size, 3),
            "largest_batch": s.largest,
            "max_batch": options.max_batch,
        }

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> dict:
        return models_list(model, started)

    @app.post("/caption", dependencies=guarded)
    async def caption_endpoint(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            fetch, name, decoding = await _from_form(request, options)
        elif kind == "application/json":
            fetch, name, decoding = _from_json(await _json(request), options)
        else:
            raise RequestError(415, "send multipart/form-data with an image file, or JSON with url or base64")
        result = await caption(fetch, decoding)
        record = make_record(name, result, None, decoding.num_captions > 1, clip=decoding.rerank is not None)
        if record["error"] is not None:
            raise RequestError(500, record["error"], "server_error")
        return JSONResponse(record)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(request: Request) -> JSONResponse:
        asked = parse_chat(await _json(request), options)
        if asked.model != model:
            raise RequestError(
                404,
                f"model {asked.model!r} is not served here: use {model!r}",
                param="model",
                kind="invalid_request_error",
            )
        if asked.image.startswith("data:"):
            data = decode_base64(asked.image, "image_url")
            fetch = lambda _left: data
        else:
            fetch = lambda left: fetch_image_bytes(asked.image, options, left)
        result = await caption(fetch, asked.options)
        if not all(map(_finite, (result.score, *result.scores))):
            raise RequestError(500, "the model produced a non-finite score: check its weights", "server_error")
        return JSONResponse(chat_completion(result, model, asked.options, captioner.config.prefix_length))

    return BodyLimit(app, options.max_body_bytes)


def _finite(x: float) -> bool:
    import math

    return math.isfinite(x)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _limited(data: bytes, options: ServeOptions) -> bytes:
    if len(data) > options.max_upload_bytes:
        raise RequestError(
            413, f"image too large: {len(data)} bytes, at most {options.max_upload_mb:g} MB here", param="image"
        )
    return data


async def _json(request: Request) -> Any:
    import json

    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the body is not valid JSON") from None


def _from_json(body: Any, options: ServeOptions) -> tuple[Callable[[float], bytes], str | None, DecodingOptions]:
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object with url or base64")
    given = [f for f in SOURCE_FIELDS if f in body]
    if len(given) != 1:
        raise RequestError(400, "give exactly one of url and base64 (or upload the image as multipart/form-data)")
    decoding = decoding_options({k: v for k, v in body.items() if k not in SOURCE_FIELDS}, options)
    if given[0] == "base64":
        data = decode_base64(body["base64"])
        return (lambda _left: data), None, decoding
    url = body["url"]
    if not isinstance(url, str):
        raise RequestError(400, "url must be a string", param="url")
    return (lambda left: fetch_image_bytes(url, options, left)), url, decoding


async def _from_form(
    request: Request, options: ServeOptions
) -> tuple[Callable[[float], bytes], str | None, DecodingOptions]:
    from starlette.datastructures import UploadFile

    async with request.form() as form:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        text = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
        if len(files) != 1 or files[0][0] not in IMAGE_FIELDS:
            raise RequestError(400, f"upload exactly one file, in the field {IMAGE_FIELDS[0]!r}", param="image")
        name, upload = files[0]
        data = await upload.read()
        filename = upload.filename
    decoding = decoding_options(text, options, from_text=True)
    return (lambda _left: data), filename, decoding


# --------------------------------------------------------------------------- running it


def make_server(app: Any, options: ServeOptions, on_ready: Callable[[str], None] | None = None) -> Any:
    """A uvicorn server for ``app`` on ``options.host:port`` (port 0: a free one); ``on_ready(url)`` once it listens."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # As uvicorn's, less re-raising the signal once stopped: a server stopped on purpose exits 0.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl+C: stop without waiting
            self.should_exit = True

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(self.url)

        @property
        def url(self) -> str:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=options.timeout + 5,
    )
    return Server(config)


@contextlib.contextmanager
def serving_in_thread(app: Any, options: ServeOptions) -> Iterator[str]:
    """Serve ``app`` from a thread of this process (tests, notebooks); yields the base URL."""
    ready = threading.Event()
    found: dict[str, str] = {}

    def note(url: str) -> None:
        found["url"] = url
        ready.set()

    server = make_server(app, options, note)
    thread = threading.Thread(target=server.run, name="clipcap-serve", daemon=True)
    thread.start()
    while not ready.wait(0.05):
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
    try:
        yield found["url"]
    finally:
        server.should_exit = True
        thread.join(30)
