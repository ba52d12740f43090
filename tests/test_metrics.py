"""COCO caption metrics: known answers, agreement with pycocoevalcap, and the score() contract.

pycocoevalcap is a test dependency, so the cross-checks run in CI; the Java parts (PTBTokenizer,
METEOR) are skipped with a reason when ``java`` is not on PATH. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
from pathlib import Path

import pytest
from paper_table import PAPER_TABLE1

from clipcap_cli.errors import UsageError
from clipcap_cli.eval import metrics as M
from clipcap_cli.eval.metrics_java import SPICE_CORENLP_JARS

requires_java = pytest.mark.usefixtures("java")  # skipped without Java, failed in CI (conftest.need_tool)

BETA2 = 1.2**2  # ROUGE-L's beta squared


# --------------------------------------------------------------------------------------------
# Known answers, worked out by hand
# --------------------------------------------------------------------------------------------


def test_bleu_and_rouge_by_hand() -> None:
    hyp = "a cat sat on the mat"  # 6 words
    ref = "the cat is sitting on the red mat"  # 8 words
    # Unigrams: cat, on, the, mat match (the hypothesis has one "the") -> 4 of 6.
    # Bigrams: a-cat cat-sat sat-on on-the the-mat; only on-the is in the reference -> 1 of 5.
    # Brevity penalty: c=6 < r=8 -> exp(1 - 8/6).
    bp = math.exp(1 - 8 / 6)
    b1, b2, b3, b4 = M.bleu([[ref]], [hyp])
    assert b1.corpus == pytest.approx(4 / 6 * bp, rel=1e-8)
    assert b2.corpus == pytest.approx(math.sqrt(4 / 6 * 1 / 5) * bp, rel=1e-8)
    # No trigram matches: the 1e-15 smoothing makes it tiny, not exactly zero (as pycocoevalcap).
    assert 0 < b3.corpus < 1e-4 and 0 < b4.corpus < b3.corpus
    assert b1.per_image == pytest.approx([b1.corpus], rel=1e-12)

    # LCS = "cat on the mat" = 4 -> P = 4/6, R = 4/8, F = (1 + b^2) P R / (R + b^2 P).
    p, r = 4 / 6, 4 / 8
    rouge = M.rouge_l([[ref]], [hyp])
    assert rouge.corpus == pytest.approx((1 + BETA2) * p * r / (r + BETA2 * p), rel=1e-12)
    assert rouge.corpus == pytest.approx(0.5570776, abs=1e-7)


def test_bleu_closest_reference_length_ties_go_to_the_shorter_one() -> None:
    # Hypothesis of 7 words, references of 5 and 9 words: both at distance 2, pycocoevalcap picks 5,
    # so there is no brevity penalty (with 9 it would be exp(1 - 9/7) = 0.75).
    hyp = "a b c d e f g"
    refs = ["a b c x y", "a b c d e f g h i"]
    b1 = M.bleu([refs], [hyp])[0]
    assert b1.corpus == pytest.approx(1.0, abs=1e-8)


def test_rouge_l_maximises_precision_and_recall_separately() -> None:
    # ref 1: LCS 3 -> P = 1, R = 1/2; ref 2: LCS 1 -> P = 1/3, R = 1. Max P = max R = 1 -> F = 1,
    # although no single reference matches fully (pycocoevalcap's behaviour).
    assert M.rouge_l([["a b c d e f", "a"]], ["a b c"]).corpus == pytest.approx(1.0)


def test_cider_by_hand() -> None:
    # Two images, one reference each. Every n-gram occurs in the references of exactly one of the
    # two images, so each TF-IDF weight is tf * (log 2 - log 1). A hypothesis equal to its reference
    # has cosine 1 for unigrams and bigrams, 0 for the (absent) 3- and 4-grams, no length penalty:
    # mean(1, 1, 0, 0) / 1 reference * 10 = 5.
    refs = [["a b"], ["c d"]]
    result = M.cider_d(refs, ["a b", "c d"])
    assert result.per_image == pytest.approx([5.0, 5.0])
    assert result.corpus == pytest.approx(5.0)
    # A hypothesis sharing nothing with its references scores 0.
    assert M.cider_d(refs, ["a b", "a b"]).per_image == pytest.approx([5.0, 0.0])


def test_cider_length_penalty_and_clipping() -> None:
    # Repeating a word cannot beat the reference (clipping: min(hyp, ref) * ref), and a longer
    # hypothesis is penalised by exp(-delta^2 / 72) with delta the difference in bigram counts.
    refs = [["a b"], ["c d"]]
    exact = M.cider_d(refs, ["a b", "c d"]).per_image[0]
    repeated = M.cider_d(refs, ["a a b b", "c d"]).per_image[0]
    assert repeated < exact
    longer = M.cider_d(refs, ["a b x", "c d"]).per_image[0]
    # Unigrams: hyp (a, b, x) vs ref (a, b); x has df 0 -> weight log 2 too. cos = 2 / (sqrt 3 sqrt 2).
    # Bigrams: hyp (a b, b x) vs (a b): cos = 1 / sqrt 2. Bigram counts 2 vs 1 -> delta = 1.
    expected = (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72) * 10
    assert longer == pytest.approx(expected, rel=1e-12)


def test_single_image_cider_is_zero_and_says_why() -> None:
    result = M.score(
        {"x": ["a dog on the grass"]},
        {"x": "a dog on the grass"},
        metrics=["CIDEr", "BLEU-1"],
        backend="python",
        tokenizer="ptb-python",
    )
    assert result.scores["CIDEr"] == 0.0
    assert result.scores["BLEU-1"] == pytest.approx(1.0, abs=1e-8)
    assert any("single image" in note for note in result.notes)


# --------------------------------------------------------------------------------------------
# Agreement with pycocoevalcap's own scorers
# --------------------------------------------------------------------------------------------


def _random_corpus(seed: int, n_images: int) -> tuple[list[list[str]], list[str]]:
    """Captions from a small vocabulary (so n-grams overlap), 1-5 references per image, some empty
    hypotheses, varied lengths: enough to exercise clipping, brevity and length penalties."""
    rng = random.Random(seed)
    vocab = (
        "a an the man woman dog cat two on in with of near sitting standing red green "
        "field grass table plate food and is are holding ball"
    ).split()
    refs, hyps = [], []
    for _ in range(n_images):
        refs.append([" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 16))) for _ in range(rng.randint(1, 5))])
        length = 0 if rng.random() < 0.05 else rng.randint(1, 16)
        hyps.append(" ".join(rng.choice(vocab) for _ in range(length)))
    return refs, hyps


def test_pure_python_matches_pycocoevalcap_scorers() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, hyps = _random_corpus(seed=1234, n_images=300)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}

    ours_bleu = M.bleu(refs, hyps)
    their_bleu, their_bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        assert ours_bleu[k].corpus == pytest.approx(their_bleu[k], abs=1e-6)
        assert ours_bleu[k].per_image == pytest.approx(their_bleu_per_image[k], abs=1e-6)

    ours_rouge = M.rouge_l(refs, hyps)
    their_rouge, their_rouge_per_image = Rouge().compute_score(gts, res)
    assert ours_rouge.corpus == pytest.approx(float(their_rouge), abs=1e-6)
    assert ours_rouge.per_image == pytest.approx(list(their_rouge_per_image), abs=1e-6)

    ours_cider = M.cider_d(refs, hyps)
    their_cider, their_cider_per_image = Cider().compute_score(gts, res)
    assert ours_cider.corpus == pytest.approx(float(their_cider), abs=1e-6)
    assert ours_cider.per_image == pytest.approx(list(their_cider_per_image), abs=1e-6)
    assert ours_cider.corpus > 0.05  # the corpus really overlaps: not a trivial all-zero agreement


def test_backends_agree_through_score() -> None:
    pytest.importorskip("pycocoevalcap")
    refs, hyps = _random_corpus(seed=7, n_images=120)
    references = {f"img{i}": r for i, r in enumerate(refs)}
    predictions = {f"img{i}": h for i, h in enumerate(hyps)}
    wanted = ["BLEU", "ROUGE-L", "CIDEr"]
    ours = M.score(references, predictions, metrics=wanted, backend="python", tokenizer="none", per_image=True)
    theirs = M.score(references, predictions, metrics=wanted, backend="pycocoevalcap", tokenizer="none", per_image=True)
    assert set(ours.backends.values()) == {"python"}
    assert set(theirs.backends.values()) == {"pycocoevalcap"}
    assert list(ours.scores) == [*M.BLEU_NAMES, "ROUGE-L", "CIDEr"]
    for name, value in ours.scores.items():
        assert value == pytest.approx(theirs.scores[name], abs=1e-6)
    assert ours.per_image is not None and theirs.per_image is not None
    for key in references:
        assert ours.per_image[key] == pytest.approx(theirs.per_image[key], abs=1e-6)


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

SIMPLE_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park!",
    "A black-and-white photo of a train station.",
    "The cat's toy is under the bed.",
    "A woman isn't wearing a hat; she's holding an umbrella.",
    "Is this a giraffe?",
    "A plate of food (pasta, broccoli and cheese).",
    'A sign that says "STOP" on a pole.',
    "A 747 airplane flying at 5:30 p.m. over the U.S. city.",
    "Three people, two bikes and 1,000 birds...",
    "A man in a t-shirt - holding a 3.5 inch phone.",
    "Kids' toys on the floor -- all over.",
    "Mr. Smith's dog can't catch the ball.",
    "A bowl of fruit: apples, oranges & bananas.",
    "  Extra   spaces   everywhere  ",
    "UPPER CASE CAPTION WITH NUMBERS 123",
    "A close-up of a pizza with 50% pepperoni for $5.",
    "A 'vintage' car parked on the street.",
    "[A bracketed] {caption} here.",
    "A dog - or is it a wolf? - runs in the snow.",
    "They're playing tennis; we've watched.",
    "It's 10 o'clock and the clock tower shows it.",
    "A cat sitting on a laptop keyboard",
    "",
    "...",
    "A giraffe standing next to a tree?!",
    "A man cannot fit in the tiny car.",
    "An x-ray of a hand, e.g. a child's.",
    "Caf\u00e9 with na\u00efve d\u00e9cor.",
    "Two zebras grazing\u2014side by side\u2014in a field.",
    "\u201cCurly quotes\u201d around \u2018words\u2019 here.",
    "He said: don't touch!",
    "The 1990s style room; the '80s posters.",
    "a tennis player swings his racket at the ball .",
]


def test_python_tokenizer_known_outputs() -> None:
    tok = M.ptb_tokenize_python
    assert tok("A dog's ball (red), isn't it?") == "a dog 's ball -lrb- red -rrb- is n't it"
    assert tok("Two men -- one in a t-shirt -- at 5:30 p.m.") == "two men one in a t-shirt at 5:30 p.m."
    assert tok('He said "hi"; she can\'t...') == "he said hi she ca n't"
    assert tok("1,000 birds, 3.5 cm, 50% off") == "1,000 birds 3.5 cm 50 % off"
    assert tok("Really?!") == "really ?!"  # PTB keeps "?!" as one token, not in the removal list
    assert tok("") == ""
    assert tok(" . , ; ") == ""


@requires_java
def test_java_ptb_and_python_tokenizers_agree_on_simple_captions() -> None:
    pytest.importorskip("pycocoevalcap")
    java_tokens, used, note = M.tokenize(SIMPLE_CAPTIONS, "ptb-java")
    assert used == "ptb-java" and note is None
    python_tokens = [M.ptb_tokenize_python(c) for c in SIMPLE_CAPTIONS]
    mismatches = [(c, j, p) for c, j, p in zip(SIMPLE_CAPTIONS, java_tokens, python_tokens) if j != p]
    assert not mismatches


@requires_java
def test_java_tokenizer_matches_pycocoevalcap_wrapper() -> None:
    """Our Java call (temp file outside site-packages) gives what pycocoevalcap's wrapper gives."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    package_dir = M.pycocoevalcap_dir()
    assert package_dir is not None
    if not os.access(package_dir / "tokenizer", os.W_OK):
        pytest.skip("pycocoevalcap's tokenizer folder is read-only: its wrapper cannot write its temp file")
    captions = SIMPLE_CAPTIONS
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    ours, used, _ = M.tokenize(captions, "ptb-java")
    assert used == "ptb-java"
    assert ours == [theirs[i][0] for i in range(len(captions))]


