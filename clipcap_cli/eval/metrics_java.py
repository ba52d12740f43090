"""The Java programs bundled with pycocoevalcap, run as pycocoevalcap runs them: Stanford's PTBTokenizer
(CoreNLP 3.4.1), METEOR 1.5 and SPICE 1.0.

Each is driven here with the package's own command line, but with its files in the system's temp dir (not
site-packages), a timeout, and its output captured. ``java_path`` and ``pycocoevalcap_dir`` say what this machine
has; the ``*_unavailable_reason`` functions say in one line why a tool cannot run; a tool that fails raises
``JavaToolError`` with the reason. ``metrics.score`` decides when to call them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from clipcap_cli.eval.ngrams import MetricScores

PTB_JAR = "stanford-corenlp-3.4.1.jar"
METEOR_JAR = "meteor-1.5.jar"
SPICE_JAR = "spice-1.0.jar"
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
DEFAULT_JAVA_TIMEOUT = 600.0
INSTALL_EVAL = "pip install 'clipcap-cli[eval]'"  # what brings pycocoevalcap, in every message that needs it


class JavaToolError(Exception):
    """A Java tool failed; the message is the one-line reason shown to the user."""


# --------------------------------------------------------------------------- what this machine has


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


def _package_and_java_reason(metric: str, package_dir: Path | None, java: str | None) -> str | None:
    if package_dir is None:
        return f"{metric} needs the pycocoevalcap package ({INSTALL_EVAL}) and Java"
    if java is None:
        return f"{metric} needs Java: no 'java' on PATH"
    return None


def spice_unavailable_reason(package_dir: Path | None, java: str | None) -> str | None:
    reason = _package_and_java_reason("SPICE", package_dir, java)
    if reason is not None:
        return reason
    assert package_dir is not None
    spice_dir = package_dir / "spice"
    if not (spice_dir / SPICE_JAR).is_file():
        return f"SPICE jar {spice_dir / SPICE_JAR} is missing"
    missing = [name for name in SPICE_CORENLP_JARS if not (spice_dir / "lib" / name).is_file()]
    if missing:
        return (
            f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)}) in {spice_dir / 'lib'}; "
            "pycocoevalcap downloads it on first use, which needs internet: run "
            "'python -m pycocoevalcap.spice.get_stanford_models' once online"
        )
    return None


def meteor_unavailable_reason(package_dir: Path | None, java: str | None) -> str | None:
    reason = _package_and_java_reason("METEOR", package_dir, java)
    if reason is not None:
        return reason
    assert package_dir is not None
    meteor_dir = package_dir / "meteor"
    for needed in (meteor_dir / METEOR_JAR, meteor_dir / "data" / "paraphrase-en.gz"):
        if not needed.is_file():
            return f"METEOR file {needed} is missing"
    return None


def _one_line(text: str, limit: int = 300) -> str:
    """The last meaningful line of a tool's output, for a one-line reason."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- the tools

# Characters Java's PTBTokenizer treats as line ends in -preserveLines mode. pycocoevalcap only
# replaces "\n", so a "\r" in a caption shifts every later caption onto the wrong image there;
# we replace them all to keep one caption per line.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def run_java_ptb(java: str, jar: Path, captions: Sequence[str], timeout: float) -> list[str]:
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
            raise JavaToolError(f"PTBTokenizer timed out after {timeout:g} s") from None
        except OSError as exc:
            raise JavaToolError(f"could not run java: {exc}") from None
    finally:
        os.unlink(tmp_name)
    if proc.returncode != 0:
        raise JavaToolError(
            f"PTBTokenizer failed (exit {proc.returncode}): {_one_line(proc.stderr.decode('utf-8', 'replace'))}"
        )
    # Output mirrors the input's line structure ("a\n\n" -> "a\n\n"), blank lines included.
    out = proc.stdout.decode("utf-8", "replace").split("\n")
    if len(out) == len(lines) + 1 and out[-1] == "":
        out.pop()  # tolerate a final newline the input did not have
    if len(out) != len(lines):
        raise JavaToolError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return out


def meteor_java(
    java: str, package_dir: Path, references: Sequence[Sequence[str]], hypotheses: Sequence[str], timeout: float
) -> MetricScores:
    """METEOR through pycocoevalcap's meteor-1.5.jar, with the exact command line and stdio
    protocol of its ``Meteor`` class (SCORE lines, then one EVAL line).

    We drive the process ourselves because the class has no timeout, leaves stderr in a pipe
    nobody reads, and its ``__del__`` deadlocks on its lock after a failed call.
    """
    meteor_dir = package_dir / "meteor"
    cmd = [java, "-jar", "-Xmx2G", METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
    timed_out = threading.Event()
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        except OSError as exc:
            raise JavaToolError(f"could not run java: {exc}") from None

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
                        raise JavaToolError(f"METEOR timed out after {timeout:g} s")
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
                    err.seek(0)
                    detail = _one_line(err.read().decode("utf-8", "replace")) or f"exit {proc.returncode}"
                    raise JavaToolError(f"METEOR failed: {detail}")
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
                raise JavaToolError(f"METEOR returned unexpected output: {answers[-1][:100]}") from None
            return MetricScores(values[-1], values[:-1])
        finally:
            # Like pycocoevalcap's Meteor.__del__: nothing is pending, so just stop the JVM.
            watchdog.cancel()
            proc.kill()
            proc.wait()
            for stream in (stdin, stdout):
                with contextlib.suppress(OSError):  # stdin may hold unflushed bytes for a dead process
                    stream.close()


def spice_java(
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
        cmd = [java, "-jar", "-Xmx8G", SPICE_JAR, str(in_file), "-out", str(out_file), "-subset", "-silent"]
        try:
            proc = subprocess.run(cmd, cwd=spice_dir, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise JavaToolError(f"SPICE timed out after {timeout:g} s") from None
        except OSError as exc:
            raise JavaToolError(f"could not run java: {exc}") from None
        if proc.returncode != 0 or not out_file.is_file():
            output = proc.stderr.decode("utf-8", "replace") + proc.stdout.decode("utf-8", "replace")
            raise JavaToolError(f"SPICE failed (exit {proc.returncode}): {_one_line(output)}")
        try:
            results = json.loads(out_file.read_text(encoding="utf-8"))
            by_id = {int(item["image_id"]): item["scores"]["All"]["f"] for item in results}
        except (ValueError, KeyError, TypeError) as exc:
            raise JavaToolError(f"SPICE output could not be read: {exc}") from None
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
