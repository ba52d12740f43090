"""`clipcap serve`: a real uvicorn server on a loopback port, real HTTP clients (httpx and the official
``openai`` client), the CLI's captions, dynamic batching, limits and bad inputs."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_images
from typer.testing import CliRunner

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from clipcap_cli.cli.app import app as cli_app  # noqa: E402
from clipcap_cli.serve import ServeOptions  # noqa: E402
from clipcap_cli.serve.app import create_app, serving_in_thread  # noqa: E402
from clipcap_cli.serve.batcher import Batcher, captioner_runner  # noqa: E402

runner = CliRunner()
FAST = ["--max-length", "6"]
KEY = "s3cret"


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    from clipcap_cli.loading import load_model

    return load_model(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("serve_photos"))


@pytest.fixture(scope="module")
def server(captioner):
    """The tiny model served as "tiny", batches gathered for up to 150 ms; URLs on loopback allowed
    (the tests' image server listens there)."""
    options = ServeOptions(port=0, max_batch=8, max_wait_ms=150, urls="any")
    with serving_in_thread(create_app(captioner, "tiny", options), options) as url:
        yield url


@pytest.fixture(scope="module")
def strict(captioner):
    """Small limits and an API key."""
    options = ServeOptions(port=0, api_key=KEY, max_upload_mb=0.01, max_pixels=1000, max_wait_ms=0)
    with serving_in_thread(create_app(captioner, "tiny", options), options) as url:
        yield url


def cli_records(ckpt: Path, *args: str) -> list[dict]:
    result = runner.invoke(cli_app, ["caption", "--model", str(ckpt), *FAST, *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def png(size: tuple[int, int] = (40, 30)) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(size[0]).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def error_of(response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "\n" not in body["error"]["message"]
    return body["error"]["message"]


# --------------------------------------------------------------------------- captions equal the CLI's


def test_concurrent_uploads_are_batched_and_equal_the_cli(server, tiny_checkpoint, photos):
    expected = {Path(r["path"]).name: r for r in cli_records(tiny_checkpoint, *map(str, photos.values()))}
    with httpx.Client(base_url=server, timeout=60) as client:
        before = client.get("/health").json()

        def post(path: Path) -> dict:
            files = {"image": (path.name, path.read_bytes(), "application/octet-stream")}
            response = client.post("/caption", files=files, data={"max_length": "6"})
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(len(photos)) as pool:
            records = list(pool.map(post, photos.values()))
        after = client.get("/health").json()
    assert len(records) == len(expected) == 7
    for record in records:
        want = expected[record["path"]]  # the upload's file name is the record's path
        assert set(record) == set(want) == {"path", "caption", "score", "error"}
        assert record["caption"] == want["caption"] and record["error"] is None
        assert record["score"] == pytest.approx(want["score"], abs=1e-4)
    batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    assert images == 7 and batches < 7  # at least two requests shared a batch
    assert after["largest_batch"] > 1


def test_json_base64_and_url_give_the_same_record_fields(server, photos, monkeypatch):
    data = photos["rgb"].read_bytes()
    handler = type("H", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(photos["rgb"].parent))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.delenv("CLIPCAP_OFFLINE")  # the server is in this process: it may fetch URLs now
    monkeypatch.delenv("HF_HUB_OFFLINE")
    url = f"http://127.0.0.1:{httpd.server_address[1]}/rgb.jpg"
    try:
        with httpx.Client(base_url=server, timeout=60) as client:
            by_b64 = client.post("/caption", json={"base64": base64.b64encode(data).decode(), "max_length": 6})
            by_url = client.post("/caption", json={"url": url, "max_length": 6})
            beams = client.post("/caption", json={"url": url, "max_length": 6, "strategy": "beam", "num_captions": 2})
            part = {"type": "image_url", "image_url": {"url": url}}
            chat = client.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": [part]}], "max_tokens": 6},
            )
    finally:
        httpd.shutdown()
    assert by_b64.status_code == by_url.status_code == beams.status_code == 200, (by_b64.text, by_url.text)
    assert by_b64.json()["path"] is None and by_url.json()["path"] == url
    assert by_b64.json()["caption"] == by_url.json()["caption"]
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == by_url.json()["caption"]
    assert set(beams.json()) == {"path", "caption", "score", "error", "captions", "scores"}  # the CLI's -n record
    assert len(beams.json()["captions"]) == 2


def test_a_seeded_sample_equals_the_cli_for_that_image(server, tiny_checkpoint, photos):
    want = cli_records(tiny_checkpoint, str(photos["gray"]), "--sample", "--seed", "7", "--top-k", "50")[0]
    with httpx.Client(base_url=server, timeout=60) as client:
        fields = {"max_length": "6", "strategy": "sample", "seed": "7", "top_k": "50"}
        got = client.post("/caption", files={"image": ("g.png", photos["gray"].read_bytes())}, data=fields).json()
    assert got["caption"] == want["caption"]


# --------------------------------------------------------------------------- the OpenAI protocol


def test_the_openai_client_gets_the_cli_caption(server, tiny_checkpoint, photos):
    openai = pytest.importorskip("openai")
    want = cli_records(tiny_checkpoint, str(photos["rgb"]))[0]["caption"]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    data_url = "data:image/jpeg;base64," + base64.b64encode(photos["rgb"].read_bytes()).decode()
    content = [{"type": "text", "text": "Caption this."}, {"type": "image_url", "image_url": {"url": data_url}}]
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0
    )
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == want
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1
    two = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6, n=2
    )
    assert len(two.choices) == 2 and [c.index for c in two.choices] == [0, 1]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": content}])
    with pytest.raises(openai.BadRequestError, match="exactly one image_url"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "no image"}])


