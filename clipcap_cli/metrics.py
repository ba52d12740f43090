"""COCO-caption-protocol metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and SPICE.

The numbers follow the MS-COCO caption evaluation code (``pycocoevalcap``), which is what the
ClipCap paper and most captioning papers report:

* captions are tokenised with Stanford's PTBTokenizer (CoreNLP 3.4.1, lower-cased) and the tokens
  in :data:`PTB_PUNCTUATIONS` are dropped;
* BLEU, ROUGE-L and CIDEr are computed here in pure Python, operation for operation like
  pycocoevalcap's ``bleu_scorer.py``, ``rouge.py`` and ``cider_scorer.py`` (quirks included, see the
  functions' docstrings), so they need neither Java nor the package;
* METEOR and SPICE exist only as Java programs bundled with pycocoevalcap: they are run when the
  package is importable and ``java`` is on PATH, and otherwise reported unavailable with a reason.

Scale: every value is on the scale pycocoevalcap returns: BLEU, METEOR, ROUGE-L and SPICE in
[0, 1], CIDEr on its own x10 scale (about 0..10, typically ~1.1 for a good COCO model). Papers,
including :data:`PAPER_TABLE1_COCO`, print all of them x100 (CIDEr 113.08 == 1.1308 here); use
:meth:`ScoreResult.as_percent` to compare.

Nothing in this module prints: the Java tools' output is captured and every outcome (which
tokenizer, which backend, why a metric is unavailable) is part of the returned :class:`ScoreResult`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcap_cli.errors import BackendUnavailableError, KeyMismatchError, MetricsInputError
from clipcap_cli.ngrams import MetricScores, bleu, cider_d, rouge_l
from clipcap_cli.ptb import PTB_PUNCTUATIONS, ptb_tokenize_python
from clipcap_cli.ptb import remove_punctuation as _remove_punctuation

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


_PTB_JAR = "stanford-corenlp-3.4.1.jar"
_METEOR_JAR = "meteor-1.5.jar"
_SPICE_JAR = "spice-1.0.jar"
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_DEFAULT_JAVA_TIMEOUT = 600.0


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


class _JavaToolError(Exception):
    """A Java tool failed; the message is the one-line reason shown to the user."""


# --------------------------------------------------------------------------------------------
# Environment: java and pycocoevalcap
# --------------------------------------------------------------------------------------------


def java_path() -> str | None:
    """The ``java`` executable on PATH, or None."""
    return shutil.which("java")


def pycocoevalcap_dir() -> Path | None:
    """The installed pycocoevalcap package folder, found without importing it (it is a namespace
    package with no ``__init__.py``), or None when it is not installed."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        if (Path(location) / "bleu").is_dir():
            return Path(location)
    return None


INSTALL_EVAL = "pip install 'clipcap-cli[eval]'"  # what brings pycocoevalcap, in every message that needs it


def check_backends(backend: str, tokenizer: str) -> None:
    """The one check that an explicitly chosen backend and tokenizer can run here (``auto`` always can:
    it falls back); ``BackendUnavailableError`` says what to install."""
    if backend == "pycocoevalcap" and pycocoevalcap_dir() is None:
        raise BackendUnavailableError(f"backend 'pycocoevalcap' needs the pycocoevalcap package ({INSTALL_EVAL})")
    if tokenizer == "ptb-java" and (pycocoevalcap_dir() is None or java_path() is None):
        raise BackendUnavailableError(
            f"tokenizer 'ptb-java' needs the pycocoevalcap package ({INSTALL_EVAL}) and Java on PATH"
        )


def _package_and_java_reason(metric: str, package_dir: Path | None, java: str | None) -> str | None:
    if package_dir is None:
        return f"{metric} needs the pycocoevalcap package ({INSTALL_EVAL}) and Java"
    if java is None:
        return f"{metric} needs Java: no 'java' on PATH"
    return None


def _spice_unavailable_reason(package_dir: Path | None, java: str | None) -> str | None:
    reason = _package_and_java_reason("SPICE", package_dir, java)
    if reason is not None:
        return reason
    assert package_dir is not None
    spice_dir = package_dir / "spice"
    if not (spice_dir / _SPICE_JAR).is_file():
        return f"SPICE jar {spice_dir / _SPICE_JAR} is missing"
    missing = [name for name in _SPICE_CORENLP_JARS if not (spice_dir / "lib" / name).is_file()]
    if missing:
        return (
            f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)}) in {spice_dir / 'lib'}; "
            "pycocoevalcap downloads it on first use, which needs internet: run "
            "'python -m pycocoevalcap.spice.get_stanford_models' once online"
        )
    return None


