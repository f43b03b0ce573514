"""The experiments' data sets as plain Python lists, read from the offline assets.

- **VADER ground truth** (Hutto & Gilbert, ICWSM 2014), four English domains with the same
  label space: ``"movies"`` (10,605 movie-review snippets), ``"amazon"`` (3,708 product-review
  snippets), ``"tweets"`` (4,200) and ``"nyt"`` (5,190 New York Times editorial snippets),
  each text with its mean human rating in [-4, 4]. Used for cross-domain sentiment
  classification (:func:`load_vader`, :func:`sentiment_examples`) and as four domains of
  text for cross-domain language modelling (:func:`lm_text_domains`).
- **chatterbot-corpus** topic files in several languages: every utterance labelled with its
  topic, for zero-shot cross-lingual topic classification
  (:func:`load_chatterbot_topics`).

No split is shipped with either; :func:`split` makes seeded, stratified ones. The loaders
take an explicit ``root`` (tests, pre-extracted copies) or fetch the asset through
:mod:`tram.experiments.assets` when ``root`` is ``None``.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CHATTERBOT_LANGUAGES",
    "DEFAULT_CHATTERBOT_TOPICS",
    "DEFAULT_LANGUAGES",
    "VADER_DOMAINS",
    "lm_text_domains",
    "load_chatterbot_topics",
    "load_vader",
    "sentiment_examples",
    "split",
]

T = TypeVar("T")

VADER_DOMAINS: dict[str, str] = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
"""Domain name -> ground-truth file name, in the order the experiments list them."""

CHATTERBOT_LANGUAGES: dict[str, str] = {
    "bengali": "bn",
    "chinese": "zh",
    "dutch": "nl",
    "english": "en",
    "french": "fr",
    "german": "de",
    "hebrew": "he",
    "hindi": "hi",
    "hinglish": "hi-Latn",
    "indonesian": "id",
    "italian": "it",
    "japanese": "ja",
    "korean": "ko",
    "marathi": "mr",
    "oriya": "or",
    "persian": "fa",
    "portuguese": "pt",
    "russian": "ru",
    "spanish": "es",
    "swedish": "sv",
    "tamil": "ta",
    "telugu": "te",
    "thai": "th",
    "traditionalchinese": "zh-Hant",
    "turkish": "tr",
    "ukrainian": "uk",
    "urdu": "ur",
    "yoruba": "yo",
}
"""chatterbot-corpus directory name -> language code (the keys the loader returns)."""

DEFAULT_LANGUAGES = ("english", "italian", "japanese", "korean", "chinese", "ukrainian")
"""Source language first, then the zero-shot targets."""

DEFAULT_CHATTERBOT_TOPICS = (
    "ai",
    "emotion",
    "psychology",
    "literature",
    "science",
    "money",
    "humor",
    "sports",
    "movies",
    "food",
)
"""The ten topical files with substantial data in all six default languages.

