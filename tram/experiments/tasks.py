"""Task builders: the examples of every domain (or language), tokenised, and their metrics.

A task config (``configs/task/*.yaml``) names a *source* and a training domain; every domain in
``domains`` is evaluated, the training domain being the in-domain one:

- ``vader``: cross-domain sentiment on VADER's four domains (binary, the neutral band dropped).
- ``chatterbot``: cross-lingual topic classification on chatterbot-corpus (one language per
  domain).
- ``vader_lm``: causal language modelling on VADER's four domains of text (perplexity).
- ``hub``: a Hugging Face Hub data set (``datasets`` package and a network needed), one dataset
  config per domain, e.g. XNLI (classification) or M2D2 (language modelling).

Offline sources have no splits; each domain gets a seeded stratified train/validation/test split
(``split_seed``, ``split``). Training uses the training domain's train split; the in-domain test
set is its test split; the other domains are evaluated on their test split, or on every example
with ``ood_split: all`` (they are never trained on). ``max_eval_examples`` caps each evaluation
set (a seeded random subset: the splits are shuffled).

Loading (:func:`load_task`) needs no tokenizer, so a missing data set is reported before a model
is loaded; :func:`encode_task` then tokenises. Nothing here imports Hydra: the functions take any
mapping with the config's keys.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SOURCES",
    "Blocks",
    "EncodedTask",
    "ExperimentError",
    "Rows",
    "TaskData",
    "accuracy",
    "argmax_logits",
    "check_task_config",
    "encode_task",
    "load_task",
]

SOURCES = ("vader", "chatterbot", "vader_lm", "hub")
TASK_TYPES = ("classification", "lm")
VADER_LABELS = ["negative", "positive"]


class ExperimentError(ValueError):
    """A configuration that cannot run: raised before any training, naming the cause."""


Example = tuple[tuple[str, ...], int]
"""A classification example: its text(s) and the label index."""


@dataclass
class TaskData:
    """The raw examples of a task: classification ``Example`` tuples or LM texts."""

    name: str
    type: str
    train_domain: str
    domains: list[str]
    labels: list[str] | None
    train: list[Any]
    validation: list[Any]
    test: dict[str, list[Any]]

    @property
    def ood_domains(self) -> list[str]:
        return [d for d in self.domains if d != self.train_domain]


@dataclass
class EncodedTask:
    """Tokenised datasets, the collator, and per-domain facts for the results file."""

    train: Rows | Blocks
    validation: Rows | Blocks
    test: Mapping[str, Rows | Blocks]
    collator: Any
    majority: dict[str, float] = field(default_factory=dict)


class Rows(torch.utils.data.Dataset):
    """A list of feature dicts as a map-style dataset."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


# ------------------------------------------------------------------------------ loading


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def check_task_config(cfg: Mapping[str, Any]) -> None:
    """Check the task config's shape (no data is read)."""
    name = cfg.get("name", "?")
    if cfg.get("type") not in TASK_TYPES:
        raise ExperimentError(
            f"task {name!r}: type must be one of {TASK_TYPES}, got {cfg.get('type')!r}"
        )
    if cfg.get("source") not in SOURCES:
        raise ExperimentError(
            f"task {name!r}: unknown source {cfg.get('source')!r}; choose from {SOURCES}"
        )
    domains = list(cfg.get("domains") or [])
    if cfg.get("train_domain") not in domains:
        raise ExperimentError(
            f"task {name!r}: train_domain {cfg.get('train_domain')!r} must be one of its "
            f"domains {domains}"
        )
    if cfg.get("ood_split", "test") not in ("test", "all"):
        raise ExperimentError(f"task {name!r}: ood_split must be 'test' or 'all'")


def load_task(cfg: Mapping[str, Any]) -> TaskData:
    """Read and split the examples of every domain of the task ``cfg``.

    Raises:
        ExperimentError: a malformed task config.
        FileNotFoundError, tram.experiments.assets.AssetUnavailableError: the data cannot be had
            (the message names the file or package).
    """
    check_task_config(cfg)
    source = cfg["source"]
    if source == "hub":
        return _load_hub(cfg)
    per_domain, labels = _load_offline(cfg)
    fractions = tuple(float(f) for f in _get(cfg, "split", (0.8, 0.1, 0.1)))
    seed = int(_get(cfg, "split_seed", 0))
    stratify = cfg["type"] == "classification"
    from tram.experiments.data import split

    train_domain = cfg["train_domain"]
    parts = {
        d: split(ex, seed=seed, fractions=fractions, stratify=stratify)
        for d, ex in per_domain.items()
    }
    test: dict[str, list[Any]] = {}
    for domain in cfg["domains"]:
        train, validation, held_out = parts[domain]
        if domain != train_domain and cfg.get("ood_split", "test") == "all":
            held_out = train + validation + held_out
        test[domain] = held_out
    train, validation, _ = parts[train_domain]
    return _finish(cfg, labels, train, validation, test)