def test_tokenizer_choice_is_reported_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert M.tokenize(["A Dog."], "none") == (["A Dog."], "none", None)
    assert M.tokenize(["A Dog."], "ptb-python") == (["a dog"], "ptb-python", None)
    with pytest.raises(M.MetricsInputError, match="unknown tokenizer"):
        M.tokenize(["x"], "spacy")
    monkeypatch.setattr(M, "java_path", lambda: None)
    tokens, used, note = M.tokenize(["A Dog."], "auto")
    assert (tokens, used) == (["a dog"], "ptb-python") and note and "java" in note
    with pytest.raises(M.BackendUnavailableError, match="java"):
        M.tokenize(["A Dog."], "ptb-java")


# --------------------------------------------------------------------------------------------
# score(): keys, empty captions, availability
# --------------------------------------------------------------------------------------------

REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer riding a large wave in the ocean."],
    2: ["Two dogs play in the grass.", "A pair of dogs running on a lawn."],
    3: ["A plate of food with broccoli and rice.", "A meal on a white plate."],
    4: ["A red bus parked on the street.", "A double decker bus on a city road."],
    5: ["A cat sleeping on a laptop.", "A kitten lying on a computer keyboard."],
}
PREDICTIONS = {
    1: "a man riding a wave on a surfboard",
    2: "two dogs running in the grass",
    3: "a plate of food with broccoli",
    4: "a red bus on the street",
    5: "a cat on a laptop",
}


