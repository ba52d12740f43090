"""Caption text from token ids, and the stop token's id: what decoding reads from the tokenizer.

Decoding itself (``decoding.py``) deals in token ids only; these helpers are re-exported there.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
UTF8_MAX_BYTES = 4


def clean_up_tokenization(text: str) -> str:
    """transformers 4.x's ``clean_up_tokenization_spaces=True`` (the original's default).

    transformers 5 ignores that flag for BPE tokenizers, so the original's post-processing is
    applied here to give the same strings (e.g. "a dog ." -> "a dog.").
    """
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def tokens_to_text(tokenizer: Any, tokens: list[int] | tuple[int, ...]) -> str:
    """The caption text exactly as the original produced it: nothing stripped, case kept.

    The whole sequence is decoded at once, so a character spread over several tokens (byte-level
    BPE, SentencePiece byte fallback) comes out whole. A caption cut by ``max_length`` inside a
    character would end in U+FFFD: the bytes of that unfinished character are left out instead.
    """
    tokens = list(tokens)
    text = tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
    if text.endswith(REPLACEMENT):
        # Up to 3 byte tokens of an unfinished character; a U+FFFD the model really spelled stays.
        for cut in range(len(tokens) - 1, max(len(tokens) - UTF8_MAX_BYTES, -1), -1):
            shorter = tokenizer.decode(tokens[:cut], clean_up_tokenization_spaces=False)
            if not shorter.endswith(REPLACEMENT):
                text = shorter
                break
    return clean_up_tokenization(text)


def stop_token_id(tokenizer: Any, stop_token: str) -> int:
    """The id decoding stops at: the first token of ``stop_token`` (13 for "." in GPT-2, as the
    original), or the tokenizer's end of text for ``stop_token`` "eos" (see ``lm.stop_id``)."""
    from clipcap_cli.weights.lm import stop_id

    return stop_id(tokenizer, stop_token)
