"""The Python API: ``clipcap_cli.load_model(...)`` -> Captioner with ``.caption`` and ``.encode``."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import clipcap_cli
from clipcap_cli.captioner import Captioner
from clipcap_cli.data.images import ImageError, open_rgb
from clipcap_cli.decoding.decode import DecodingOptions, DecodingResult
from clipcap_cli.errors import ModelNotAvailableError

FAST = {"max_length": 6}


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint) -> Captioner:
    return clipcap_cli.load_model(str(tiny_checkpoint), device="cpu")


def test_load_model_holds_everything(captioner, tiny_config):
    assert isinstance(captioner, Captioner)
    assert captioner.config.clip_model == tiny_config.clip_model and captioner.config.prefix_length == 4
    assert captioner.device == torch.device("cpu") and len(captioner.tokenizer) == 50257
    assert not captioner.model.training and "mlp" in repr(captioner)


def test_encode_is_the_extraction_path(captioner, images):
    paths = [images["rgb"], images["exif"], images["cmyk"]]
    emb = captioner.encode(paths)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    # the same as open_rgb -> CLIP preprocess -> encode_image, one image at a time
    manual = torch.cat(
        [captioner.clip_model.encode_image(captioner.preprocess_image(open_rgb(p))[None]) for p in paths]
    )
    torch.testing.assert_close(emb, manual.detach(), rtol=1e-5, atol=1e-5)
    # CLIP sees the EXIF-rotated image (30x60 stored, shown 60x30): preprocessing differs from the raw pixels
    raw = captioner.preprocess_image(Image.open(images["exif"]).convert("RGB"))
    assert not torch.allclose(raw, captioner.preprocess(images["exif"]))


def test_caption_accepts_paths_pil_and_bytes(captioner, images):
    by_path = captioner.caption([images["rgb"], str(images["palette"])], **FAST)
    assert len(by_path) == 2 and all(isinstance(r, DecodingResult) for r in by_path)
    pil = captioner.caption([Image.open(images["rgb"]), Image.open(images["palette"])], **FAST)
    raw = captioner.caption([images["rgb"].read_bytes(), images["palette"].read_bytes()], **FAST)
    assert [r.text for r in by_path] == [r.text for r in pil] == [r.text for r in raw]
    single = captioner.caption(images["rgb"], **FAST)  # one image, not in a list
    assert [r.text for r in single] == [by_path[0].text]
    assert captioner.caption([], **FAST) == []


def test_caption_equals_decode_of_encode(captioner, images):
    paths = list(images.values())
    options = DecodingOptions(strategy="beam", beam_size=3, num_captions=2, max_length=6)
    via_caption = captioner.caption(paths, options)
    via_decode = captioner.decode(captioner.encode(paths), options)
    assert [r.texts for r in via_caption] == [r.texts for r in via_decode]
    assert all(len(r.texts) == 2 for r in via_caption)


def test_batch_size_and_sampling_seed(captioner, images):
    paths = list(images.values())
    a = captioner.caption(paths, strategy="sample", seed=11, top_p=0.9, batch_size=2, **FAST)
    b = captioner.caption(paths, strategy="sample", seed=11, top_p=0.9, batch_size=16, **FAST)
    assert [r.text for r in a] == [r.text for r in b]
    c = captioner.caption(paths, strategy="sample", seed=12, top_p=0.9, **FAST)
    assert [r.text for r in c] != [r.text for r in a]


def test_unreadable_image_raises(captioner, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    with pytest.raises(ImageError):
        captioner.caption([bad])


def test_overrides_change_the_config(tiny_checkpoint):
    normalized = clipcap_cli.load_model(str(tiny_checkpoint), device="cpu", normalize_prefix=True)
    assert normalized.config.normalize_prefix is True


def test_missing_registry_model_offline(images):
    with pytest.raises(ModelNotAvailableError, match="coco"):
        clipcap_cli.load_model("coco")


def test_frozen_lm_transformer_checkpoint(tiny_transformer_checkpoint, images):
    model = clipcap_cli.load_model(str(tiny_transformer_checkpoint), device="cpu")
    assert model.config.mapping == "transformer" and model.config.normalize_prefix
    results = model.caption([images["rgb"], images["gray"]], strategy="beam", beam_size=2, **FAST)
    assert all(r.text and len(r.tokens) <= 6 for r in results)


# --------------------------------------------------------------------------- the stream


def test_stream_reports_bad_inputs_and_goes_on(captioner, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    inputs = [images["rgb"], bad, images["gray"].read_bytes(), tmp_path / "missing.png", images["cmyk"]]
    out = list(captioner.stream(inputs, DecodingOptions(max_length=6), batch_size=2, embeddings=True))
    assert [o.index for o in out] == [0, 1, 2, 3, 4]
    assert [o.error is None for o in out] == [True, False, True, False, True]
    assert "not an image" in out[1].error and str(bad) not in out[1].error  # the name is the caller's to add
    assert out[1].result is None and out[1].embedding is None
    good = [images["rgb"], images["gray"], images["cmyk"]]
    assert [o.result.text for o in out if o.result] == [r.text for r in captioner.caption(good, **FAST)]
    torch.testing.assert_close(torch.stack([o.embedding for o in out if o.result]), captioner.encode(good))


def test_stream_is_lazy(captioner, images):
    import itertools

    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield images["rgb"]

    first = list(
        itertools.islice(captioner.stream(endless(), DecodingOptions(max_length=4), batch_size=3, workers=0), 4)
    )
    assert [o.index for o in first] == [0, 1, 2, 3] and len(pulled) <= 7  # two batches read, not forever


def test_stream_of_embeddings_is_decode(captioner, images):
    emb = captioner.encode([images["rgb"], images["exif"], images["palette"]])
    options = DecodingOptions(strategy="beam", beam_size=2, max_length=6)
    streamed = [
        o.result for o in captioner.stream(list(emb.half()), options, batch_size=2)
    ]  # stored fp16, as extract on a GPU
    assert [r.text for r in streamed] == [r.text for r in captioner.decode(emb.half().float(), options)]


def test_stream_workers_and_seed_ids(captioner, images):
    paths = list(images.values())
    options = DecodingOptions(strategy="sample", seed=3, max_length=6)
    serial = [o.result.text for o in captioner.stream(paths, options, batch_size=3, workers=0)]
    parallel = [o.result.text for o in captioner.stream(paths, options, batch_size=3, workers=2)]
    assert serial == parallel == [r.text for r in captioner.caption(paths, options, batch_size=5)]
    # seed ids decide the samples: the same image under the same id gives the same caption
    same = [o.result.text for o in captioner.stream([paths[0]] * 3, options, seed_id=lambda _: 7)]
    assert len(set(same)) == 1


def test_batches_never_mix_groups(images):
    from clipcap_cli.data.inputs import load_batches

    class Item:
        def __init__(self, group):
            self.group = group

        def open_image(self):
            from clipcap_cli.data.images import open_rgb

            return open_rgb(images["rgb"])

    transform = lambda im: torch.zeros(3, 4, 4)  # noqa: E731
    batches = list(load_batches([Item(g) for g in "aaabbc"], transform, batch_size=2, group_of=lambda it: it.group))
    assert [b.indices for b in batches] == [[0, 1], [2], [3, 4], [5]]
    assert all(b.pixels.shape[0] == len(b.indices) for b in batches)