def test_mismatched_keys_raise_a_clear_value_error() -> None:
    predictions = {1: PREDICTIONS[1], 2: PREDICTIONS[2], "extra": "a caption"}
    with pytest.raises(M.KeyMismatchError) as info:
        M.score(REFERENCES, predictions, backend="python", tokenizer="ptb-python")
    error = info.value
    assert isinstance(error, ValueError)
    message = str(error)
    assert "3 of 5 reference keys have no prediction (e.g. 3, 4, 5)" in message
    assert "1 of 3 prediction keys have no references (e.g. 'extra')" in message
    assert "allow_missing=True" in message and "2 common keys" in message
    assert error.missing_predictions == (3, 4, 5) and error.unreferenced_predictions == ("extra",)
    # Only three examples, then an ellipsis.
    many = {i: ["a caption"] for i in range(10)}
    expected = r"10 of 10 reference keys have no prediction \(e\.g\. 0, 1, 2, \.\.\.\)"
    with pytest.raises(M.KeyMismatchError, match=expected):
        M.score(many, {"z": "x"}, backend="python", tokenizer="ptb-python")


def test_allow_missing_scores_the_intersection_and_reports_counts() -> None:
    predictions = {1: PREDICTIONS[1], 2: PREDICTIONS[2], 4: PREDICTIONS[4], "extra": "a caption"}
    result = M.score(REFERENCES, predictions, allow_missing=True, backend="python", tokenizer="ptb-python")
    assert (result.n_images, result.n_references) == (3, 6)
    assert (result.n_missing_predictions, result.n_unreferenced_predictions) == (2, 1)
    common = M.score(
        {k: REFERENCES[k] for k in (1, 2, 4)},
        {k: PREDICTIONS[k] for k in (1, 2, 4)},
        backend="python",
        tokenizer="ptb-python",
    )
    assert result.scores == common.scores
    with pytest.raises(M.KeyMismatchError, match="no common keys"):
        M.score(REFERENCES, {"other": "x"}, allow_missing=True, backend="python", tokenizer="ptb-python")