def _finish(
    cfg: Mapping[str, Any],
    labels: list[str] | None,
    train: list[Any],
    validation: list[Any],
    test: dict[str, list[Any]],
) -> TaskData:
    # Caps count examples here; language-modelling caps count blocks (see _encode_lm).
    classification = cfg["type"] == "classification"
    max_train = cfg.get("max_train_examples") if classification else None
    max_eval = cfg.get("max_eval_examples") if classification else None
    if max_train is not None:
        train = train[: int(max_train)]
    if max_eval is not None:
        validation = validation[: int(max_eval)]
        test = {d: ex[: int(max_eval)] for d, ex in test.items()}
    for domain, examples in [(cfg["train_domain"] + " (train)", train), *test.items()]:
        if not examples:
            raise ExperimentError(f"task {cfg['name']!r}: domain {domain} has no examples")
    return TaskData(
        name=cfg["name"],
        type=cfg["type"],
        train_domain=cfg["train_domain"],
        domains=list(cfg["domains"]),
        labels=labels,
        train=train,
        validation=validation,
        test=test,
    )


def _load_offline(cfg: Mapping[str, Any]) -> tuple[dict[str, list[Any]], list[str] | None]:
    from tram.experiments import data

    root = cfg.get("data_dir")
    root = None if root in (None, "") else Path(str(root)).expanduser()
    domains = list(cfg["domains"])
    source = cfg["source"]
    if source in ("vader", "vader_lm"):
        unknown = [d for d in domains if d not in data.VADER_DOMAINS]
        if unknown:
            raise ExperimentError(
                f"task {cfg['name']!r}: unknown VADER domain(s) {unknown}; choose from "
                f"{list(data.VADER_DOMAINS)}"
            )
        rows = data.load_vader(root, domains=domains)
        if source == "vader_lm":
            return {d: [text for text, _ in r] for d, r in rows.items()}, None
        threshold = float(_get(cfg, "threshold", 0.5))
        return {
            d: [((text,), label) for text, label in data.sentiment_examples(r, threshold=threshold)]
            for d, r in rows.items()
        }, list(VADER_LABELS)
    # chatterbot: one language per domain, labels = the topics shared by all of them
    topics = cfg.get("topics")
    by_language = data.load_chatterbot_topics(
        root, languages=domains, topics=None if topics is None else list(topics)
    )
    codes = list(by_language)
    if codes != domains:  # names given instead of codes: keep the config's domain names
        by_language = dict(zip(domains, by_language.values(), strict=True))
    labels = sorted({topic for examples in by_language.values() for _, topic in examples})
    index = {topic: i for i, topic in enumerate(labels)}
    return {
        d: [((text,), index[topic]) for text, topic in ex] for d, ex in by_language.items()
    }, labels


def _load_hub(cfg: Mapping[str, Any]) -> TaskData:
    hub = cfg.get("hub") or {}
    name = cfg["name"]
    path = hub.get("path")
    if not path:
        raise ExperimentError(f"task {name!r}: source 'hub' needs hub.path (the dataset name)")
    try:
        import datasets
    except ImportError:
        raise ExperimentError(
            f"task {name!r} reads {path!r} from the Hugging Face Hub, which needs the "
            "'datasets' package (pip install datasets) and a network; the offline tasks are "
            "task=vader_sentiment, task=chatterbot_topics and task=vader_lm"
        ) from None
    configs = dict(hub.get("configs") or {})
    splits = {
        "train": "train",
        "validation": "validation",
        "test": "test",
        **(hub.get("splits") or {}),
    }
    kwargs = dict(hub.get("load_kwargs") or {})

    def load(domain: str, split_name: str) -> Any:
        config_name = configs.get(domain, domain)
        try:
            return datasets.load_dataset(path, config_name, split=splits[split_name], **kwargs)
        except Exception as error:  # network, unknown config, script datasets, ...
            raise ExperimentError(
                f"task {name!r}: cannot load {path!r} (config {config_name!r}, split "
                f"{splits[split_name]!r}) from the Hugging Face Hub: {error}"
            ) from error

    train_domain = cfg["train_domain"]
    if cfg["type"] == "lm":
        column = hub.get("text_field", "text")

        def texts(ds: Any) -> list[str]:
            return [t for t in ds[column] if isinstance(t, str) and t.strip()]

        lm_test = {d: texts(load(d, "test")) for d in cfg["domains"]}
        lm_train, lm_validation = (
            texts(load(train_domain, "train")),
            texts(load(train_domain, "validation")),
        )
        return _finish(cfg, None, lm_train, lm_validation, lm_test)

    fields = list(hub.get("text_fields") or ["text"])
    label_field = hub.get("label_field", "label")
    train_ds = load(train_domain, "train")
    labels = list(cfg.get("labels") or [])
    feature = train_ds.features.get(label_field)
    if not labels and getattr(feature, "names", None):
        labels = list(feature.names)
    if not labels:
        raise ExperimentError(f"task {name!r}: give the label names in task.labels")

    def examples(ds: Any) -> list[Example]:
        columns = [ds[f] for f in fields]
        out = []
        for row, label in zip(zip(*columns, strict=True), ds[label_field], strict=True):
            if isinstance(label, int) and 0 <= label < len(labels):  # XNLI marks none with -1
                out.append((tuple(row), label))
        return out

    import random

    train = examples(train_ds)
    random.Random(int(_get(cfg, "split_seed", 0))).shuffle(train)
    validation = examples(load(train_domain, "validation"))
    test = {d: examples(load(d, "test")) for d in cfg["domains"]}
    return _finish(cfg, labels, train, validation, test)


