"""`clipcap eval` end to end through the CLI: known answers, key matching, output schema, --model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paper_table import PAPER_TABLE1
from test_evaluation import (
    CAPTIONS,
    PREDICTED,
    REFS_WRITERS,
    coco_name,
    write_caption_jsonl,
    write_coco,
    write_coco_results,
    write_karpathy,
    write_refs,
)
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.eval import clipscore, evaluation, metrics

runner = CliRunner()
FAST = ["--metrics", "BLEU,ROUGE-L,CIDEr", "--tokenizer", "ptb-python"]  # no JVM: keeps the tests quick
FAST_METRICS = [*metrics.BLEU_NAMES, "ROUGE-L", "CIDEr"]
ALL_METRICS = (*metrics.METRIC_NAMES, *clipscore.METRIC_NAMES)  # the default --metrics
SETTINGS_KEYS = {
    "refs",
    "refs_format",
    "split",
    "images",
    "predictions",
    "predictions_format",
    "model",
    "decoding",
    "batch_size",
    "device",
    "save_predictions",
    "captioned_from",
    "metrics",
    "tokenizer",
    "backend",
    "allow_missing",
    "clip_model",
    "clip_pretrained",
    "precision",
}
COUNT_KEYS = {
    "images",
    "reference_captions",
    "reference_images",
    "references_without_captions",
    "predictions",
    "failed_predictions",
    "missing_predictions",
    "unmatched_predictions",
}


def run(*args: str | Path) -> tuple[int, dict | None, str]:
    result = runner.invoke(app, ["eval", *map(str, args)])
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = None
    return result.exit_code, report, result.output


def expected_scores(refs: dict, preds: dict, **kwargs) -> dict[str, float]:
    kwargs.setdefault("metrics", FAST_METRICS)
    kwargs.setdefault("tokenizer", "ptb-python")
    return metrics.score(refs, preds, **kwargs).scores


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("preds_format", ["caption-jsonl", "coco-results"])
@pytest.mark.parametrize("refs_format", list(REFS_WRITERS))
def test_scores_match_metrics_score_for_every_format(tmp_path: Path, refs_format: str, preds_format: str):
    refs = write_refs(tmp_path, refs_format)
    preds = (
        write_caption_jsonl(tmp_path / "captions.jsonl")
        if preds_format == "caption-jsonl"
        else write_coco_results(tmp_path / "results.json")
    )
    code, report, output = run("--refs", refs, "--predictions", preds, *FAST)
    assert code == 0, output
    want = expected_scores(CAPTIONS, PREDICTED)
    assert report["metrics"] == pytest.approx(want, rel=1e-12)
    assert list(report["metrics"]) == FAST_METRICS
    assert report["metrics"]["CIDEr"] > 0.5  # a meaningful corpus, not a degenerate one
    assert report["counts"]["images"] == len(CAPTIONS) and report["matched_by"] == "image_id"
    assert report["settings"]["refs_format"] == refs_format


def test_bleu1_by_hand(tmp_path: Path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        "".join(
            json.dumps(line) + "\n"
            for line in [
                {"image": "a.jpg", "caption": "A cat sits on the mat."},
                {"image": "a.jpg", "caption": "There is a cat on the mat."},
                {"image": "b.jpg", "caption": "A cat sits on the mat."},
                {"image": "b.jpg", "caption": "There is a cat on the mat."},
            ]
        )
    )
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        json.dumps({"path": "a.jpg", "caption": "The cat is on the mat."})
        + "\n"
        + json.dumps({"path": "b.jpg", "caption": "the cat"})
        + "\n"
    )
    code, report, output = run(
        "--refs", refs, "--predictions", preds, "--metrics", "BLEU-1", "--tokenizer", "ptb-python"
    )
    assert code == 0, output
    # a: "the cat is on the mat" -> 5 of 6 unigrams match once clipped ("the" counts once per reference);
    # b: "the cat" -> 2 of 2. Corpus BLEU-1 pools them: 7/8 clipped precision; the closest reference
    # length is 6 for both (lengths 6 and 7), so the brevity penalty is exp(1 - 12/8).
    import math

    assert report["matched_by"] == "path"
    assert report["metrics"]["BLEU-1"] == pytest.approx(7 / 8 * math.exp(1 - 12 / 8), rel=1e-8)
    assert list(report["metrics"]) == ["BLEU-1"]


def test_python_scores_agree_with_pycocoevalcap_scorers(tmp_path: Path):
    pytest.importorskip("pycocoevalcap.cider.cider")  # the test extra installs it
    refs = write_karpathy(tmp_path / "dataset_coco.json")
    preds = write_caption_jsonl(tmp_path / "p.jsonl")
    code, ours, output = run("--refs", refs, "-p", preds, *FAST)
    assert code == 0, output
    code, theirs, output = run("--refs", refs, "-p", preds, *FAST, "--backend", "pycocoevalcap")
    assert code == 0, output
    assert set(theirs["backends"].values()) == {"pycocoevalcap"}
    assert ours["metrics"] == pytest.approx(theirs["metrics"], rel=1e-9)


@pytest.mark.slow
def test_default_metric_set_runs_or_reports_unavailable(tmp_path: Path):
    """The one test with every metric: METEOR starts a JVM when Java and pycocoevalcap are there
    (10 to 25 s on a busy 2-core box), so the direct comparison below leaves the Java tools out."""
    refs = write_coco(tmp_path / "captions_val2014.json")
    code, report, output = run("--refs", refs, "--predictions", write_coco_results(tmp_path / "r.json"))
    assert code == 0, output
    assert set(report["metrics"]) | set(report["unavailable"]) == set(ALL_METRICS)
    assert set(report["metrics"]).isdisjoint(report["unavailable"])
    for name, reason in report["unavailable"].items():
        assert reason and name in output  # also warned about on stderr
    python_side = [name for name in report["metrics"] if report["backends"][name] == "python"]
    assert set(python_side) >= set(FAST_METRICS)
    want = metrics.score(CAPTIONS, PREDICTED, metrics=python_side, tokenizer=report["tokenizer"])
    assert {name: report["metrics"][name] for name in python_side} == pytest.approx(want.scores, rel=1e-12)
    for name in set(report["metrics"]) - set(python_side):  # METEOR / SPICE from the jars
        assert report["backends"][name] == "pycocoevalcap-java" and 0 < report["metrics"][name] < 1
    assert report["settings"]["metrics"] == list(ALL_METRICS)


# --------------------------------------------------------------------------- matching and exit codes


def test_file_names_match_coco_ids_and_paths_match_paths(tmp_path: Path):
    refs = write_karpathy(tmp_path / "dataset_coco.json")  # cocoid on the reference side
    preds = write_caption_jsonl(tmp_path / "p.jsonl", prefix="./")  # only COCO file names on this side
    code, report, output = run("--refs", refs, "-p", preds, *FAST)
    assert code == 0 and report["matched_by"] == "image_id", output
    # no ids anywhere: matched by path, absolute prediction paths against relative references
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": f"photos/{n}.png", "caption": c}) + "\n"
            for n, caps in enumerate(CAPTIONS.values())
            for c in caps
        )
    )
    paths = tmp_path / "paths.jsonl"
    paths.write_text(
        "".join(
            json.dumps({"path": str(tmp_path / "photos" / f"{n}.png"), "caption": c}) + "\n"
            for n, c in enumerate(PREDICTED.values())
        )
    )
    code, report, output = run("--refs", manifest, "-p", paths, *FAST)
    assert code == 0 and report["matched_by"] == "path", output
    assert report["metrics"] == pytest.approx(expected_scores(CAPTIONS, PREDICTED), rel=1e-12)


def test_mismatch_is_exit_2_with_counts_unless_allow_missing(tmp_path: Path):
    refs = write_coco(tmp_path / "captions_val2014.json")
    some = dict(list(PREDICTED.items())[:3])
    preds = write_coco_results(tmp_path / "r.json", {**some, 42: "a stray prediction"})
    code, report, output = run("--refs", refs, "-p", preds, *FAST)
    assert code == 2 and report is None
    assert "3 of 6 reference images have no prediction (e.g. COCO_val2014_" in output
    assert "1 predictions match no reference image (e.g. image_id 42" in output
    assert "--allow-missing" in output
    code, report, output = run("--refs", refs, "-p", preds, *FAST, "--allow-missing")
    assert code == 0, output
    assert report["counts"]["images"] == 3 and report["counts"]["missing_predictions"] == 3
    assert report["counts"]["unmatched_predictions"] == 1 and report["settings"]["allow_missing"] is True
    assert report["metrics"] == pytest.approx(expected_scores({i: CAPTIONS[i] for i in some}, some), rel=1e-12)


def test_failed_records_are_skipped_with_exit_3(tmp_path: Path):
    refs = write_coco(tmp_path / "captions_val2014.json")
    preds = write_caption_jsonl(tmp_path / "p.jsonl", errors={184613: "unreadable image"})
    code, report, output = run("--refs", refs, "-p", preds, *FAST)
    assert code == 3, output
    assert report["counts"]["failed_predictions"] == 1 and report["counts"]["images"] == 5
    assert "unreadable image" in output
    kept = {i: c for i, c in PREDICTED.items() if i != 184613}
    assert report["metrics"] == pytest.approx(expected_scores({i: CAPTIONS[i] for i in kept}, kept), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give one of --predictions FILE or --model"),
        (["--model", "coco", "--predictions", "{preds}"], "give one of"),
        (["--predictions", "{preds}", "--beam", "5"], "--beam needs --model"),
        (["--predictions", "{preds}", "--metrics", "BLEU,WER"], "unknown metric WER"),
        (["--predictions", "{preds}", "--tokenizer", "spacy"], "--tokenizer spacy"),
        (["--predictions", "{preds}", "--compare", "oscar"], "only comparison is 'paper'"),
        (["--predictions", "{preds}", "--split", "test", "--refs-format", "coco"], "--split applies to Karpathy"),
        (["--predictions", "{tmp}/missing.jsonl"], "predictions not found"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str):
    refs = write_coco(tmp_path / "captions_val2014.json")
    preds = write_coco_results(tmp_path / "r.json")
    args = [a.format(preds=preds, tmp=tmp_path) for a in args]
    code, _, output = run("--refs", refs, *args)
    assert code == 2, output
    assert message in " ".join(output.split())


# --------------------------------------------------------------------------- output


def test_json_schema_is_stable(tmp_path: Path):
    refs = write_karpathy(tmp_path / "dataset_coco.json")
    preds = write_coco_results(tmp_path / "r.json")
    code, report, output = run("--refs", refs, "-p", preds, *FAST, "--json")
    assert code == 0, output
    assert list(report) == list(evaluation.REPORT_KEYS)  # no per_image / paper unless asked
    assert report["scale"] == evaluation.SCALE and report["scale"].startswith("0-1 (CIDEr: pycocoevalcap scale")
    assert set(report["counts"]) == COUNT_KEYS and set(report["settings"]) == SETTINGS_KEYS
    assert report["settings"]["split"] == "test" and report["settings"]["model"] is None
    assert report["settings"]["metrics"] == FAST_METRICS and report["tokenizer"] == "ptb-python"
    assert report["backends"] == {name: "python" for name in FAST_METRICS}
    assert report["unavailable"] == {}

    code, full, output = run(
        "--refs",
        refs,
        "-p",
        preds,
        *FAST,
        "--per-image",
        "--compare",
        "paper",
        "--output",
        tmp_path / "out" / "report.json",
    )
    assert code == 0, output
    assert list(full) == [*evaluation.REPORT_KEYS, "per_image", "paper"]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == full
    rows = full["per_image"]
    assert [row["image_id"] for row in rows] == list(CAPTIONS)
    assert set(rows[0]) == {"image", "image_id", "caption", "references", "scores"}
    assert set(rows[0]["scores"]) == set(FAST_METRICS)
    # the per-image CIDEr values average to the corpus CIDEr (pycocoevalcap's definition)
    assert sum(r["scores"]["CIDEr"] for r in rows) / len(rows) == pytest.approx(full["metrics"]["CIDEr"], rel=1e-12)
    assert set(full["paper"]) == {"source", "scale", "ours", "rows", "note"}
    assert full["paper"]["rows"] == PAPER_TABLE1  # the paper's numbers, written independently
    assert full["paper"]["ours"]["BLEU-4"] == pytest.approx(full["metrics"]["BLEU-4"] * 100)


def test_terminal_table_with_paper_and_worst_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from clipcap_cli.cli import ui
    from clipcap_cli.cli.commands import eval as eval_command

    monkeypatch.setattr(eval_command, "_is_terminal", lambda: True)
    monkeypatch.setattr(ui.stdout, "width", 220)  # a wide terminal, whatever the one running the tests
    refs = write_coco(tmp_path / "captions_val2014.json")
    predicted = {**PREDICTED, 397133: "a red bus parked on the street"}  # one clearly wrong caption
    preds = write_coco_results(tmp_path / "r.json", predicted)
    result = runner.invoke(
        app,
        [
            "eval",
            "--refs",
            str(refs),
            "-p",
            str(preds),
            "--tokenizer",
            "ptb-python",
            "--backend",
            "python",
            "--compare",
            "paper",
            "--per-image",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert not out.lstrip().startswith("{")
    want = metrics.score(CAPTIONS, predicted, tokenizer="ptb-python", backend="python").as_percent()
    assert f"{want['CIDEr']:.2f}" in out and f"{want['BLEU-4']:.2f}" in out
    assert "113.08" in out and "92.38" in out  # the paper's rows, on the same x100 scale
    assert "METEOR unavailable" in out and "SPICE unavailable" in out
    # the worst images, lowest CIDEr first: the wrong caption leads
    rows = [line for line in out[out.index("lowest CIDEr") :].splitlines() if "COCO_val2014_" in line]
    assert len(rows) == len(CAPTIONS) and "a red bus parked" in rows[0] and coco_name(397133) in rows[0]


# --------------------------------------------------------------------------- --model


@pytest.fixture
def coco_images(tmp_path: Path) -> Path:
    """The test set's images (random pixels) under images/val2014, named as COCO names them."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in CAPTIONS:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), "RGB").save(root / "val2014" / coco_name(i))
    return root