def test_empty_predictions_score_zero() -> None:
    predictions = dict(PREDICTIONS)
    predictions[3] = ""
    result = M.score(REFERENCES, predictions, backend="python", tokenizer="ptb-python", per_image=True)
    assert result.per_image is not None
    assert all(value == 0.0 for value in result.per_image[3].values())
    assert all(value > 0 for value in result.per_image[1].values())

    all_empty = M.score(REFERENCES, {k: "" for k in REFERENCES}, backend="python", tokenizer="ptb-python")
    assert set(all_empty.scores) == {*M.BLEU_NAMES, "ROUGE-L", "CIDEr"}
    assert all(value == 0.0 for value in all_empty.scores.values())
    # Punctuation only tokenises to nothing, too.
    assert (
        M.score(REFERENCES, {k: "..." for k in REFERENCES}, backend="python", tokenizer="ptb-python").scores["BLEU-1"]
        == 0.0
    )


def test_result_contents_and_per_image_scores() -> None:
    result = M.score(REFERENCES, PREDICTIONS, backend="python", tokenizer="ptb-python", per_image=True)
    assert result.tokenizer == "ptb-python"
    assert list(result.scores) == [*M.BLEU_NAMES, "ROUGE-L", "CIDEr"]
    assert result.backends == {name: "python" for name in result.scores}
    assert set(result.unavailable) == {"METEOR", "SPICE"}
    assert all("backend='python'" in reason for reason in result.unavailable.values())
    assert (result.n_images, result.n_references) == (5, 10)
    assert result.per_image is not None and list(result.per_image) == list(REFERENCES)
    # Per-image values are the ones the corpus values come from (ROUGE-L and CIDEr are means).
    for name in ("ROUGE-L", "CIDEr"):
        values = [result.per_image[k][name] for k in REFERENCES]
        assert result.scores[name] == pytest.approx(sum(values) / len(values))
    assert 0 < result.scores["BLEU-4"] < result.scores["BLEU-1"] <= 1
    assert result.as_percent()["BLEU-4"] == pytest.approx(100 * result.scores["BLEU-4"])
    json.dumps(result.to_dict())  # JSON-friendly
    assert M.score(REFERENCES, PREDICTIONS, backend="python", tokenizer="ptb-python").per_image is None