# ------------------------------------------------------------------------------ encoding


def encode_task(
    task: TaskData, tokenizer: Any, cfg: Mapping[str, Any], *, text_prefix: str = ""
) -> EncodedTask:
    """Tokenise the task's examples: padded batches for classification, fixed-length blocks of
    concatenated text (each text closed by the end-of-sequence token) for language modelling."""
    if task.type == "lm":
        return _encode_lm(task, tokenizer, int(_get(cfg, "block_size", 128)), cfg, text_prefix)
    from transformers import DataCollatorWithPadding

    max_length = int(_get(cfg, "max_length", 128))

    def encode(examples: list[Example]) -> Rows:
        if not examples:
            return Rows([])
        width = len(examples[0][0])
        columns = [
            [text_prefix + ex[0][i] if i == 0 else ex[0][i] for ex in examples]
            for i in range(width)
        ]
        features = tokenizer(*columns[:2], truncation=True, max_length=max_length)
        keys = list(features.keys())
        rows = [{k: features[k][i] for k in keys} for i in range(len(examples))]
        for row, (_, label) in zip(rows, examples, strict=True):
            row["labels"] = label
        return Rows(rows)

    def by_length(rows: Rows) -> Rows:
        # Evaluation batches are padded to their longest row; sorted rows pad little (about half
        # the evaluation time on VADER). Accuracy and mean loss do not depend on the order.
        return Rows(sorted(rows.rows, key=lambda row: len(row["input_ids"])))

    return EncodedTask(
        train=encode(task.train),
        validation=by_length(encode(task.validation)),
        test={d: by_length(encode(task.test[d])) for d in task.domains},
        collator=DataCollatorWithPadding(tokenizer),
        majority={d: _majority([label for _, label in task.test[d]]) for d in task.domains},
    )


def _majority(labels: Sequence[int]) -> float:
    return Counter(labels).most_common(1)[0][1] / len(labels) if labels else float("nan")


class Blocks(torch.utils.data.Dataset):
    """Consecutive ``block_size`` slices of one token stream, as causal-LM examples."""

    def __init__(self, stream: torch.Tensor, block_size: int, limit: int | None = None) -> None:
        self.stream, self.block_size = stream, block_size
        self.count = len(stream) // block_size
        if limit is not None:
            self.count = min(self.count, limit)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        start = index * self.block_size
        ids = self.stream[start : start + self.block_size].long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _encode_lm(
    task: TaskData, tokenizer: Any, block_size: int, cfg: Mapping[str, Any], prefix: str
) -> EncodedTask:
    import numpy as np
    from transformers import default_data_collator

    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.sep_token_id
    if block_size < 2:
        raise ExperimentError(f"task {task.name!r}: block_size must be >= 2, got {block_size}")

    def blocks(texts: list[str], limit: Any) -> Blocks:
        # Token ids go into int32 arrays (a large corpus would not fit as Python ints), and
        # tokenising stops once the capped number of blocks is there.
        limit = None if limit is None else int(limit)
        wanted = math.inf if limit is None else limit * block_size
        chunks, total = [], 0
        for start in range(0, len(texts), 1000):
            batch = [prefix + t for t in texts[start : start + 1000]]
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids = [[*row, eos] for row in ids]
            chunk = np.fromiter((i for row in ids for i in row), dtype=np.int32)
            chunks.append(chunk)
            total += len(chunk)
            if total >= wanted:
                break
        stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        return Blocks(torch.from_numpy(stream), block_size, limit)

    train = blocks(task.train, cfg.get("max_train_examples"))
    test = {d: blocks(task.test[d], cfg.get("max_eval_examples")) for d in task.domains}
    for domain, dataset in [("train", train), *test.items()]:
        if len(dataset) == 0:
            raise ExperimentError(
                f"task {task.name!r}: domain {domain} has fewer than block_size={block_size} "
                "tokens of text"
            )
    validation = blocks(task.validation, cfg.get("max_eval_examples"))
    return EncodedTask(train, validation, test, collator=default_data_collator)


# ------------------------------------------------------------------------------ metrics


def argmax_logits(logits: Any, labels: Any) -> Any:
    """``preprocess_logits_for_metrics``: keep the predicted class, not the logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` for classification: the fraction of correct predictions."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    return {"accuracy": float((predictions == labels).mean())}
