"""`clipcap inspect` and interpret.py: the nearest GPT-2 tokens of each prefix position equal a
brute-force nearest-neighbour search over the input-embedding matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.decoding import interpret
from clipcap_cli.decoding.decode import DecodingOptions
from clipcap_cli.errors import UsageError
from clipcap_cli.loading import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    from conftest import make_images

    return make_images(tmp_path_factory.mktemp("photos"))


def brute_force(prefix: torch.Tensor, wte: torch.Tensor, top: int) -> tuple[list[list[int]], list[list[float]]]:
    """For one prefix (K, E): every vocabulary row's cosine, one position at a time, sorted."""
    ids, cosines = [], []
    for row in prefix:
        cos = F.cosine_similarity(row[None].double(), wte.double(), dim=-1)  # (V,)
        order = torch.argsort(cos, descending=True, stable=True)[:top].tolist()
        ids.append(order)
        cosines.append([float(cos[v]) for v in order])
    return ids, cosines


@pytest.mark.parametrize("which", ["tiny_checkpoint", "tiny_transformer_checkpoint"])
def test_prefix_reading_equals_a_direct_nearest_neighbour_search(which: str, request, photos):
    captioner = load_model(str(request.getfixturevalue(which)), device="cpu")
    embeddings = captioner.encode([photos["rgb"], photos["gray"]])
    options = DecodingOptions(max_length=8)
    readings = interpret.read_prefix(captioner, embeddings, top=3, options=options)
    with torch.no_grad():
        prefixes = captioner.model.embed_prefix(embeddings)  # (2, K, E)
    wte = captioner.model.gpt.transformer.wte.weight.detach()
    captions = captioner.decode(embeddings, options)
    assert len(readings) == 2
    for reading, prefix, result in zip(readings, prefixes, captions):
        assert reading.caption == result.text
        assert len(reading.positions) == captioner.config.prefix_length
        ids, cosines = brute_force(prefix, wte, 3)
        assert [[t.id for t in pos] for pos in reading.positions] == ids
        for pos, want in zip(reading.positions, cosines):
            assert [t.cosine for t in pos] == pytest.approx(want, abs=1e-5)
            assert all(t.token == captioner.tokenizer.decode([t.id]) for t in pos)
    as_dict = readings[0].to_dict()
    assert [p["position"] for p in as_dict["prefix"]] == list(range(captioner.config.prefix_length))
    assert set(as_dict["prefix"][0]["tokens"][0]) == {"token", "id", "cosine"}


def test_nearest_tokens_on_a_known_matrix():
    vocab = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [1.0, 1.0]])
    prefix = torch.tensor([[[3.0, 0.1], [0.0, -1.0]]])  # (1, 2, 2)
    cos, ids = interpret.nearest_tokens(prefix, vocab, top=2)
    assert ids[0, 0].tolist() == [0, 3]
    assert cos[0, 0].tolist() == pytest.approx([3 / 9.01**0.5, 3.1 / (9.01**0.5 * 2**0.5)], abs=1e-6)
    assert sorted(ids[0, 1].tolist()) == [0, 2] and cos[0, 1].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(UsageError):
        interpret.nearest_tokens(prefix, vocab, top=5)


def test_cli_jsonl_records_and_exit_codes(tiny_checkpoint: Path, photos, tmp_path: Path):
    result = runner.invoke(
        app, ["inspect", str(photos["rgb"]), str(photos["rgba"]), "--model", str(tiny_checkpoint), "--top", "3"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(photos["rgb"]), str(photos["rgba"])]
    for record in records:
        assert set(record) == {"path", "caption", "prefix", "error"} and record["error"] is None
        assert isinstance(record["caption"], str) and len(record["prefix"]) == 4  # K of the tiny model
        for k, position in enumerate(record["prefix"]):
            assert position["position"] == k and len(position["tokens"]) == 3
            cosines = [t["cosine"] for t in position["tokens"]]
            assert cosines == sorted(cosines, reverse=True)
            assert all(isinstance(t["id"], int) and isinstance(t["token"], str) for t in position["tokens"])
    # the same reading through the Python API
    captioner = load_model(str(tiny_checkpoint), device="cpu")
    api = interpret.read_prefix(captioner, captioner.encode([photos["rgb"]]), top=3)[0].to_dict()
    assert api["caption"] == records[0]["caption"]
    assert [[t["id"] for t in p["tokens"]] for p in api["prefix"]] == [
        [t["id"] for t in p["tokens"]] for p in records[0]["prefix"]
    ]
    # a missing file: its record has the error, the others are read, exit code 3
    result = runner.invoke(
        app, ["inspect", str(tmp_path / "nope.jpg"), str(photos["rgb"]), "--model", str(tiny_checkpoint)]
    )
    assert result.exit_code == 3, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0]["error"] and records[0]["prefix"] is None and records[1]["error"] is None
    assert len(records[1]["prefix"][0]["tokens"]) == interpret.TOP
    for args, message in (
        (["--top", "0"], "--top must be at least 1"),
        ([], "no inputs"),
        (["--model", "cocoo"], "did you mean coco"),
    ):
        extra = [] if "--model" in args else ["--model", str(tiny_checkpoint)]
        result = runner.invoke(app, ["inspect", *([str(photos["rgb"])] if args else []), *args, *extra])
        assert result.exit_code == 2 and message in result.output, result.output


def test_cli_table_on_a_terminal(tiny_checkpoint: Path, photos, monkeypatch):
    from clipcap_cli.cli.commands import inspect as inspect_command

    monkeypatch.setattr(inspect_command, "_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["inspect", str(photos["rgb"]), "--model", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "nearest token" in result.stdout and "runner-up" in result.stdout and not result.stdout.startswith("{")
    result = runner.invoke(app, ["inspect", str(photos["rgb"]), "--model", str(tiny_checkpoint), "--jsonl"])
    assert json.loads(result.stdout.splitlines()[0])["path"] == str(photos["rgb"])