def test_metric_selection_and_bad_arguments() -> None:
    # Library callers catch ValueError; the CLI shows a one-line usage error (exit code 2).
    assert issubclass(M.MetricsInputError, ValueError) and issubclass(M.MetricsInputError, UsageError)
    assert issubclass(M.KeyMismatchError, M.MetricsInputError)
    result = M.score(REFERENCES, PREDICTIONS, metrics=["cider", "BLEU-4"], backend="python", tokenizer="ptb-python")
    assert list(result.scores) == ["BLEU-4", "CIDEr"] and result.unavailable == {}
    with pytest.raises(M.MetricsInputError, match="unknown metric"):
        M.score(REFERENCES, PREDICTIONS, metrics=["BLEURT"])
    with pytest.raises(M.MetricsInputError, match="unknown backend"):
        M.score(REFERENCES, PREDICTIONS, backend="java")
    with pytest.raises(M.MetricsInputError, match="list of captions"):
        M.score({1: "a plain string"}, {1: "a caption"}, tokenizer="ptb-python")
    with pytest.raises(M.MetricsInputError, match="non-empty"):
        M.score({1: []}, {1: "a caption"}, tokenizer="ptb-python")
    with pytest.raises(M.MetricsInputError, match="must be a string"):
        M.score({1: ["a"]}, {1: None}, tokenizer="ptb-python")  # type: ignore[dict-item]


def test_without_java_meteor_and_spice_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "java_path", lambda: None)
    result = M.score(REFERENCES, PREDICTIONS)
    assert result.tokenizer == "ptb-python"
    assert any("Java PTBTokenizer not used" in note for note in result.notes)
    assert set(result.scores) == {*M.BLEU_NAMES, "ROUGE-L", "CIDEr"}
    assert set(result.unavailable) == {"METEOR", "SPICE"}
    for reason in result.unavailable.values():
        assert "java" in reason.lower() and "\n" not in reason


def test_without_pycocoevalcap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "pycocoevalcap_dir", lambda: None)
    result = M.score(REFERENCES, PREDICTIONS)
    assert result.tokenizer == "ptb-python"
    assert set(result.unavailable) == {"METEOR", "SPICE"}
    assert all("pycocoevalcap" in reason for reason in result.unavailable.values())
    with pytest.raises(M.BackendUnavailableError, match=r"pip install 'clipcap-cli\[eval\]'"):
        M.score(REFERENCES, PREDICTIONS, backend="pycocoevalcap")
    # the same message, checked before any work, from the command line's own check
    from clipcap_cli.eval.evaluation import EvalOptions, check_scorers

    with pytest.raises(M.BackendUnavailableError, match=r"pip install 'clipcap-cli\[eval\]'"):
        check_scorers(EvalOptions(backend="pycocoevalcap"))


