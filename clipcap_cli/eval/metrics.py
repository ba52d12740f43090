"""COCO-caption-protocol metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and SPICE.

The numbers follow the MS-COCO caption evaluation code (``pycocoevalcap``), which is what the
ClipCap paper and most captioning papers report:

* captions are tokenised with Stanford's PTBTokenizer (CoreNLP 3.4.1, lower-cased) and the tokens
  in :data:`PTB_PUNCTUATIONS` are dropped;
* BLEU, ROUGE-L and CIDEr are computed here in pure Python, operation for operation like
  pycocoevalcap's ``bleu_scorer.py``, ``rouge.py`` and ``cider_scorer.py`` (quirks included, see the
  functions' docstrings), so they need neither Java nor the package;
* METEOR and SPICE exist only as Java programs bundled with pycocoevalcap: they are run when the
  package is importable and ``java`` is on PATH (``metrics_java``), and otherwise reported unavailable with a reason.

Scale: every value is on the scale pycocoevalcap returns: BLEU, METEOR, ROUGE-L and SPICE in
[0, 1], CIDEr on its own x10 scale (about 0..10, typically ~1.1 for a good COCO model). Papers,
including :data:`PAPER_TABLE1_COCO`, print all of them x100 (CIDEr 113.08 == 1.1308 here); use
:meth:`ScoreResult.as_percent` to compare.

Nothing in this module prints: the Java tools' output is captured and every outcome (which
tokenizer, which backend, why a metric is unavailable) is part of the returned :class:`ScoreResult`.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcap_cli.errors import BackendUnavailableError, KeyMismatchError, MetricsInputError
from clipcap_cli.eval.metrics_java import (
    DEFAULT_JAVA_TIMEOUT,
    INSTALL_EVAL,
    PTB_JAR,
    JavaToolError,
    java_path,
    meteor_java,
    meteor_unavailable_reason,
    pycocoevalcap_dir,
    run_java_ptb,
    spice_java,
    spice_unavailable_reason,
)
from clipcap_cli.eval.ngrams import MetricScores, bleu, cider_d, rouge_l
from clipcap_cli.eval.ptb import PTB_PUNCTUATIONS, ptb_tokenize_python
from clipcap_cli.eval.ptb import remove_punctuation as _remove_punctuation

__all__ = [
    "BLEU_NAMES",
    "METRIC_NAMES",
    "PAPER_TABLE1_COCO",
    "PAPER_SCALE",
    "PTB_PUNCTUATIONS",
    "TOKENIZERS",
    "BACKENDS",
    "MetricsInputError",
    "KeyMismatchError",
    "BackendUnavailableError",
    "MetricScores",
    "ScoreResult",
    "score",
    "resolve_metrics",
    "bleu",
    "rouge_l",
    "cider_d",
    "tokenize",
    "ptb_tokenize_python",
    "java_path",
    "pycocoevalcap_dir",
]

BLEU_NAMES: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_NAMES: tuple[str, ...] = (*BLEU_NAMES, "METEOR", "ROUGE-L", "CIDEr", "SPICE")

#: Tokenizer choices for :func:`score` / :func:`tokenize`. "auto" = "ptb-java" when possible.
TOKENIZERS: tuple[str, ...] = ("auto", "ptb-java", "ptb-python", "none")
#: Backend choices for :func:`score`.
BACKENDS: tuple[str, ...] = ("auto", "python", "pycocoevalcap")

#: ClipCap paper (Mokady et al., 2021), Table 1, COCO Karpathy test split. Values are x100
#: (see :data:`PAPER_SCALE`); ROUGE-L and BLEU-1..3 are not reported there.
PAPER_TABLE1_COCO: dict[str, dict[str, float]] = {
    "transformer_frozen_gpt2": {"BLEU-4": 33.53, "METEOR": 27.45, "CIDEr": 113.08, "SPICE": 21.05},
    "mlp_gpt2_tuning": {"BLEU-4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12},
    "ablation_transformer_gpt2_tuning": {"BLEU-4": 32.22, "METEOR": 27.79, "CIDEr": 109.83, "SPICE": 20.63},
    "ablation_mlp_frozen_gpt2": {"BLEU-4": 27.39, "METEOR": 24.4, "CIDEr": 92.38, "SPICE": 18.04},
}
#: Multiply :func:`score` values by this to compare with :data:`PAPER_TABLE1_COCO`.
PAPER_SCALE = 100.0


# --------------------------------------------------------------------------------------------
# Errors and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`score` returns. Values use pycocoevalcap's scale (see the module docstring)."""

    #: Metric name -> corpus value, for the metrics that could be computed (in METRIC_NAMES order).
    scores: dict[str, float]
    #: Images (keys) scored, and reference captions over those images.
    n_images: int
    n_references: int
    #: Reference keys without a prediction / prediction keys without references (allow_missing).
    n_missing_predictions: int
    n_unreferenced_predictions: int
    #: "ptb-java", "ptb-python" or "none".
    tokenizer: str
    #: Metric name -> "python" | "pycocoevalcap" (its Python scorer) | "pycocoevalcap-java" (its jar).
    backends: dict[str, str]
    #: Metric name -> one-line reason, for requested metrics that could not be computed.
    unavailable: dict[str, str]
    #: Key -> metric name -> value, when ``per_image=True`` (else None).
    per_image: dict[Any, dict[str, float]] | None = None
    #: Things worth knowing about this run (fallbacks taken, degenerate inputs).
    notes: tuple[str, ...] = field(default=())

    def as_percent(self) -> dict[str, float]:
        """The scores x100, the scale of papers and :data:`PAPER_TABLE1_COCO`."""
        return {name: value * PAPER_SCALE for name, value in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (per-image keys turned into strings)."""
        return {
            "scores": dict(self.scores),
            "n_images": self.n_images,
            "n_references": self.n_references,
            "n_missing_predictions": self.n_missing_predictions,
            "n_unreferenced_predictions": self.n_unreferenced_predictions,
            "tokenizer": self.tokenizer,
            "backends": dict(self.backends),
            "unavailable": dict(self.unavailable),
            "per_image": None if self.per_image is None else {str(k): dict(v) for k, v in self.per_image.items()},
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# Can the chosen backend run here (java and pycocoevalcap: see metrics_java)
# --------------------------------------------------------------------------------------------


def check_backends(backend: str, tokenizer: str) -> None:
    """The one check that an explicitly chosen backend and tokenizer can run here (``auto`` always can:
    it falls back); ``BackendUnavailableError`` says what to install."""
    if backend == "pycocoevalcap" and pycocoevalcap_dir() is None:
        raise BackendUnavailableError(f"backend 'pycocoevalcap' needs the pycocoevalcap package ({INSTALL_EVAL})")
    if tokenizer == "ptb-java" and (pycocoevalcap_dir() is None or java_path() is None):
        raise BackendUnavailableError(
            f"tokenizer 'ptb-java' needs the pycocoevalcap package ({INSTALL_EVAL}) and Java on PATH"
        )


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def tokenize(
    captions: Sequence[str], tokenizer: str = "auto", *, timeout: float = DEFAULT_JAVA_TIMEOUT
) -> tuple[list[str], str, str | None]:
    """Tokenise captions the COCO way. Returns (tokenised captions, tokenizer used, note).

    ``tokenizer``: "auto" (Java PTBTokenizer when pycocoevalcap and java are available, else the
    Python imitation), "ptb-java" (raise :class:`BackendUnavailableError` if it cannot run),
    "ptb-python", or "none" (captions are already tokenised: used as they are). The note says
    why "auto" fell back to Python (None otherwise).
    """
    if tokenizer not in TOKENIZERS:
        raise MetricsInputError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if tokenizer == "none":
        return list(captions), "none", None
    if tokenizer == "ptb-python":
        return [ptb_tokenize_python(c) for c in captions], "ptb-python", None

    package_dir, java = pycocoevalcap_dir(), java_path()
    reason: str | None = None
    if package_dir is None:
        reason = "pycocoevalcap is not installed"
    elif java is None:
        reason = "no 'java' on PATH"
    elif not (package_dir / "tokenizer" / PTB_JAR).is_file():
        reason = f"{package_dir / 'tokenizer' / PTB_JAR} is missing"
    else:
        try:
            raw = run_java_ptb(java, package_dir / "tokenizer" / PTB_JAR, captions, timeout)
            return [_remove_punctuation(line) for line in raw], "ptb-java", None
        except JavaToolError as exc:
            reason = str(exc)
    if tokenizer == "ptb-java":
        raise BackendUnavailableError(f"the Java PTBTokenizer cannot run: {reason}")
    note = f"Java PTBTokenizer not used ({reason}); tokenised with the Python imitation"
    return [ptb_tokenize_python(c) for c in captions], "ptb-python", note


# --------------------------------------------------------------------------------------------
# pycocoevalcap's own Python scorers (backend="pycocoevalcap")
# --------------------------------------------------------------------------------------------


def _pycocoevalcap_python_scores(
    names: Sequence[str], references: Sequence[Sequence[str]], hypotheses: Sequence[str]
) -> dict[str, MetricScores]:
    """BLEU / ROUGE-L / CIDEr through the package's classes (verbose off: they would print)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [hyp] for i, hyp in enumerate(hypotheses)}
    out: dict[str, MetricScores] = {}
    if any(name in BLEU_NAMES for name in names):
        corpus, per_image = Bleu(4).compute_score(gts, res, verbose=0)
        for k, name in enumerate(BLEU_NAMES):
            out[name] = MetricScores(float(corpus[k]), [float(x) for x in per_image[k]])
    if "ROUGE-L" in names:
        corpus, per_image = Rouge().compute_score(gts, res)
        out["ROUGE-L"] = MetricScores(float(corpus), [float(x) for x in per_image])
    if "CIDEr" in names:
        corpus, per_image = Cider().compute_score(gts, res)
        out["CIDEr"] = MetricScores(float(corpus), [float(x) for x in per_image])
    return out


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def _examples(keys: Sequence[Hashable], limit: int = 3) -> str:
    try:
        ordered = sorted(keys)  # type: ignore[type-var]
    except TypeError:
        ordered = list(keys)
    return ", ".join(repr(k) for k in ordered[:limit]) + (", ..." if len(ordered) > limit else "")


def resolve_metrics(metrics: Iterable[str] | None) -> list[str]:
    """Metric names as a user gives them (any case; "BLEU" = BLEU-1..4; None = all), in METRIC_NAMES order."""
    if metrics is None:
        return list(METRIC_NAMES)
    if isinstance(metrics, str):
        metrics = [metrics]
    by_lower = {name.lower(): name for name in METRIC_NAMES}
    wanted: set[str] = set()
    for name in metrics:
        if name.lower() == "bleu":
            wanted.update(BLEU_NAMES)
        elif name.lower() in by_lower:
            wanted.add(by_lower[name.lower()])
        else:
            raise MetricsInputError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)} (or BLEU)")
    return [name for name in METRIC_NAMES if name in wanted]


