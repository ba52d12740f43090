"""What a request asks for: its image and decoding options, checked, and the OpenAI response shapes.

Nothing here knows the web framework: bad input raises ``RequestError`` (an HTTP status, one line, and
the OpenAI error type), which ``app`` turns into ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipcap_cli.decoding.decode import DecodingOptions
from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

    from clipcap_cli.decoding.decode import DecodingResult
    from clipcap_cli.serve import ServeOptions


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx, 5xx), a one-line message, the OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


def _field_types() -> dict[str, tuple[type, bool]]:
    """DecodingOptions' fields -> (their type, whether None is allowed), read from the dataclass."""
    kinds = {"str": str, "int": int, "float": float}
    found = {}
    for f in dataclasses.fields(DecodingOptions):
        names = [part.strip() for part in str(f.type).split("|")]
        found[f.name] = (kinds[names[0]], "None" in names)
    return found


OPTION_TYPES = _field_types()
WANT = {str: "a string", int: "an integer", float: "a number"}  # for error messages
OPTION_FIELDS = tuple(OPTION_TYPES)


def _convert(name: str, value: Any, from_text: bool) -> Any:
    kind, nullable = OPTION_TYPES[name]
    if value is None or (from_text and nullable and value.strip().lower() in ("", "null", "none")):
        if nullable:
            return None
        raise RequestError(400, f"{name} must not be null", param=name)
    if from_text:
        try:
            return kind(value.strip()) if kind is not str else value
        except ValueError:
            raise RequestError(
                400,
                f"{name} must be {WANT[kind]}, got {value!r}",
                param=name,
            ) from None
    if kind is str and isinstance(value, str):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise RequestError(400, f"{name} must be {WANT[kind]}, got {value!r}", param=name)


def decoding_options(
    fields: Mapping[str, Any], limits: ServeOptions, *, from_text: bool = False, base: DecodingOptions | None = None
) -> DecodingOptions:
    """DecodingOptions from request fields (JSON values, or form text with ``from_text``), checked by
    DecodingOptions itself and against the server's limits. Unknown fields are refused."""
    for name in fields:
        if name not in OPTION_TYPES:
            raise RequestError(
                400, f"unknown field {name!r}: decoding options are {', '.join(OPTION_FIELDS)}", param=name
            )
    values = {name: _convert(name, value, from_text) for name, value in fields.items()}
    try:
        options = (base or DecodingOptions()).replace(**values)
    except UsageError as exc:
        raise RequestError(400, str(exc)) from None
    if options.max_length > limits.max_length:
        raise RequestError(
            400, f"max_length must be at most {limits.max_length} here, got {options.max_length}", param="max_length"
        )
    for name in ("beam_size", "num_captions"):
        if getattr(options, name) > limits.max_beams:
            raise RequestError(
                400, f"{name} must be at most {limits.max_beams} here, got {getattr(options, name)}", param=name
            )
    return options