def test_model_captions_and_scores_in_one_run(tmp_path: Path, coco_images: Path, tiny_checkpoint: Path):
    refs = write_karpathy(tmp_path / "dataset_coco.json")
    saved = tmp_path / "saved.jsonl"
    code, report, output = run(
        "--refs",
        refs,
        "--images",
        coco_images,
        "--model",
        tiny_checkpoint,
        "--beam",
        "2",
        "--max-length",
        "8",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--save-predictions",
        saved,
        "--backend",
        "python",
        "--tokenizer",
        "ptb-python",
    )
    assert code == 0, output
    assert set(report["metrics"]) | set(report["unavailable"]) == set(ALL_METRICS)
    assert set(report["metrics"]) == set(FAST_METRICS)
    settings = report["settings"]
    assert set(settings) == SETTINGS_KEYS and settings["save_predictions"] == str(saved)
    assert settings["model"] == str(tiny_checkpoint) and settings["predictions"] is None
    assert settings["images"] == str(coco_images) and settings["predictions_format"] == "model"
    assert settings["captioned_from"] == "images"
    assert settings["decoding"]["strategy"] == "beam" and settings["decoding"]["beam_size"] == 2
    assert settings["decoding"]["max_length"] == 8 and settings["batch_size"] == 4
    assert report["counts"]["images"] == len(CAPTIONS) and report["counts"]["failed_predictions"] == 0
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert {line["image_id"] for line in lines} == set(CAPTIONS) and all(line["error"] is None for line in lines)
    # the saved captions re-score to the same numbers, without the model
    code, again, output = run(
        "--refs", refs, "--predictions", saved, "--backend", "python", "--tokenizer", "ptb-python"
    )
    assert code == 0, output
    assert again["metrics"] == report["metrics"]