def test_spice_is_reported_unavailable_without_corenlp(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycocoevalcap's Spice() would download CoreNLP 3.6.0 here: we must report, not download."""
    pytest.importorskip("pycocoevalcap")
    package_dir = M.pycocoevalcap_dir()
    assert package_dir is not None
    if all((package_dir / "spice" / "lib" / name).is_file() for name in SPICE_CORENLP_JARS):
        pytest.skip("Stanford CoreNLP 3.6.0 is installed for SPICE here, so SPICE is available")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr("urllib.request.urlretrieve", no_download)
    monkeypatch.setattr(M, "java_path", lambda: "/usr/bin/java")  # so the jar check is what fails
    result = M.score(REFERENCES, PREDICTIONS, metrics=["SPICE", "BLEU-4"], tokenizer="ptb-python")
    assert list(result.scores) == ["BLEU-4"]
    reason = result.unavailable["SPICE"]
    assert "stanford-corenlp-3.6.0" in reason and "\n" not in reason


@requires_java
def test_a_failing_spice_run_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package folder whose jars exist but are not jars: java fails at once.
    (tmp_path / "bleu").mkdir()
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    (tmp_path / "spice" / "spice-1.0.jar").write_text("not a jar")
    for name in SPICE_CORENLP_JARS:
        (tmp_path / "spice" / "lib" / name).write_text("not a jar")
    monkeypatch.setattr(M, "pycocoevalcap_dir", lambda: tmp_path)
    result = M.score(REFERENCES, PREDICTIONS, metrics=["SPICE"], tokenizer="ptb-python")
    assert result.scores == {}
    assert result.unavailable["SPICE"].startswith("SPICE failed")
    assert "\n" not in result.unavailable["SPICE"]


@requires_java
def test_meteor_timeout_is_reported_not_raised() -> None:
    pytest.importorskip("pycocoevalcap")
    result = M.score(REFERENCES, PREDICTIONS, metrics=["METEOR"], tokenizer="ptb-python", java_timeout=0.3)
    assert result.scores == {}
    assert "timed out" in result.unavailable["METEOR"]


@requires_java
@pytest.mark.slow
def test_meteor_through_pycocoevalcap_java(capfd: pytest.CaptureFixture[str]) -> None:
    """METEOR (and the Java tokenizer) end to end, checked against pycocoevalcap's Meteor class;
    both JVMs run at the same time (each needs ~10 s to load METEOR's paraphrase table)."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.meteor.meteor import Meteor

    predictions = dict(PREDICTIONS)
    predictions[5] = ""  # an empty caption must not break the METEOR protocol
    keys = list(REFERENCES)
    flat = [c for k in keys for c in REFERENCES[k]] + [predictions[k] for k in keys]
    tokens, used, _ = M.tokenize(flat, "ptb-java")
    assert used == "ptb-java"
    gts = {k: tokens[2 * i : 2 * i + 2] for i, k in enumerate(keys)}
    res = {k: [tokens[2 * len(keys) + i]] for i, k in enumerate(keys)}
    theirs: dict[str, tuple[float, list[float]]] = {}

    def run_theirs() -> None:
        theirs["score"] = Meteor().compute_score(gts, res)

    thread = threading.Thread(target=run_theirs)
    thread.start()
    capfd.readouterr()
    result = M.score(REFERENCES, predictions, metrics=["METEOR", "BLEU-4"], per_image=True)
    captured = capfd.readouterr()
    thread.join(timeout=120)

    assert result.tokenizer == "ptb-java"
    assert result.backends == {"BLEU-4": "python", "METEOR": "pycocoevalcap-java"}
    assert (captured.out, captured.err) == ("", "")  # the core never prints, nor do its Java tools
    corpus, per_image = theirs["score"]
    assert result.scores["METEOR"] == pytest.approx(corpus, abs=1e-9)
    assert result.per_image is not None
    assert [result.per_image[k]["METEOR"] for k in keys] == pytest.approx(per_image, abs=1e-9)
    assert result.per_image[5]["METEOR"] == 0.0
    assert 0.2 < result.scores["METEOR"] < 0.6


def test_paper_table_is_the_papers() -> None:
    assert M.PAPER_TABLE1_COCO == PAPER_TABLE1  # every row and every value, against the paper
    assert all(set(row) <= set(M.METRIC_NAMES) for row in M.PAPER_TABLE1_COCO.values())
    assert M.PAPER_SCALE == 100.0