# --------------------------------------------------------------------------- images


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The request's image bytes -> upright RGB (as ``clipcap caption`` opens files); the pixel count
    is checked from the header, before the image is decoded."""
    from PIL import Image, UnidentifiedImageError

    from clipcap_cli.data.images import ImageError, open_rgb

    if not data:
        raise RequestError(400, "the image is empty", param="image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"image too large: more than {max_pixels} pixels", param="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(400, "not an image Pillow can read", param="image") from None
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"image too large: {width}x{height} = {width * height} pixels, at most {max_pixels} here",
            param="image",
        )
    try:
        return open_rgb(data)
    except ImageError as exc:
        raise RequestError(400, str(exc).removeprefix("<bytes>: "), param="image") from None


def decode_base64(text: Any, param: str = "base64") -> bytes:
    """Base64 text (or a ``data:...;base64,`` URL) -> bytes; a one-line 400 for anything else."""
    if not isinstance(text, str):
        raise RequestError(400, f"{param} must be a string of base64", param=param)
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, "a data URL must be base64: data:image/...;base64,...", param=param)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{param} is not valid base64", param=param) from None


def fetch_image_bytes(url: str, limits: ServeOptions, deadline: float) -> bytes:
    """The body of an http(s) image URL, within the upload limit and ``deadline`` seconds, from the
    addresses ``limits.urls`` allows (public ones by default: see ``netguard``)."""
    from clipcap_cli.data.inputs import InputError, fetch_url

    if not url.lower().startswith(("http://", "https://")):
        raise RequestError(400, "url must be http(s) (or use base64 / a data: URL)", param="url")
    if limits.urls == "off":
        raise RequestError(
            400, "this server does not fetch URLs: send the image as base64, a data: URL or an upload", param="url"
        )
    try:
        return fetch_url(
            url,
            max_bytes=limits.max_upload_bytes,
            deadline=max(deadline, 0.001),
            public_only=limits.urls == "public",
        )
    except InputError as exc:
        raise RequestError(400, f"{url}: {exc}", param="url") from None


# --------------------------------------------------------------------------- OpenAI chat


@dataclass(frozen=True)
class ChatRequest:
    model: str
    image: str  # a data: URL or an http(s) URL
    options: DecodingOptions


def parse_chat(body: Any, limits: ServeOptions) -> ChatRequest:
    """An OpenAI chat.completions body -> the one image in its last user message, and decoding options.

    OpenAI's sampling fields map onto clipcap's: no ``temperature``/``top_p`` (or temperature 0) is
    greedy decoding (``n`` > 1: the n best of max(n, 5) beams); a temperature > 0 or top_p < 1 samples
    (``seed`` then makes it reproducible); ``max_tokens`` / ``max_completion_tokens`` is max_length. A
    ``clipcap`` object (the client's ``extra_body``) sets any decoding option directly, last.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model is required: GET /v1/models lists the one served here", param="model")
    if body.get("stream"):
        raise RequestError(400, "stream is not supported: a caption comes whole", param="stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError(400, "no user message: send one with an image_url content part", param="messages")
    content = users[-1].get("content")
    parts = content if isinstance(content, list) else []
    urls = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise RequestError(400, "an image_url part needs a url", param="messages")
            urls.append(url)
    if len(urls) != 1:
        raise RequestError(
            400,
            f"send exactly one image_url content part in the last user message (found {len(urls)})",
            param="messages",
        )
    return ChatRequest(model=model, image=urls[0], options=_chat_options(body, limits))


def _chat_options(body: dict, limits: ServeOptions) -> DecodingOptions:
    fields: dict[str, Any] = {}
    n = body.get("n") or 1
    temperature, top_p = body.get("temperature"), body.get("top_p")
    sampling = (temperature is not None and temperature != 0) or (top_p is not None and top_p != 1)
    if sampling:
        fields["strategy"] = "sample"
        if temperature is not None:
            fields["temperature"] = temperature
        if top_p is not None:
            fields["top_p"] = top_p
        if body.get("seed") is not None:
            fields["seed"] = body["seed"]
    if n != 1:
        fields["num_captions"] = n
        if not sampling:
            fields.update(strategy="beam", beam_size=max(n, DecodingOptions.beam_size) if isinstance(n, int) else n)
    most = body.get("max_completion_tokens", body.get("max_tokens"))
    if most is not None:
        fields["max_length"] = most
    extra = body.get("clipcap") or {}
    if not isinstance(extra, dict):
        raise RequestError(400, "clipcap must be an object of decoding options", param="clipcap")
    return decoding_options({**fields, **extra}, limits)


def chat_completion(result: DecodingResult, model: str, options: DecodingOptions, prompt_tokens: int) -> dict:
    """The chat.completion object for ``result``: one choice per caption (``n``)."""
    tokens = result.all_tokens or (result.tokens,)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": "length" if i < len(tokens) and len(tokens[i]) >= options.max_length else "stop",
            "logprobs": None,
        }
        for i, text in enumerate(result.texts)
    ]
    completion = sum(len(t) for t in tokens)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
        "system_fingerprint": None,
    }


def models_list(model: str, created: int) -> dict:
    """GET /v1/models: the one model served, in OpenAI's list shape."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "clipcap"}]}
