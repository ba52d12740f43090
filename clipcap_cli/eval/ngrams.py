"""BLEU-1..4, ROUGE-L and CIDEr-D computed in Python exactly as pycocoevalcap's scorers compute them
(equal to 1e-6, tested), on captions already tokenised the COCO way (``metrics.tokenize``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from clipcap_cli.errors import MetricsInputError

# pycocoevalcap's BLEU smoothing constants (bleu_scorer.py): they keep a 0/0 ratio finite.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


class MetricScores(NamedTuple):
    """A corpus-level value and the per-image values it was computed with (same order as input)."""

    corpus: float
    per_image: list[float]


def _ngram_counts(words: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
    """n-gram counts for orders 1..n, inserted in the same order as pycocoevalcap's precook."""
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            gram = tuple(words[i : i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


def _check_aligned(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise MetricsInputError(f"{len(references)} reference lists but {len(hypotheses)} hypotheses")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise MetricsInputError(f"image {i}: references must be a non-empty list of strings")


def bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[str], n: int = 4) -> list[MetricScores]:
    """BLEU-1..n exactly as pycocoevalcap's ``Bleu(n)`` (``BleuScorer``, option "closest").

    Corpus BLEU uses clipped n-gram counts summed over images and the sum of per-image
    *closest* reference lengths (ties go to the shorter reference). Both the corpus and the
    per-image values use pycocoevalcap's smoothing: every ratio is (matches + 1e-15) /
    (guesses + 1e-9), and the brevity penalty exp(1 - r/c) applies whenever
    (c + 1e-15) / (r + 1e-9) < 1, i.e. also (negligibly) when c == r.
    Returns one :class:`MetricScores` per order.
    """
    _check_aligned(references, hypotheses)
    per_image: list[list[float]] = [[] for _ in range(n)]
    total_guess, total_correct = [0] * n, [0] * n
    total_test, total_ref = 0, 0
    for refs, hyp in zip(references, hypotheses):
        ref_lens: list[int] = []
        max_counts: dict[tuple[str, ...], int] = {}
        for ref in refs:
            words = ref.split()
            ref_lens.append(len(words))
            for gram, count in _ngram_counts(words, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        words = hyp.split()
        test_len = len(words)
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngram_counts(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        total_test += test_len
        total_ref += ref_len
        value = 1.0
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
            value *= (float(correct[k]) + _BLEU_TINY) / (float(guess[k]) + _BLEU_SMALL)
            per_image[k].append(value ** (1.0 / (k + 1)))
        ratio = (test_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
        if ratio < 1:
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)

    corpus: list[float] = []
    value = 1.0
    for k in range(n):
        value *= float(total_correct[k] + _BLEU_TINY) / (total_guess[k] + _BLEU_SMALL)
        corpus.append(value ** (1.0 / (k + 1)))
    ratio = (total_test + _BLEU_TINY) / (total_ref + _BLEU_SMALL)
    if ratio < 1:
        corpus = [c * math.exp(1 - 1 / ratio) for c in corpus]
    return [MetricScores(corpus[k], per_image[k]) for k in range(n)]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[len(b)]


def rouge_l(references: Sequence[Sequence[str]], hypotheses: Sequence[str], beta: float = 1.2) -> MetricScores:
    """ROUGE-L as pycocoevalcap's ``Rouge``: per image, the LCS-based precision and recall are
    each maximised over the references (separately), then F = (1+b^2)PR / (R + b^2 P); the corpus
    value is the mean over images. Tokens come from ``split(" ")`` as there, so an empty caption
    is one empty token."""
    _check_aligned(references, hypotheses)
    scores: list[float] = []
    for refs, hyp in zip(references, hypotheses):
        cand = hyp.split(" ")
        precisions, recalls = [], []
        for ref in refs:
            tokens = ref.split(" ")
            lcs = _lcs_length(tokens, cand)
            precisions.append(lcs / float(len(cand)))
            recalls.append(lcs / float(len(tokens)))
        p, r = max(precisions), max(recalls)
        if p != 0 and r != 0:
            scores.append(((1 + beta**2) * p * r) / float(r + beta**2 * p))
        else:
            scores.append(0.0)
    return MetricScores(math.fsum(scores) / len(scores) if scores else 0.0, scores)


def cider_d(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str], n: int = 4, sigma: float = 6.0
) -> MetricScores:
    """CIDEr as pycocoevalcap's ``Cider`` (the COCO server's "CIDEr", which is CIDEr-D).

    TF-IDF vectors per n-gram order 1..n with document frequencies counted over the references
    of *this* evaluation set (so a single image gives IDF 0 everywhere and CIDEr 0), clipped
    cosine similarity min(hyp, ref) * ref, a Gaussian length penalty exp(-delta^2 / (2 sigma^2)),
    mean over orders and references, x10. As in pycocoevalcap, the "length" in delta is the
    number of bigrams, not of words.
    """
    _check_aligned(references, hypotheses)
    ref_counts = [[_ngram_counts(ref.split(), n) for ref in refs] for refs in references]
    doc_freq: dict[tuple[str, ...], float] = {}
    for image_refs in ref_counts:
        for gram in {gram for counts in image_refs for gram in counts}:
            doc_freq[gram] = doc_freq.get(gram, 0.0) + 1.0
    log_n_images = math.log(float(len(references))) if references else 0.0

    def to_vector(counts: dict[tuple[str, ...], int]) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, term_freq in counts.items():
            order = len(gram) - 1
            idf_log = math.log(max(1.0, doc_freq.get(gram, 0.0)))
            vec[order][gram] = float(term_freq) * (log_n_images - idf_log)
            norm[order] += vec[order][gram] ** 2
            if order == 1:
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length

    penalty_denominator = 2 * sigma**2
    scores: list[float] = []
    for image_refs, hyp in zip(ref_counts, hypotheses):
        vec_h, norm_h, len_h = to_vector(_ngram_counts(hyp.split(), n))
        total = [0.0] * n
        for counts in image_refs:
            vec_r, norm_r, len_r = to_vector(counts)
            delta = float(len_h - len_r)
            for k in range(n):
                val = 0.0
                for gram, weight in vec_h[k].items():
                    ref_weight = vec_r[k].get(gram, 0.0)
                    val += min(weight, ref_weight) * ref_weight
                if norm_h[k] != 0 and norm_r[k] != 0:
                    val /= norm_h[k] * norm_r[k]
                val *= math.e ** (-(delta**2) / penalty_denominator)
                total[k] += val
        scores.append(sum(total) / n / len(image_refs) * 10.0)
    return MetricScores(math.fsum(scores) / len(scores) if scores else 0.0, scores)