def test_model_missing_images_fail_before_captioning(tmp_path: Path, coco_images: Path):
    refs = write_karpathy(tmp_path / "dataset_coco.json")
    (coco_images / "val2014" / coco_name(391895)).unlink()
    # the model name is never loaded: the missing image is found first
    code, _, output = run("--refs", refs, "--images", coco_images, "--model", tmp_path / "no-such.safetensors", *FAST)
    assert code == 2, output
    assert "1 of 6 reference images are not under" in " ".join(output.split())


def test_model_on_a_features_store_captions_the_stored_embeddings(
    tmp_path: Path, coco_images: Path, tiny_checkpoint: Path
):
    """Captions from the store's CLIP embeddings equal captions from the image files."""
    from clipcap_cli.data.features import save_features
    from clipcap_cli.loading import load_model

    captioner = load_model(str(tiny_checkpoint), device="cpu")
    names = [f"val2014/{coco_name(i)}" for i in CAPTIONS]
    embeddings = captioner.encode([coco_images / n for n in names])  # float32: the same numbers as from the files
    records = [{"image": n, "image_id": i, "captions": c} for n, (i, c) in zip(names, CAPTIONS.items())]
    meta = {
        "clip_model": captioner.config.clip_model,
        "clip_pretrained": captioner.config.clip_pretrained,
        "preprocess": "test",
        "images_root": str(coco_images),
    }
    store = save_features(tmp_path / "feats", embeddings, records, meta)
    common = ["--model", tiny_checkpoint, "--max-length", "6", "--device", "cpu", *FAST, "--per-image"]
    code, from_features, output = run("--refs", store, *common)
    assert code == 0, output
    assert from_features["settings"]["captioned_from"] == "features"
    code, from_images, output = run("--refs", store, "--images", coco_images, *common)
    assert code == 0, output
    assert from_images["settings"]["captioned_from"] == "images"
    assert [r["caption"] for r in from_features["per_image"]] == [r["caption"] for r in from_images["per_image"]]
    # fp16 rows, as a GPU extraction stores them, are captioned too
    half = save_features(tmp_path / "half", embeddings.half(), records, meta)
    code, from_half, output = run("--refs", half, *common)
    assert code == 0 and from_half["counts"]["images"] == len(CAPTIONS), output
    # features from another CLIP are refused with a way out
    other = save_features(
        tmp_path / "other", embeddings, records, {**meta, "clip_model": "ViT-L-14", "clip_pretrained": "openai"}
    )
    code, _, output = run("--refs", other, *common)
    assert code == 2 and "pass --images DIR" in " ".join(output.split())


def test_model_unreadable_image_is_a_failed_prediction(tmp_path: Path, coco_images: Path, tiny_checkpoint: Path):
    refs = write_coco(tmp_path / "captions_val2014.json")
    (coco_images / "val2014" / coco_name(554625)).write_bytes(b"not a jpeg")
    saved = tmp_path / "saved.jsonl"
    code, report, output = run(
        "--refs",
        refs,
        "--images",
        coco_images,
        "--model",
        tiny_checkpoint,
        "--max-length",
        "6",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--save-predictions",
        saved,
        *FAST,
    )
    assert code == 3, output
    assert report["counts"]["failed_predictions"] == 1 and report["counts"]["images"] == len(CAPTIONS) - 1
    assert coco_name(554625) in output
    failed = [json.loads(line) for line in saved.read_text().splitlines() if json.loads(line)["error"]]
    assert len(failed) == 1 and failed[0]["image_id"] == 554625 and failed[0]["caption"] is None