def score(
    references: Mapping[Any, Sequence[str]],
    predictions: Mapping[Any, str],
    *,
    metrics: Iterable[str] | None = None,
    backend: str = "auto",
    tokenizer: str = "auto",
    per_image: bool = False,
    allow_missing: bool = False,
    java_timeout: float = DEFAULT_JAVA_TIMEOUT,
) -> ScoreResult:
    """Score predicted captions against reference captions with the COCO caption protocol.

    ``references`` maps a key (e.g. an image id) to its reference captions, ``predictions`` maps
    the same keys to one predicted caption each. Keys must match exactly, else
    :class:`KeyMismatchError`; with ``allow_missing=True`` only the common keys are scored (and
    CIDEr's document frequencies come from their references) and the counts are reported.

    ``metrics``: names from :data:`METRIC_NAMES` ("BLEU" = all four), default all.
    ``backend``: "auto" (BLEU/ROUGE-L/CIDEr in pure Python, METEOR/SPICE via pycocoevalcap's jars
    when Java is there), "python" (pure Python only: METEOR and SPICE unavailable) or
    "pycocoevalcap" (also BLEU/ROUGE-L/CIDEr through the package's classes; it must be installed).
    ``tokenizer``: see :func:`tokenize`. ``java_timeout`` bounds each Java tool run, in seconds.
    Metrics that cannot run are listed in ``unavailable`` with a reason; nothing is printed.
    """
    if backend not in BACKENDS:
        raise MetricsInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    names = resolve_metrics(metrics)
    keys, missing, extra = _common_keys(references, predictions, allow_missing)
    ref_lists = _reference_lists(references, predictions, keys)
    check_backends(backend, "auto")  # the tokenizer falls back on its own (see tokenize)
    package_dir = pycocoevalcap_dir()

    # Tokenise references and predictions in one run (lines are independent), then split them back.
    ref_counts = [len(refs) for refs in ref_lists]
    flat = [caption for refs in ref_lists for caption in refs] + [predictions[k] for k in keys]
    tokenised, tokenizer_used, note = tokenize(flat, tokenizer, timeout=java_timeout)
    notes: list[str] = [note] if note else []
    bounds = [0, *itertools.accumulate(ref_counts)]
    tok_refs = [tokenised[a:b] for a, b in zip(bounds, bounds[1:])]
    tok_hyps = tokenised[bounds[-1] :]

    results, backends = _n_gram_scores(names, backend, tok_refs, tok_hyps)
    if "CIDEr" in names and len(keys) == 1:
        notes.append("CIDEr is 0 for a single image: its IDF comes from the evaluated set (log 1 = 0)")
    unavailable: dict[str, str] = {}
    for name in ("METEOR", "SPICE"):
        if name not in names:
            continue
        if backend == "python":
            unavailable[name] = (
                f"{name} has no pure-Python implementation (backend='python'); it needs pycocoevalcap and Java"
            )
            continue
        try:
            results[name], note = _java_score(name, package_dir, tok_refs, tok_hyps, java_timeout)
            backends[name] = "pycocoevalcap-java"
            notes += [note] if note else []
        except JavaToolError as exc:
            unavailable[name] = str(exc)

    scores = {name: results[name].corpus for name in names if name in results}
    per_image_scores: dict[Any, dict[str, float]] | None = None
    if per_image:
        per_image_scores = {key: {name: results[name].per_image[i] for name in scores} for i, key in enumerate(keys)}
    return ScoreResult(
        scores=scores,
        n_images=len(keys),
        n_references=sum(ref_counts),
        n_missing_predictions=len(missing),
        n_unreferenced_predictions=len(extra),
        tokenizer=tokenizer_used,
        backends={name: backends[name] for name in scores},
        unavailable=unavailable,
        per_image=per_image_scores,
        notes=tuple(notes),
    )


