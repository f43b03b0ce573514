"""Tests of tram.experiments.data: parsers on fabricated files, splits, and the real data."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tram.experiments import data

# --------------------------------------------------------------------------------------------
# VADER parser
# --------------------------------------------------------------------------------------------


def _write_vader(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    movies = (
        b"1\t2.5\tA gripping, beautiful film.\r\n"
        b"2\t-3.1\tDull and far too long.\r\n"
        b"3\t0.2\tIt is a movie.\r\n"
    )
    # one UTF-8 line, then a Latin-1 line (é as 0xE9 is not valid UTF-8), no final newline
    amazon = "1_1\t1.75\tWorks great \u2013 caf\u00e9 grade\r\n".encode() + (
        b"1_2\t-0.75\tNot the caf\xe9 quality I expected"
    )
    tweets = b"1\t0.5\tborderline\r\n2\t-0.5\talso borderline\r\n\r\n3\t3.9\tlove it!!\r\n"
    nyt = b"1_1\t-1.2\tA troubling decision.\r\n"
    for name, payload in zip(data.VADER_DOMAINS.values(), (movies, amazon, tweets, nyt)):
        (root / name).write_bytes(payload)


def test_load_vader_parses_crlf_and_latin1(tmp_path):
    _write_vader(tmp_path)
    rows = data.load_vader(tmp_path)
    assert list(rows) == ["movies", "amazon", "tweets", "nyt"]
    assert rows["movies"] == [
        ("A gripping, beautiful film.", 2.5),
        ("Dull and far too long.", -3.1),
        ("It is a movie.", 0.2),
    ]
    assert rows["amazon"] == [
        ("Works great \u2013 caf\u00e9 grade", 1.75),
        ("Not the caf\u00e9 quality I expected", -0.75),
    ]
    assert [r for _, r in rows["tweets"]] == [0.5, -0.5, 3.9]  # the blank line is skipped
    assert all("\r" not in text for d in rows.values() for text, _ in d)
    assert data.load_vader(tmp_path, domains=["nyt"]) == {"nyt": [("A troubling decision.", -1.2)]}


def test_load_vader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vader_dir\(\)") as info:
        data.load_vader(tmp_path)
    assert "movieReviewSnippets_GroundTruth.txt" in str(info.value)
    with pytest.raises(ValueError, match="unknown VADER domain"):
        data.load_vader(tmp_path, domains=["imdb"])
    _write_vader(tmp_path)
    (tmp_path / data.VADER_DOMAINS["nyt"]).write_bytes(b"1\tnot-a-number\ttext\r\n")
    with pytest.raises(ValueError, match=r"nytEditorialSnippets_GroundTruth.txt:1"):
        data.load_vader(tmp_path)
    (tmp_path / data.VADER_DOMAINS["nyt"]).write_bytes(b"only one field\r\n")
    with pytest.raises(ValueError, match="expected 'id<TAB>rating<TAB>text'"):
        data.load_vader(tmp_path)


def test_sentiment_examples_threshold(tmp_path):
    rows = [("pos", 0.51), ("edge+", 0.5), ("mid", 0.0), ("edge-", -0.5), ("neg", -2.0)]
    assert data.sentiment_examples(rows) == [("pos", 1), ("neg", 0)]
    assert data.sentiment_examples(rows, threshold=0.0) == [
        ("pos", 1),
        ("edge+", 1),
        ("edge-", 0),
        ("neg", 0),
    ]
    assert data.sentiment_examples(rows, threshold=1.0) == [("neg", 0)]
    with pytest.raises(ValueError, match="threshold"):
        data.sentiment_examples(rows, threshold=-0.1)


def test_lm_text_domains(tmp_path):
    _write_vader(tmp_path)
    texts = data.lm_text_domains(tmp_path)
    assert set(texts) == {"movies", "amazon", "tweets", "nyt"}
    assert texts["nyt"] == ["A troubling decision."]


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def _examples(n_pos: int = 70, n_neg: int = 30) -> list[tuple[str, int]]:
    return [(f"p{i}", 1) for i in range(n_pos)] + [(f"n{i}", 0) for i in range(n_neg)]


def test_split_deterministic_disjoint_complete():
    ex = _examples()
    a = data.split(ex, seed=3)
    b = data.split(list(ex), seed=3)
    assert a == b
    assert data.split(ex, seed=4) != a
    train, val, test = a
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    ids = [x for part in a for x, _ in part]
    assert sorted(ids) == sorted(x for x, _ in ex)  # disjoint and complete
    assert ex == _examples()  # input untouched


def test_split_stratified_keeps_proportions():
    train, val, test = data.split(_examples(), seed=0)
    for part, n in ((train, 80), (val, 10), (test, 10)):
        counts = collections.Counter(label for _, label in part)
        assert counts[1] == round(0.7 * n)
        assert counts[0] == round(0.3 * n)
    # with a rare class, stratification still puts some of it into every part
    rare = [(f"p{i}", 1) for i in range(180)] + [(f"n{i}", 0) for i in range(20)]
    for part in data.split(rare, seed=1):
        assert any(label == 0 for _, label in part)


def test_split_unstratified_and_fractions():
    ex = _examples()
    train, val, test = data.split(ex, seed=0, stratify=False, fractions=(0.5, 0.25, 0.25))
    assert (len(train), len(val), len(test)) == (50, 25, 25)
    assert data.split(ex, seed=0, fractions=(1.0, 0.0, 0.0))[1:] == ([], [])
    for bad in ((0.5, 0.5), (0.8, 0.3, -0.1), (0.5, 0.2, 0.2)):
        with pytest.raises(ValueError, match="fractions"):
            data.split(ex, seed=0, fractions=bad)
    with pytest.raises(TypeError, match="label"):
        data.split([1, 2, 3], seed=0)
    parts = data.split([3, 1, 2], seed=0, stratify=False)
    assert sorted(x for part in parts for x in part) == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# chatterbot-corpus
# --------------------------------------------------------------------------------------------

_YML = {
    "ai": "categories:\n- AI\nconversations:\n- - {q1}\n  - {a1}\n- - {q1}\n  - yes\n",
    "food": "categories:\n- food\nconversations:\n- - {q2}\n  - {a2}\n- - shared line\n  - 42\n",
}


def _write_chatterbot(root: Path, languages=data.DEFAULT_LANGUAGES) -> None:
    for lang in languages:
        d = root / lang
        d.mkdir(parents=True)
        values = {"q1": f"What is AI ({lang})?", "a1": f"A field ({lang}).", "q2": "Do you eat?"}
        values["a2"] = f"Only electricity ({lang})."
        (d / "ai.yml").write_text(_YML["ai"].format(**values) + "- - shared line\n", "utf-8")
        (d / "food.yml").write_text(_YML["food"].format(**values), "utf-8")
    (root / "english" / "greetings.yml").write_text("conversations:\n- - Hi\n  - Hello\n")


def test_load_chatterbot_topics(tmp_path):
    _write_chatterbot(tmp_path)
    out = data.load_chatterbot_topics(tmp_path)
    assert list(out) == ["en", "it", "ja", "ko", "zh", "uk"]
    assert out["it"] == [
        ("What is AI (italian)?", "ai"),  # the repeated question is kept once
        ("A field (italian).", "ai"),
        ("yes", "ai"),  # read as a string, not as a YAML boolean
        # "shared line" is in ai and food: ambiguous, dropped
        ("Do you eat?", "food"),
        ("Only electricity (italian).", "food"),
        ("42", "food"),
    ]
    # greetings exists only in English and is not a default topic
    only_en = data.load_chatterbot_topics(tmp_path, languages=["en"], topics="all")
    assert {t for _, t in only_en["en"]} == {"ai", "food", "greetings"}
    assert {t for _, t in data.load_chatterbot_topics(tmp_path, topics="all")["ja"]} == {
        "ai",
        "food",
    }
    food = data.load_chatterbot_topics(tmp_path, languages=("korean",), topics=["food"])
    # with food alone, "shared line" is no longer ambiguous
    assert [text for text, _ in food["ko"]] == [
        "Do you eat?",
        "Only electricity (korean).",
        "shared line",
        "42",
    ]


def test_load_chatterbot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"chatterbot_dir\(\)"):
        data.load_chatterbot_topics(tmp_path / "nowhere")
    _write_chatterbot(tmp_path, languages=("english", "italian"))
    with pytest.raises(FileNotFoundError, match="japanese"):
        data.load_chatterbot_topics(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"italian/greetings\.yml"):
        data.load_chatterbot_topics(tmp_path, languages=("en", "it"), topics=["greetings"])
    with pytest.raises(ValueError, match="unknown language"):
        data.load_chatterbot_topics(tmp_path, languages=("klingon",))
    with pytest.raises(ValueError, match="topics must be"):
        data.load_chatterbot_topics(tmp_path, languages=("en",), topics="ai")


# --------------------------------------------------------------------------------------------
# The real data (downloaded once into the default cache)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.representative
def test_vader_real_counts():
    rows = data.load_vader()
    assert {d: len(r) for d, r in rows.items()} == {
        "movies": 10605,
        "amazon": 3708,
        "tweets": 4200,
        "nyt": 5190,
    }
    labels = {
        d: collections.Counter(y for _, y in data.sentiment_examples(r)) for d, r in rows.items()
    }
    assert labels["tweets"] == {1: 2300, 0: 1062}
    assert labels["movies"] == {1: 4982, 0: 5061}
    assert labels["amazon"] == {1: 1725, 0: 1218}
    assert labels["nyt"] == {1: 1100, 0: 1688}
    assert all(-4.0 <= r <= 4.0 and text for d in rows.values() for text, r in d)
    train, val, test = data.split(data.sentiment_examples(rows["movies"]), seed=0)
    assert len(train) + len(val) + len(test) == 10043


@pytest.mark.slow
def test_chatterbot_real_six_languages():
    out = data.load_chatterbot_topics()
    assert list(out) == ["en", "it", "ja", "ko", "zh", "uk"]
    for lang, examples in out.items():
        topics = {t for _, t in examples}
        assert topics == set(data.DEFAULT_CHATTERBOT_TOPICS), lang
        assert len(examples) > 500, lang
        assert len({text for text, _ in examples}) == len(examples), lang