The other files every language has (``botprofile``, ``conversations``, ``greetings``,
``gossip``, ``history``, ``politics``, ``trivia``) are persona lines, small talk or mixed
content rather than topics; pass ``topics="all"`` to include them anyway.
"""


def _missing(path: Path, what: str, fetch: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found at {path}. Call tram.experiments.assets.{fetch}() to fetch it "
        f"(cached under $TRAM_CACHE, default ~/.cache/tram), or pass root= pointing at a "
        f"directory that holds it."
    )


# --------------------------------------------------------------------------------------------
# VADER
# --------------------------------------------------------------------------------------------


def _vader_root(root: str | Path | None) -> Path:
    if root is None:
        from tram.experiments.assets import vader_dir

        return vader_dir()
    return Path(root)


def _read_vader_file(path: Path) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("latin-1")
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise ValueError(f"{path}:{lineno}: expected 'id<TAB>rating<TAB>text', got {line!r}")
        try:
            rating = float(fields[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: rating {fields[1]!r} is not a number") from None
        rows.append((fields[2].strip(), rating))
    return rows


def load_vader(
    root: str | Path | None = None, *, domains: Sequence[str] | None = None
) -> dict[str, list[tuple[str, float]]]:
    """Read VADER's ground-truth files: domain -> ``[(text, mean rating), ...]`` in file order.

    Args:
        root: directory holding the ``*_GroundTruth.txt`` files; ``None`` fetches them with
            :func:`tram.experiments.assets.vader_dir`.
        domains: subset of :data:`VADER_DOMAINS` to read (default: all four).

    The files are tab separated (``id``, mean rating of 20 raters in [-4, 4], text) with CRLF
    line ends; lines are decoded as UTF-8, falling back to Latin-1 line by line. Texts are
    kept verbatim apart from surrounding whitespace (HTML entities such as ``&amp;`` in the
    tweets are left as they are).

    Raises:
        FileNotFoundError: a file is missing (the message names it and the asset function).
        ValueError: a malformed line (file and line number in the message).
    """
    base = _vader_root(root)
    wanted = list(VADER_DOMAINS) if domains is None else list(domains)
    unknown = [d for d in wanted if d not in VADER_DOMAINS]
    if unknown:
        raise ValueError(f"unknown VADER domain(s) {unknown}; choose from {list(VADER_DOMAINS)}")
    out: dict[str, list[tuple[str, float]]] = {}
    for domain in wanted:
        path = base / VADER_DOMAINS[domain]
        if not path.is_file():
            raise _missing(path, f"VADER ground truth for {domain!r}", "vader_dir")
        out[domain] = _read_vader_file(path)
    return out


def sentiment_examples(
    domain_rows: Sequence[tuple[str, float]], *, threshold: float = 0.5
) -> list[tuple[str, int]]:
    """Binary sentiment labels from VADER ratings: ``[(text, label), ...]``.

    A rating above ``threshold`` is positive (1), below ``-threshold`` negative (0); the
    neutral band ``[-threshold, threshold]`` is dropped (the convention of the VADER paper's
    counts: with 0.5, movies keep 10,043 of 10,605 rows, tweets 3,362 of 4,200, Amazon
    2,943 of 3,708, NYT 2,788 of 5,190). Order is preserved.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    out: list[tuple[str, int]] = []
    for text, rating in domain_rows:
        if rating > threshold:
            out.append((text, 1))
        elif rating < -threshold:
            out.append((text, 0))
    return out


def lm_text_domains(root: str | Path | None = None) -> dict[str, list[str]]:
    """VADER's texts per domain (``"movies"``, ``"amazon"``, ``"tweets"``, ``"nyt"``) for
    language modelling: four genres of English (reviews, social media, news editorials)."""
    return {domain: [text for text, _ in rows] for domain, rows in load_vader(root).items()}


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _cuts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    first = round(n * fractions[0])
    second = round(n * (fractions[0] + fractions[1]))
    return first, max(first, min(second, n))


