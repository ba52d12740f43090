"""A pure-Python imitation of the Stanford PTBTokenizer 3.4.1 (``-preserveLines -lowerCase``) as
pycocoevalcap runs it, with its punctuation removal: the tokenizer ``metrics.tokenize`` falls back to
when Java or pycocoevalcap is missing (tested against the Java tool on the same captions)."""

from __future__ import annotations

import re

#: Tokens pycocoevalcap's PTBTokenizer wrapper removes after tokenising (its list, verbatim).
#: The bracket names are upper case but the tokenizer runs with -lowerCase and emits "-lrb-",
#: so brackets are in fact *kept* by the COCO protocol; we keep that behaviour.
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def remove_punctuation(tokenized_line: str) -> str:
    """pycocoevalcap's post-processing: split on single spaces, drop PTB_PUNCTUATIONS tokens."""
    return " ".join(w for w in tokenized_line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)


# ---- Pure-Python imitation of PTBTokenizer 3.4.1 (-preserveLines -lowerCase) ----------------

# Unicode forms PTBTokenizer normalises (its default ptb3Escaping options), mapped to the ASCII
# it produces; the quote forms end up removed as punctuation either way.
_UNICODE_MAP = str.maketrans(
    {
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2018": "`",
        "\u2019": "'",
        "\u2026": "...",
        "\u2013": "--",
        "\u2014": "--",
        "\u00a3": "#",
        "\u20ac": "$",
        "\u00a2": "cents",
        "\u00bd": " 1/2 ",
        "\u00bc": " 1/4 ",
        "\u00be": " 3/4 ",
    }
)

# Words whose trailing period PTBTokenizer keeps (its ABBREV1/ABBREV2 lists, as far as they are
# likely in captions), checked on the lower-cased word.
_ABBREV_ALWAYS = frozenset(
    """
jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn
tenn va vt wis wisc wyo inc co cos corp pty ltd plc rt bancorp dept bhd assn univ intl sys
ph tel est ext sq ft jr sr bros blvd rd esq etc al seq
mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj
sgt cpl pvt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mme mlle
vs alex wm jos cie cf treas mt
""".split()
)
# These keep the period only when capitalised (state names that are also common words).
_ABBREV_CAPITALISED = frozenset("az ark del ill la mass miss ore pa tex wash".split())
# These keep the period only before a number ("no. 5", "fig. 3").
_ABBREV_BEFORE_NUMBER = frozenset("no nos prop fig".split())

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

_ALNUM = r"(?:(?!n't(?![^\W_]))[^\W_])+"  # letters/digits, stopping before an "n't" ending
_NUMBER_GROUP = r"\d+(?:[,:]\d+)+"  # 1,000 / 5:30 stay one token (only between digits)
_PART = rf"(?:{_NUMBER_GROUP}|{_ALNUM})"
# Inside a word, "-", ".", "/", "@" join parts (x-ray, 3.5, m/s), and so does an apostrophe unless
# it starts a clitic the tokenizer splits off ('s 'm 'd 're 've 'll, 'n').
_JOIN = r"(?:[-./@]|'(?!(?:s|m|d|re|ve|ll)(?![^\W_])|n'))"
_WORD = rf"{_PART}(?:{_JOIN}{_PART})*"

_TOKEN_RE = re.compile(
    "|".join(
        [
            r"(?P<url>(?:https?://|www\.)\S*[^\s.,;:!?)\]}'\"])",
            r"(?P<tag>[#@][a-z_]\w*)",
            r"(?P<split>can(?=not(?![^\W_]))|gon(?=na(?![^\W_]))|got(?=ta(?![^\W_]))|wan(?=na(?![^\W_]))"
            r"|lem(?=me(?![^\W_]))|gim(?=me(?![^\W_]))|'t(?=(?:is|was)(?![^\W_]))|y'(?=all(?![^\W_])))",
            r"(?P<clitic>n't(?![^\W_])|'(?:s|m|d|re|ve|ll)(?![^\W_])|'n'|'\d\ds(?![^\W_])|'em(?![^\W_]))",
            rf"(?P<compound>[^\W\d_](?:\.[^\W\d_])+\.-{_WORD})",  # u.s.-made
            r"(?P<acronym>[^\W\d_](?:\.[^\W\d_])*\.(?![^\W_]))",  # u.s.a. / a.m. / a.
            rf"(?P<signed>-(?=\d){_WORD})",  # -5 (a minus joined to a word is a hyphen: "x-5")
            rf"(?P<word>{_WORD})",
            r"(?P<dots>\.\.\.+)",
            r"(?P<dashes>--+)",
            r"(?P<bangs>[?!]+)",
            r"(?P<stars>\*+)",
            r"(?P<other>\S)",
        ]
    ),
    re.IGNORECASE,
)


def ptb_tokenize_python(caption: str) -> str:
    """Tokenise one caption like pycocoevalcap (PTBTokenizer, lower-cased, punctuation removed).

    A pure-Python imitation of Stanford PTBTokenizer 3.4.1 for ordinary English captions:
    clitics ("do n't", "it 's"), sentence punctuation, brackets ("-lrb-", kept as COCO keeps
    them), quotes, "1,000"/"5:30"/"3.5" numbers, hyphenated words and common abbreviations
    ("mr.", "u.s.", "a.m.") match the Java tool. Exotic input (URLs, emoticons, SGML, rare
    abbreviations) may tokenise differently.
    """
    text = caption.translate(_UNICODE_MAP)
    tokens: list[str] = []
    for chunk_match in re.finditer(r"\S+", text):
        chunk, pos = chunk_match.group(0), 0
        following = text[chunk_match.end() :].lstrip()  # for "no. 5"-style abbreviations
        while pos < len(chunk):
            match = _TOKEN_RE.match(chunk, pos)
            assert match is not None  # the "other" branch matches any non-space character
            kind, value = match.lastgroup, match.group(0)
            pos = match.end()
            if kind == "word":
                if pos < len(chunk) and chunk[pos] == "." and _keeps_period(value, chunk[pos + 1 :], following):
                    value += "."
                    pos += 1
            elif kind == "dots":
                value = "..."
            elif kind == "dashes":
                value = "--"
            elif value in _BRACKETS:
                value = _BRACKETS[value]
            elif value == '"':
                value = "``" if pos == 1 else "''"  # opening vs closing; both are removed
            tokens.append(value)
    return remove_punctuation(" ".join(token.lower() for token in tokens))


def _keeps_period(word: str, after_dot: str, following: str) -> bool:
    """Whether PTBTokenizer keeps the period after ``word`` as part of an abbreviation.

    ``after_dot``: the rest of the chunk after the period; ``following``: the next chunks.
    """
    if after_dot[:1] in (",", ";", ":"):
        return True  # "dog., cat" -> "dog. ," : PTBTokenizer keeps a period glued to ,;:
    lower = word.lower()
    if lower in _ABBREV_ALWAYS:
        return True
    if lower in _ABBREV_CAPITALISED:
        return word[:1].isupper()
    if lower in _ABBREV_BEFORE_NUMBER:
        return (after_dot or following)[:1].isdigit()
    return False