def _common_keys(
    references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str], allow_missing: bool
) -> tuple[list[Any], list[Any], list[Any]]:
    """(keys to score, reference keys without a prediction, prediction keys without references)."""
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    keys = [k for k in references if k in predictions]
    if (missing or extra) and (not allow_missing or not keys):
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} of {len(references)} reference keys have no prediction (e.g. {_examples(missing)})"
            )
        if extra:
            parts.append(
                f"{len(extra)} of {len(predictions)} prediction keys have no references (e.g. {_examples(extra)})"
            )
        hint = (
            f"; pass allow_missing=True to score the {len(keys)} common keys"
            if keys and not allow_missing
            else "; there are no common keys to score"
        )
        raise KeyMismatchError("references and predictions do not match: " + "; ".join(parts) + hint, missing, extra)
    if not keys:
        raise MetricsInputError("nothing to score: references and predictions are empty")
    return keys, missing, extra


def _reference_lists(
    references: Mapping[Any, Sequence[str]], predictions: Mapping[Any, str], keys: Sequence[Any]
) -> list[list[str]]:
    """The references of ``keys`` as lists, after checking both sides hold strings."""
    ref_lists: list[list[str]] = []
    for key in keys:
        refs, pred = references[key], predictions[key]
        # A bare string would silently be scored as one reference per character.
        if isinstance(refs, str) or not isinstance(refs, Iterable):
            raise MetricsInputError(f"references for key {key!r} must be a list of captions, not {type(refs).__name__}")
        ref_lists.append(list(refs))
        if not ref_lists[-1] or not all(isinstance(r, str) for r in ref_lists[-1]):
            raise MetricsInputError(f"references for key {key!r} must be a non-empty list of strings")
        if not isinstance(pred, str):
            raise MetricsInputError(f"prediction for key {key!r} must be a string, not {type(pred).__name__}")
    return ref_lists