# --------------------------------------------------------------------------- bad inputs and limits


def test_bad_inputs_get_one_line_4xx_errors_and_the_worker_goes_on(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        cases = {
            "not an image": client.post("/caption", files={"image": ("x.jpg", b"hello, not a jpeg")}),
            "bad base64": client.post("/caption", json={"base64": "%%% not base64 %%%"}),
            "unknown field": client.post("/caption", json={"base64": "AAAA", "beams": 3}),
            "bad option": client.post("/caption", json={"base64": "AAAA", "top_p": 0.5}),
            "wrong type": client.post("/caption", files={"image": ("a.png", png())}, data={"max_length": "many"}),
            "both sources": client.post("/caption", json={"base64": "AAAA", "url": "http://x/"}),
            "no file": client.post("/caption", data={"max_length": "6"}, files={"other": ("a.png", png())}),
            "not json": client.post("/caption", content=b"{oops", headers={"content-type": "application/json"}),
            "file url": client.post("/caption", json={"url": "file:///etc/passwd"}),
            "stream": client.post("/v1/chat/completions", json={"model": "tiny", "messages": [], "stream": True}),
        }
        messages = {name: error_of(r) for name, r in cases.items()}
        assert {name: r.status_code for name, r in cases.items()} == {name: 400 for name in cases} | {
            "no file": 400,
        }
        assert "not an image" in messages["not an image"]
        assert "not valid base64" in messages["bad base64"]
        assert "unknown field 'beams'" in messages["unknown field"]
        assert "sampling only" in messages["bad option"]  # DecodingOptions' own check
        assert "max_length must be an integer" in messages["wrong type"]
        assert client.post("/caption", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        ok = client.post("/caption", files={"image": ("a.png", png())}, data={"max_length": "6"})
        assert ok.status_code == 200 and ok.json()["caption"]  # nothing above hurt the worker


def test_limits_and_the_api_key(strict):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=strict, timeout=60) as client:
        assert client.get("/health").status_code == 200  # no key needed
        missing = client.post("/caption", files={"image": ("a.png", png())})
        assert missing.status_code == 401 and "API key" in error_of(missing)
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        small = png((20, 20))  # 400 pixels, a small file
        assert (
            client.post(
                "/caption", files={"image": ("a.png", small)}, headers=auth, data=dict(max_length="4")
            ).status_code
            == 200
        )
        many = client.post("/caption", files={"image": ("a.png", png((50, 40)))}, headers=auth)
        assert many.status_code == 413 and "2000" in error_of(many)  # 50x40 pixels over --max-pixels 1000
        big = client.post("/caption", files={"image": ("a.png", png((400, 400)))}, headers=auth)
        assert big.status_code == 413 and "too large" in error_of(big)  # Content-Length over the limit

        def chunks():
            for _ in range(200):  # 200 KB, over the body limit (4/3 of 10 KB, plus 64 KB for the form)
                yield b"x" * 1024

        streamed = client.post("/caption", content=chunks(), headers={**auth, "content-type": "application/json"})
        assert streamed.status_code == 413 and "too large" in error_of(streamed)  # no Content-Length: counted
        huge = client.post("/caption", json={"base64": "AAAA", "max_length": 100000}, headers=auth)
        assert huge.status_code == 400 and "at most" in error_of(huge)


def test_a_request_over_the_timeout_gets_504_and_a_model_failure_500(captioner):
    run = captioner_runner(captioner)
    calls = []

    def flaky(pixels, options):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory\nmore lines")
        if len(calls) == 2:
            time.sleep(1.5)
        return run(pixels, options)

    options = ServeOptions(port=0, timeout=0.5, max_wait_ms=0)
    batcher = Batcher(flaky, max_batch=4, max_wait_ms=0)
    with serving_in_thread(create_app(captioner, "tiny", options, batcher=batcher), options) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            failed = client.post("/caption", files={"image": ("a.png", png())})
            slow = client.post("/caption", files={"image": ("a.png", png())})
            time.sleep(1.2)  # the slow batch finishes
            fine = client.post("/caption", files={"image": ("a.png", png())}, data={"max_length": "4"})
    assert failed.status_code == 500 and error_of(failed) == "captioning failed: RuntimeError: CUDA out of memory"
    assert slow.status_code == 504 and "0.5 s" in error_of(slow)
    assert fine.status_code == 200 and fine.json()["caption"]


# --------------------------------------------------------------------------- the command


def test_without_the_extra_serve_says_how_to_install_it(monkeypatch, tiny_checkpoint):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = runner.invoke(cli_app, ["serve", "--model", str(tiny_checkpoint)])
    assert result.exit_code == 1
    assert "pip install 'clipcap-cli[serve]'" in result.stderr and "uvicorn" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_server_options_are_usage_errors(tiny_checkpoint):
    result = runner.invoke(cli_app, ["serve", "--model", str(tiny_checkpoint), "--max-batch", "0"])
    assert result.exit_code == 2 and "max-batch" in result.stderr


# --------------------------------------------------------------------------- the batcher alone


def test_the_batcher_groups_by_options_drops_cancelled_jobs_and_survives_failures():
    from clipcap_cli.decoding.decode import DecodingOptions

    seen: list[tuple[list[int], DecodingOptions]] = []
    gate = threading.Event()

    def run(pixels, options):
        gate.wait(5)  # the first batch holds the worker while the rest queue up
        seen.append((list(pixels), options))
        if -1 in pixels:
            raise ValueError("bad batch")
        return [f"{p}:{options.strategy}" for p in pixels]

    greedy, beam = DecodingOptions(), DecodingOptions(strategy="beam")
    with Batcher(run, max_batch=3, max_wait_ms=0) as batcher:
        first = batcher.submit(0, greedy)
        time.sleep(0.2)  # the worker has taken it and waits at the gate
        futures = [batcher.submit(i, greedy if i % 2 else beam) for i in range(1, 9)]
        dropped = batcher.submit(99, greedy)
        assert dropped.cancel()
        failing = batcher.submit(-1, DecodingOptions(max_length=5))  # options of its own: a batch alone
        gate.set()
        results = [f.result(5) for f in [first, *futures]]
        with pytest.raises(ValueError, match="bad batch"):
            failing.result(5)
        after = batcher.submit(10, greedy).result(5)  # the worker outlived the failure
    assert results == [f"{i}:{'greedy' if i % 2 or i == 0 else 'beam'}" for i in range(9)] and after == "10:greedy"
    batches = [pixels for pixels, _ in seen]
    assert [0] in batches and [1, 3, 5] in batches and [2, 4, 6] in batches  # queued work fills whole batches
    assert all(len(b) <= 3 for b in batches) and not any(99 in b for b in batches)


def test_the_batcher_gathers_until_the_batch_is_full():
    from clipcap_cli.decoding.decode import DecodingOptions

    sizes = []
    with Batcher(lambda p, o: sizes.append(len(p)) or list(p), max_batch=4, max_wait_ms=600_000) as batcher:
        with ThreadPoolExecutor(4) as pool:
            futures = list(pool.map(lambda i: batcher.submit(i, DecodingOptions()), range(4)))
        # the first job waits for three more, and the full batch runs at once (not after 10 minutes)
        assert [f.result(60) for f in futures] == [0, 1, 2, 3]
    assert sizes == [4]
    assert batcher.stats.mean_batch_size == 4.0


# --------------------------------------------------------------------------- the command in a process


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(tiny_checkpoint):
    import os
    import re
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "clipcap_cli", "serve", "--model", str(tiny_checkpoint), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--max-wait-ms", "3000"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert found, line + proc.stderr.read()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post,
                f"{found[1]}/caption",
                files={"image": ("a.png", png())},
                data={"max_length": "4"},
                timeout=60,
            )
            with httpx.Client(base_url=found[1]) as client:  # until the request waits in the batcher (3 s)
                while client.get("/health").json()["in_flight"] == 0:
                    assert not pending.done(), pending.result()
                    time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            answer = pending.result(60)
        assert answer.status_code == 200 and answer.json()["caption"]
        assert proc.wait(60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
