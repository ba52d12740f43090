"""The eval core: reference and prediction readers, key matching, the report (no CLI here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from paper_table import PAPER_TABLE1

from clipcap_cli.errors import UsageError
from clipcap_cli.eval import evaluation, metrics
from clipcap_cli.eval.captioning import write_predictions
from clipcap_cli.eval.evaluation import EvalOptions, Prediction
from clipcap_cli.eval.metrics import KeyMismatchError

# Six COCO val images (id -> captions) and a model's captions for them: the shared test set.
CAPTIONS: dict[int, list[str]] = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman in a kitchen cutting a cake with a knife.",
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
    ],
    318219: [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
        "He is listening intently to the computer at school.",
    ],
    554625: [
        "a boy wearing headphones using one computer in a long row of computers",
        "A little boy with earphones on listening to something.",
        "A group of people sitting at desk using computers.",
    ],
    397133: [
        "A man is in a kitchen making pizzas.",
        "Man in apron standing on front of oven with pans and bakeware",
        "A baker is working in the kitchen rolling dough.",
    ],
}
PREDICTED: dict[int, str] = {
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "A woman cutting a cake in a kitchen.",
    184613: "A boy with an umbrella next to a cow.",
    318219: "A boy looking at a computer.",
    554625: "A boy with headphones at a computer.",
    397133: "A man making pizza in a kitchen.",
}
TRAIN_ONLY = {9: ["A train image that is not in the test split."]}


def coco_name(image_id: int, split: str = "val2014") -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def write_coco(path: Path, captions: dict[int, list[str]] = CAPTIONS) -> Path:
    images = [{"id": i, "file_name": coco_name(i), "height": 480, "width": 640} for i in captions]
    annotations = [
        {"image_id": i, "id": 1000 * i + j, "caption": c} for i, caps in captions.items() for j, c in enumerate(caps)
    ]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def write_karpathy(path: Path, captions: dict[int, list[str]] = CAPTIONS) -> Path:
    rows = []
    for n, (i, caps) in enumerate({**captions, **TRAIN_ONLY}.items()):
        split = "train" if i in TRAIN_ONLY else "test"
        folder = "train2014" if split == "train" else "val2014"
        rows.append(
            {
                "filepath": folder,
                "filename": coco_name(i, folder),
                "imgid": n,
                "cocoid": i,
                "split": split,
                "sentences": [
                    {"raw": c, "tokens": c.lower().split(), "sentid": 10 * n + j} for j, c in enumerate(caps)
                ],
            }
        )
    path.write_text(json.dumps({"images": rows, "dataset": "coco"}))
    return path


def write_caption_list(path: Path, captions: dict[int, list[str]] = CAPTIONS) -> Path:
    """The original ClipCap train_caption.json layout."""
    path.write_text(
        json.dumps(
            [
                {"image_id": i, "id": 1000 * i + j, "caption": c}
                for i, caps in captions.items()
                for j, c in enumerate(caps)
            ]
        )
    )
    return path


def write_refs_jsonl(path: Path, captions: dict[int, list[str]] = CAPTIONS) -> Path:
    """One line per caption; half the images are named by path, the other half by image_id only."""
    lines = []
    for n, (i, caps) in enumerate(captions.items()):
        for c in caps:
            lines.append({"image": f"val2014/{coco_name(i)}", "caption": c} if n % 2 else {"image_id": i, "caption": c})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_features(path: Path, captions: dict[int, list[str]] = CAPTIONS, images_root: Path | None = None) -> Path:
    import torch

    from clipcap_cli.data.features import save_features

    records = [{"image": f"val2014/{coco_name(i)}", "image_id": i, "captions": caps} for i, caps in captions.items()]
    records.append({"image": "val2014/uncaptioned.jpg", "image_id": None, "captions": []})
    meta = {
        "clip_model": "ViT-B-32",
        "clip_pretrained": "openai",
        "preprocess": "test",
        "images_root": str(images_root) if images_root else None,
    }
    return save_features(path, torch.zeros(len(records), 4), records, meta)


REFS_WRITERS = {
    "coco": write_coco,
    "karpathy": write_karpathy,
    "caption-list": write_caption_list,
    "jsonl": write_refs_jsonl,
    "features": write_features,
}
REFS_NAMES = {
    "coco": "captions_val2014.json",
    "karpathy": "dataset_coco.json",
    "caption-list": "train_caption.json",
    "jsonl": "refs.jsonl",
    "features": "feats",
}


def write_refs(folder: Path, fmt: str, captions: dict[int, list[str]] = CAPTIONS) -> Path:
    return REFS_WRITERS[fmt](folder / REFS_NAMES[fmt], captions)


def write_caption_jsonl(
    path: Path,
    predicted: dict[int, str] = PREDICTED,
    prefix: str = "/data/coco/val2014/",
    errors: dict[int, str] | None = None,
) -> Path:
    """`clipcap caption --jsonl` output: path + caption (+ score, error)."""
    errors = errors or {}
    lines = [
        {"path": prefix + coco_name(i), "caption": None if i in errors else c, "score": -0.5, "error": errors.get(i)}
        for i, c in predicted.items()
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_coco_results(path: Path, predicted: dict[int, str] = PREDICTED) -> Path:
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predicted.items()]))
    return path


def as_id_dict(refs: evaluation.References) -> dict[int, list[str]]:
    return {r.image_id: r.captions for r in refs.images}


# --------------------------------------------------------------------------- reading references


@pytest.mark.parametrize("fmt", list(REFS_WRITERS))
def test_every_reference_format_reads_the_same_captions(tmp_path: Path, fmt: str):
    source = write_refs(tmp_path, fmt)
    refs = evaluation.read_references(source)
    assert refs.format == fmt
    by_key = {}
    for r in refs.images:  # the JSON Lines file names half its images by path only
        key = r.image_id if r.image_id is not None else evaluation.coco_id_from_name(r.image)
        by_key[key] = r.captions
    assert by_key == CAPTIONS  # Karpathy: the train image is left out (default split test)
    assert refs.split == ("test" if fmt == "karpathy" else None)
    assert refs.without_captions == (1 if fmt == "features" else 0)


def test_karpathy_split_selection_and_split_on_other_formats(tmp_path: Path):
    source = write_karpathy(tmp_path / "dataset_coco.json")
    assert as_id_dict(evaluation.read_references(source, split="train")) == TRAIN_ONLY
    everything = evaluation.read_references(source, split="all")
    assert len(everything.images) == len(CAPTIONS) + 1 and everything.split == "all"
    assert evaluation.read_references(source, fmt="karpathy").split == "test"
    coco = write_coco(tmp_path / "captions_val2014.json")
    with pytest.raises(UsageError, match="--split applies to Karpathy"):
        evaluation.read_references(coco, split="test")


def test_reference_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="references not found"):
        evaluation.read_references(tmp_path / "nope.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "no image"}\n')
    with pytest.raises(UsageError, match="line 1: no 'image', 'path' or 'image_id'"):
        evaluation.read_references(bad)
    empty = write_coco(tmp_path / "empty.json", {1: []})
    with pytest.raises(UsageError, match="no reference captions"):
        evaluation.read_references(empty)
    with pytest.raises(UsageError, match="unknown references format"):
        evaluation.read_references(empty, fmt="xml")


def test_coco_ids_from_file_names():
    assert evaluation.coco_id_from_name("COCO_val2014_000000123456.jpg") == 123456
    assert evaluation.coco_id_from_name("/x/train2014/COCO_train2014_000000000009.jpg") == 9
    assert evaluation.coco_id_from_name("val2017/000000397133.jpg") == 397133
    assert evaluation.coco_id_from_name("C:\\coco\\COCO_val2014_000000000042.png") == 42
    # Flickr-style numeric names are not COCO ids (a Karpathy flickr file numbers images 0..N).
    assert evaluation.coco_id_from_name("1000092795.jpg") is None
    assert evaluation.coco_id_from_name("dog.jpg") is None and evaluation.coco_id_from_name(None) is None


# --------------------------------------------------------------------------- reading predictions


def test_prediction_formats(tmp_path: Path):
    jsonl = evaluation.read_predictions(write_caption_jsonl(tmp_path / "p.jsonl", errors={522418: "unreadable image"}))
    assert jsonl.format == "jsonl" and len(jsonl.items) == len(PREDICTED)
    failed = [p for p in jsonl.items if p.error]
    assert len(failed) == 1 and failed[0].caption is None and failed[0].line == 2
    coco = evaluation.read_predictions(write_coco_results(tmp_path / "results.json"))
    assert coco.format == "coco" and {p.image_id: p.caption for p in coco.items} == PREDICTED
    # JSON Lines under a .json name is still read
    lines = tmp_path / "lines.json"
    lines.write_text((tmp_path / "p.jsonl").read_text())
    assert evaluation.read_predictions(lines).format == "jsonl"


def test_prediction_errors(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.jpg", "caption": "ok"}\n{"path": "b.jpg"}\n')
    with pytest.raises(UsageError, match="record 2: no 'caption'"):
        evaluation.read_predictions(bad)
    bad.write_text('{"path": "a.jpg", "caption": "ok"}\nnot json\n')
    with pytest.raises(UsageError, match="line 2: invalid JSON"):
        evaluation.read_predictions(bad)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"caption": "no key"}]))
    with pytest.raises(UsageError, match="record 1: no 'path', 'image' or 'image_id'"):
        evaluation.read_predictions(res)
    with pytest.raises(UsageError, match="predictions not found"):
        evaluation.read_predictions(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- matching


def _refs(items: list[tuple[str | None, object, list[str]]]) -> evaluation.References:
    return evaluation.References([evaluation.RefImage(p, i, c) for p, i, c in items], Path("refs"), "jsonl", None, None)


def test_match_by_coco_id_from_names_and_ids(tmp_path: Path):
    refs = evaluation.read_references(write_coco(tmp_path / "c.json"))
    preds = evaluation.read_predictions(write_caption_jsonl(tmp_path / "p.jsonl")).items  # absolute paths, no ids
    m = evaluation.match(refs, preds)
    assert m.by == "image_id" and m.predictions == PREDICTED and not m.missing and not m.unmatched


def test_ids_written_as_floats_match_integer_ids(tmp_path: Path):
    """References whose ids are floats (1.0, as pandas writes them) match predictions with ints."""
    refs = tmp_path / "train_caption.json"
    refs.write_text(json.dumps([{"image_id": float(i), "caption": c} for i, caps in CAPTIONS.items() for c in caps]))
    m = evaluation.match(
        evaluation.read_references(refs), evaluation.read_predictions(write_coco_results(tmp_path / "r.json")).items
    )
    assert m.by == "image_id" and not m.missing and not m.unmatched and set(m.predictions) == set(PREDICTED)


def test_match_by_path_suffix_and_duplicate_names():
    refs = _refs([("a/dog.jpg", None, ["a dog"]), ("b/dog.jpg", None, ["another dog"]), ("cat.jpg", None, ["a cat"])])
    preds = [
        Prediction("/abs/root/b/dog.jpg", None, "dog b"),
        Prediction("./a/dog.jpg", None, "dog a"),
        Prediction("elsewhere/cat.jpg", None, "cat"),
    ]
    m = evaluation.match(refs, preds)
    assert m.by == "path"
    assert m.predictions == {"a/dog.jpg": "dog a", "b/dog.jpg": "dog b", "cat.jpg": "cat"}
    with pytest.raises(UsageError, match="fits several reference images"):
        evaluation.match(refs, [Prediction("dog.jpg", None, "which dog?")])
    with pytest.raises(UsageError, match="two predictions for the same image"):
        evaluation.match(refs, [Prediction("cat.jpg", None, "x", line=1), Prediction("x/cat.jpg", None, "y", line=4)])


def test_match_falls_back_to_paths_when_ids_share_nothing():
    # A Karpathy Flickr file numbers images 0..N (imgid); predictions carry other ids but the same paths.
    refs = _refs([("1000092795.jpg", 0, ["two men"]), ("10002456.jpg", 1, ["workers"])])
    preds = [Prediction("flickr/1000092795.jpg", 55, "men"), Prediction("flickr/10002456.jpg", 56, "people")]
    m = evaluation.match(refs, preds)
    assert m.by == "path" and m.predictions == {"1000092795.jpg": "men", "10002456.jpg": "people"}


def test_match_needs_a_common_kind_of_key():
    refs = _refs([("dog.jpg", None, ["a dog"])])
    with pytest.raises(UsageError, match="neither a COCO image id nor a path"):
        evaluation.match(refs, [Prediction(None, 5, "a dog")])


def test_mismatch_message_counts_and_allow_missing(tmp_path: Path):
    refs = evaluation.read_references(write_coco(tmp_path / "c.json"))
    partial = {i: c for i, c in list(PREDICTED.items())[:4]}
    partial[777] = "an image the references do not have"
    preds = evaluation.read_predictions(write_coco_results(tmp_path / "r.json", partial))
    m = evaluation.match(refs, preds.items)
    with pytest.raises(KeyMismatchError) as info:
        evaluation.check_matching(m, allow_missing=False)
    message = str(info.value)
    assert "2 of 6 reference images have no prediction" in message
    assert "1 predictions match no reference image (e.g. image_id 777 (record 5))" in message
    assert "--allow-missing to score the 4 images" in message and info.value.exit_code == 2
    evaluation.check_matching(m, allow_missing=True)
    report = evaluation.evaluate(
        refs, preds, EvalOptions(allow_missing=True, tokenizer="ptb-python", metrics=("CIDEr",))
    )
    assert report["counts"]["images"] == 4 and report["counts"]["missing_predictions"] == 2
    assert report["counts"]["unmatched_predictions"] == 1
    expected = metrics.score(
        {i: CAPTIONS[i] for i in list(PREDICTED)[:4]},
        {i: PREDICTED[i] for i in list(PREDICTED)[:4]},
        metrics=["CIDEr"],
        tokenizer="ptb-python",
    )
    assert report["metrics"]["CIDEr"] == pytest.approx(expected.scores["CIDEr"], rel=1e-12)
    # nothing in common is an error even with allow_missing
    none = evaluation.read_predictions(write_coco_results(tmp_path / "n.json", {1: "x"}))
    with pytest.raises(KeyMismatchError, match="nothing to score"):
        evaluation.evaluate(refs, none, EvalOptions(allow_missing=True))


# --------------------------------------------------------------------------- the report


def test_failed_and_empty_predictions(tmp_path: Path):
    refs = evaluation.read_references(write_coco(tmp_path / "c.json"))
    predicted = {**PREDICTED, 318219: ""}  # an empty caption is scored, as zero
    preds = evaluation.read_predictions(
        write_caption_jsonl(tmp_path / "p.jsonl", predicted, errors={522418: "cannot decode"})
    )
    report = evaluation.evaluate(
        refs, preds, EvalOptions(tokenizer="ptb-python", metrics=("BLEU", "CIDEr"), per_image=True)
    )
    assert report["counts"]["failed_predictions"] == 1 and report["counts"]["images"] == 5
    assert report["counts"]["missing_predictions"] == 0
    assert any("cannot decode" in note and "COCO_val2014_000000522418.jpg" in note for note in report["notes"])
    rows = {row["image_id"]: row for row in report["per_image"]}
    assert set(rows) == set(PREDICTED) - {522418}
    assert rows[318219]["caption"] == "" and rows[318219]["scores"]["CIDEr"] == 0.0
    assert rows[318219]["scores"]["BLEU-1"] == pytest.approx(0.0, abs=1e-9)
    kept = [i for i in PREDICTED if i != 522418]
    expected = metrics.score(
        {i: CAPTIONS[i] for i in kept},
        {i: predicted[i] for i in kept},
        metrics=["BLEU", "CIDEr"],
        tokenizer="ptb-python",
    )
    assert report["metrics"] == pytest.approx(expected.scores, rel=1e-12)


def test_report_keys_and_paper_comparison(tmp_path: Path):
    refs = evaluation.read_references(write_karpathy(tmp_path / "dataset_coco.json"))
    preds = evaluation.read_predictions(write_coco_results(tmp_path / "r.json"))
    report = evaluation.evaluate(refs, preds, EvalOptions(tokenizer="ptb-python", backend="python"), compare_paper=True)
    assert set(report) == set(evaluation.REPORT_KEYS) | {"paper"}
    # backend python: no Java tools; no images: no CLIPScore
    assert set(report["unavailable"]) == {"METEOR", "SPICE", "CLIPScore", "RefCLIPScore"}
    assert set(report["metrics"]) == set(metrics.METRIC_NAMES) - {"METEOR", "SPICE"}
    paper = report["paper"]
    assert paper["rows"] == PAPER_TABLE1  # the paper's numbers, written independently
    assert paper["note"] == "the paper scores all 5000 Karpathy test images; 6 were scored here"
    assert paper["ours"]["CIDEr"] == pytest.approx(report["metrics"]["CIDEr"] * 100)
    metric, worst = evaluation.worst_images({"per_image": [{"scores": {"CIDEr": 2.0}}, {"scores": {"CIDEr": 0.5}}]}, 1)
    assert metric == "CIDEr" and worst == [{"scores": {"CIDEr": 0.5}}]


def test_write_predictions_round_trip(tmp_path: Path):
    preds = evaluation.Predictions(
        [Prediction("val2014/a.jpg", 1, "a dog"), Prediction("val2014/b.jpg", 2, None, "bad file")], None, "model"
    )
    old_umask = os.umask(0o022)
    try:
        out = write_predictions(tmp_path / "sub" / "saved.jsonl", preds)
    finally:
        os.umask(old_umask)
    back = evaluation.read_predictions(out)
    assert [(p.image, p.image_id, p.caption, p.error) for p in back.items] == [
        ("val2014/a.jpg", 1, "a dog", None),
        ("val2014/b.jpg", 2, None, "bad file"),
    ]
    assert not [p for p in out.parent.iterdir() if p.name != "saved.jsonl"]  # no temp file left behind
    assert out.stat().st_mode & 0o777 == 0o644  # as open() would make it, not the temp file's 0600


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"tokenizer": "spacy"}, "--tokenizer spacy: choose one of"),
        ({"backend": "java"}, "--backend java: choose one of"),
        ({"refs_format": "csv"}, "--refs-format csv: choose one of"),
        ({"metrics": ("BLEU", "WER")}, "unknown metric WER"),
        ({"metrics": ()}, "unknown metric (none given)"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"workers": -1}, "workers must be 0 or more"),
    ],
)
def test_eval_options_validate_themselves(bad: dict, message: str):
    with pytest.raises(UsageError) as exc:
        EvalOptions(**bad)
    assert message in str(exc.value)