def split(
    examples: Sequence[T],
    *,
    seed: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    stratify: bool = True,
) -> tuple[list[T], list[T], list[T]]:
    """Seeded train/validation/test split.

    Args:
        examples: the items; with ``stratify`` each must be a ``(input, label, ...)`` tuple
            whose label (``item[1]``) is hashable.
        seed: seeds a private ``random.Random``; the same seed and input give the same
            split on every platform and Python version.
        fractions: three non-negative fractions summing to 1.
        stratify: split every label group separately in these proportions (rounded per
            group), so that each part keeps the label distribution; groups are visited in
            order of first appearance. Without it the whole list is shuffled once and cut.

    Returns:
        ``(train, validation, test)``: disjoint lists that together hold every example
        (duplicates in the input stay duplicates, possibly across parts), each shuffled.
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fr}")
    fr3: tuple[float, float, float] = (fr[0], fr[1], fr[2])
    rng = random.Random(seed)
    if stratify:
        groups: dict[Hashable, list[T]] = {}
        for ex in examples:
            groups.setdefault(_label(ex), []).append(ex)
        parts: tuple[list[T], list[T], list[T]] = ([], [], [])
        for items in groups.values():
            items = list(items)
            rng.shuffle(items)
            a, b = _cuts(len(items), fr3)
            parts[0].extend(items[:a])
            parts[1].extend(items[a:b])
            parts[2].extend(items[b:])
        for part in parts:
            rng.shuffle(part)
        return parts
    items = list(examples)
    rng.shuffle(items)
    a, b = _cuts(len(items), fr3)
    return items[:a], items[a:b], items[b:]


def _label(example: Any) -> Hashable:
    try:
        label = example[1]
    except (TypeError, IndexError, KeyError):
        raise TypeError(
            f"stratify=True needs (input, label) items, got {type(example).__name__}"
        ) from None
    return label


# --------------------------------------------------------------------------------------------
# chatterbot-corpus
# --------------------------------------------------------------------------------------------


def _chatterbot_root(root: str | Path | None) -> Path:
    if root is None:
        from tram.experiments.assets import chatterbot_dir

        return chatterbot_dir()
    return Path(root)


def _language_dir(lang: str) -> str:
    if lang in CHATTERBOT_LANGUAGES:
        return lang
    by_code = {code: name for name, code in CHATTERBOT_LANGUAGES.items()}
    if lang in by_code:
        return by_code[lang]
    raise ValueError(f"unknown language {lang!r}; use a name or code from CHATTERBOT_LANGUAGES")


def _read_topic(path: Path) -> list[str]:
    import yaml

    loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)  # every scalar stays a string
    with open(path, encoding="utf-8") as fh:
        doc = yaml.load(fh, Loader=loader)  # BaseLoader: safe, builds no objects
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with 'conversations'")
    out: list[str] = []
    for conversation in doc.get("conversations") or []:
        turns = conversation if isinstance(conversation, list) else [conversation]
        for turn in turns:
            if isinstance(turn, str) and turn.strip():
                out.append(turn.strip())
    return out


def load_chatterbot_topics(
    root: str | Path | None = None,
    *,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    topics: Sequence[str] | str | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Utterances labelled by topic, per language: ``{"en": [(text, topic), ...], ...}``.

    Every utterance (questions and answers alike) of every conversation in
    ``<root>/<language>/<topic>.yml`` becomes one example labelled with the file's stem.

    Args:
        root: the corpus ``data`` directory; ``None`` fetches it with
            :func:`tram.experiments.assets.chatterbot_dir`.
        languages: directory names (``"english"``) or codes (``"en"``); the result is keyed
            by code (:data:`CHATTERBOT_LANGUAGES`), in this order.
        topics: ``None``: those of :data:`DEFAULT_CHATTERBOT_TOPICS` present in every
            requested language; ``"all"``: every topic present in every requested language;
            or an explicit list, each of which must exist in every language.

    Within a language an utterance that occurs several times under one topic is kept once;
    one that occurs under two or more topics is dropped, its label being ambiguous. Examples
    are ordered by topic (sorted), then by position in the file. Needs PyYAML.

    Raises:
        FileNotFoundError: the root, a language directory or a requested topic file is
            missing.
    """
    base = _chatterbot_root(root)
    if not base.is_dir():
        raise _missing(base, "chatterbot-corpus data directory", "chatterbot_dir")
    dirs = [_language_dir(lang) for lang in languages]
    available: dict[str, set[str]] = {}
    for d in dirs:
        lang_dir = base / d
        if not lang_dir.is_dir():
            raise _missing(lang_dir, f"chatterbot-corpus language {d!r}", "chatterbot_dir")
        available[d] = {p.stem for p in lang_dir.glob("*.yml")}
    common = set.intersection(*available.values()) if available else set()
    if topics is None:
        chosen = sorted(t for t in DEFAULT_CHATTERBOT_TOPICS if t in common)
    elif isinstance(topics, str):
        if topics != "all":
            raise ValueError(f"topics must be None, 'all' or a list of names, got {topics!r}")
        chosen = sorted(common)
    else:
        chosen = sorted(set(topics))
        for d in dirs:
            for t in chosen:
                if t not in available[d]:
                    path = base / d / f"{t}.yml"
                    raise _missing(path, "chatterbot-corpus topic", "chatterbot_dir")
    if not chosen:
        raise ValueError(f"no topic is shared by all of {list(languages)} under {base}")

    out: dict[str, list[tuple[str, str]]] = {}
    for d in dirs:
        labelled: dict[str, str | None] = {}  # text -> topic, None once ambiguous
        for topic in chosen:
            for text in _read_topic(base / d / f"{topic}.yml"):
                if text not in labelled:
                    labelled[text] = topic
                elif labelled[text] != topic:
                    labelled[text] = None
        # insertion order is topic order (sorted), then file order
        out[CHATTERBOT_LANGUAGES[d]] = [(text, t) for text, t in labelled.items() if t is not None]
    return out