def _n_gram_scores(
    names: Sequence[str], backend: str, tok_refs: Sequence[Sequence[str]], tok_hyps: Sequence[str]
) -> tuple[dict[str, MetricScores], dict[str, str]]:
    """BLEU, ROUGE-L and CIDEr among ``names``: (scores, the backend that computed each)."""
    simple = [name for name in names if name in BLEU_NAMES or name in ("ROUGE-L", "CIDEr")]
    results: dict[str, MetricScores] = {}
    if backend == "pycocoevalcap":
        results.update(_pycocoevalcap_python_scores(simple, tok_refs, tok_hyps))
        return results, {name: "pycocoevalcap" for name in simple}
    if any(name in BLEU_NAMES for name in simple):
        results.update(zip(BLEU_NAMES, bleu(tok_refs, tok_hyps, 4)))
    if "ROUGE-L" in simple:
        results["ROUGE-L"] = rouge_l(tok_refs, tok_hyps)
    if "CIDEr" in simple:
        results["CIDEr"] = cider_d(tok_refs, tok_hyps)
    return results, {name: "python" for name in simple}


def _java_score(
    name: str, package_dir: Path | None, tok_refs: Sequence[Sequence[str]], tok_hyps: Sequence[str], timeout: float
) -> tuple[MetricScores, str | None]:
    """METEOR or SPICE through pycocoevalcap's jars: (scores, a note or None).

    Raises JavaToolError with the reason when the tool cannot run here or fails.
    """
    java = java_path()
    reason = (meteor_unavailable_reason if name == "METEOR" else spice_unavailable_reason)(package_dir, java)
    if reason is not None:
        raise JavaToolError(reason)
    assert package_dir is not None and java is not None
    if name == "METEOR":
        return meteor_java(java, package_dir, tok_refs, tok_hyps, timeout), None
    scores, undefined = spice_java(java, package_dir, tok_refs, tok_hyps, timeout)
    return scores, (
        f"SPICE F-score undefined for {undefined} image(s) (no tuples); counted as 0" if undefined else None
    )