def _meteor_unavailable_reason(package_dir: Path | None, java: str | None) -> str | None:
    reason = _package_and_java_reason("METEOR", package_dir, java)
    if reason is not None:
        return reason
    assert package_dir is not None
    meteor_dir = package_dir / "meteor"
    for needed in (meteor_dir / _METEOR_JAR, meteor_dir / "data" / "paraphrase-en.gz"):
        if not needed.is_file():
            return f"METEOR file {needed} is missing"
    return None


def _one_line(text: str, limit: int = 300) -> str:
    """The last meaningful line of a tool's output, for a one-line reason."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

# Characters Java's PTBTokenizer treats as line ends in -preserveLines mode. pycocoevalcap only
# replaces "\n", so a "\r" in a caption shifts every later caption onto the wrong image there;
# we replace them all to keep one caption per line.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _run_java_ptb(java: str, jar: Path, captions: Sequence[str], timeout: float) -> list[str]:
    """Raw PTBTokenizer output, one line per caption (punctuation not yet removed).

    Same command as pycocoevalcap's PTBTokenizer wrapper, but the temporary file goes to the
    system temp dir, not into site-packages (which may be read-only), and output is captured.
    """
    lines = [_LINE_BREAKS.sub(" ", caption) for caption in captions]
    fd, tmp_name = tempfile.mkstemp(prefix="clipcap-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write("\n".join(lines).encode("utf-8"))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", tmp_name]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise _JavaToolError(f"PTBTokenizer timed out after {timeout:g} s") from None
        except OSError as exc:
            raise _JavaToolError(f"could not run java: {exc}") from None
    finally:
        os.unlink(tmp_name)
    if proc.returncode != 0:
        raise _JavaToolError(
            f"PTBTokenizer failed (exit {proc.returncode}): {_one_line(proc.stderr.decode('utf-8', 'replace'))}"
        )
    # Output mirrors the input's line structure ("a\n\n" -> "a\n\n"), blank lines included.
    out = proc.stdout.decode("utf-8", "replace").split("\n")
    if len(out) == len(lines) + 1 and out[-1] == "":
        out.pop()  # tolerate a final newline the input did not have
    if len(out) != len(lines):
        raise _JavaToolError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return out


def tokenize(
    captions: Sequence[str], tokenizer: str = "auto", *, timeout: float = _DEFAULT_JAVA_TIMEOUT
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
    elif not (package_dir / "tokenizer" / _PTB_JAR).is_file():
        reason = f"{package_dir / 'tokenizer' / _PTB_JAR} is missing"
    else:
        try:
            raw = _run_java_ptb(java, package_dir / "tokenizer" / _PTB_JAR, captions, timeout)
            return [_remove_punctuation(line) for line in raw], "ptb-java", None
        except _JavaToolError as exc:
            reason = str(exc)
    if tokenizer == "ptb-java":
        raise BackendUnavailableError(f"the Java PTBTokenizer cannot run: {reason}")
    note = f"Java PTBTokenizer not used ({reason}); tokenised with the Python imitation"
    return [ptb_tokenize_python(c) for c in captions], "ptb-python", note


# --------------------------------------------------------------------------------------------
# Pure-Python scorers (input: pre-tokenised strings, aligned per image)
# --------------------------------------------------------------------------------------------


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
# Java tools bundled with pycocoevalcap: METEOR 1.5 and SPICE 1.0
# --------------------------------------------------------------------------------------------


def _meteor_java(
    java: str, package_dir: Path, references: Sequence[Sequence[str]], hypotheses: Sequence[str], timeout: float
) -> MetricScores:
    """METEOR through pycocoevalcap's meteor-1.5.jar, with the exact command line and stdio
    protocol of its ``Meteor`` class (SCORE lines, then one EVAL line).

    We drive the process ourselves because the class has no timeout, leaves stderr in a pipe
    nobody reads, and its ``__del__`` deadlocks on its lock after a failed call.
    """
    meteor_dir = package_dir / "meteor"
    cmd = [java, "-jar", "-Xmx2G", _METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
    timed_out = threading.Event()
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        except OSError as exc:
            raise _JavaToolError(f"could not run java: {exc}") from None

        def kill() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None

        def ask(line: str, n_answers: int) -> list[str]:
            with contextlib.suppress(OSError):  # a dead process: the empty read below reports it
                stdin.write((line + "\n").encode("utf-8"))
                stdin.flush()
            answers = []
            for _ in range(n_answers):
                raw = stdout.readline()
                if not raw:  # end of output: the process died or the watchdog killed it
                    if timed_out.is_set():
                        raise _JavaToolError(f"METEOR timed out after {timeout:g} s")
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
                    err.seek(0)
                    detail = _one_line(err.read().decode("utf-8", "replace")) or f"exit {proc.returncode}"
                    raise _JavaToolError(f"METEOR failed: {detail}")
                answers.append(raw.decode("utf-8", "replace").strip())
            return answers

        try:
            stats = []
            for refs, hyp in zip(references, hypotheses):
                # Same clean-up as pycocoevalcap on the hypothesis; on references we only remove
                # what would break the line protocol ("|||" and line breaks).
                hyp = _LINE_BREAKS.sub(" ", hyp).replace("|||", "").replace("  ", " ")
                refs = [_LINE_BREAKS.sub(" ", ref).replace("|||", "") for ref in refs]
                stats.append(ask(" ||| ".join(("SCORE", " ||| ".join(refs), hyp)), 1)[0])
            answers = ask("EVAL" + "".join(f" ||| {s}" for s in stats), len(stats) + 1)
            try:
                values = [float(a) for a in answers]
            except ValueError:
                raise _JavaToolError(f"METEOR returned unexpected output: {answers[-1][:100]}") from None
            return MetricScores(values[-1], values[:-1])
        finally:
            # Like pycocoevalcap's Meteor.__del__: nothing is pending, so just stop the JVM.
            watchdog.cancel()
            proc.kill()
            proc.wait()
            for stream in (stdin, stdout):
                with contextlib.suppress(OSError):  # stdin may hold unflushed bytes for a dead process
                    stream.close()


def _spice_java(
    java: str, package_dir: Path, references: Sequence[Sequence[str]], hypotheses: Sequence[str], timeout: float
) -> tuple[MetricScores, int]:
    """SPICE through pycocoevalcap's spice-1.0.jar, same arguments as its ``Spice`` class except
    that input/output files live in a temp dir (not site-packages) and no parse cache is kept.

    Returns the scores and how many images SPICE gave an undefined F-score (null or NaN):
    pycocoevalcap keeps those as NaN, which makes the mean NaN; we count them as 0.
    """
    spice_dir = package_dir / "spice"
    with tempfile.TemporaryDirectory(prefix="clipcap-spice-") as tmp:
        in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
        data = [
            {"image_id": i, "test": hyp, "refs": list(refs)}
            for i, (refs, hyp) in enumerate(zip(references, hypotheses))
        ]
        in_file.write_text(json.dumps(data), encoding="utf-8")
        cmd = [java, "-jar", "-Xmx8G", _SPICE_JAR, str(in_file), "-out", str(out_file), "-subset", "-silent"]
        try:
            proc = subprocess.run(cmd, cwd=spice_dir, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise _JavaToolError(f"SPICE timed out after {timeout:g} s") from None
        except OSError as exc:
            raise _JavaToolError(f"could not run java: {exc}") from None
        if proc.returncode != 0 or not out_file.is_file():
            output = proc.stderr.decode("utf-8", "replace") + proc.stdout.decode("utf-8", "replace")
            raise _JavaToolError(f"SPICE failed (exit {proc.returncode}): {_one_line(output)}")
        try:
            results = json.loads(out_file.read_text(encoding="utf-8"))
            by_id = {int(item["image_id"]): item["scores"]["All"]["f"] for item in results}
        except (ValueError, KeyError, TypeError) as exc:
            raise _JavaToolError(f"SPICE output could not be read: {exc}") from None
    per_image: list[float] = []
    undefined = 0
    for i in range(len(hypotheses)):
        try:
            value = float(by_id[i])
        except (KeyError, TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            undefined += 1
            value = 0.0
        per_image.append(value)
    corpus = math.fsum(per_image) / len(per_image) if per_image else 0.0
    return MetricScores(corpus, per_image), undefined


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
    java_timeout: float = _DEFAULT_JAVA_TIMEOUT,
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
        except _JavaToolError as exc:
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

    Raises _JavaToolError with the reason when the tool cannot run here or fails.
    """
    java = java_path()
    reason = (_meteor_unavailable_reason if name == "METEOR" else _spice_unavailable_reason)(package_dir, java)
    if reason is not None:
        raise _JavaToolError(reason)
    assert package_dir is not None and java is not None
    if name == "METEOR":
        return _meteor_java(java, package_dir, tok_refs, tok_hyps, timeout), None
    scores, undefined = _spice_java(java, package_dir, tok_refs, tok_hyps, timeout)
    return scores, (
        f"SPICE F-score undefined for {undefined} image(s) (no tuples); counted as 0" if undefined else None
    )
