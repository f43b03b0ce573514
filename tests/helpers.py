"""Helpers shared by several test files: tiny Hugging Face models built from configs (no hub),
TensorBoard scalars, the README examples run as scripts, and distributed workers' records.

Only torch is imported at module level; transformers and tensorboard are imported by the
helpers that need them, after the calling test file has checked they are installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def tiny_bert_config(*, dropout: float = 0.0, **overrides: Any) -> Any:
    """A two-layer, 32-wide BERT config with a 100-token vocabulary and three labels."""
    import transformers

    settings: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "vocab_size": 100,
        "max_position_embeddings": 16,
        "num_labels": 3,
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }
    return transformers.BertConfig(**{**settings, **overrides})


def tiny_bert(*, seed: int = 0, dropout: float = 0.0, **overrides: Any) -> nn.Module:
    """A randomly initialised ``BertForSequenceClassification`` (seeded) of that config."""
    import transformers

    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(
        tiny_bert_config(dropout=dropout, **overrides)
    )


def tiny_gpt2(*, seed: int = 0, dropout: float = 0.0, **overrides: Any) -> nn.Module:
    """A randomly initialised (seeded) two-layer, 32-wide ``GPT2LMHeadModel``, vocabulary 100."""
    import transformers

    settings: dict[str, Any] = {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "vocab_size": 100,
        "n_positions": 16,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **overrides}))


def wrapped(module: nn.Module) -> nn.Module:
    """``module`` inside a real torch wrapper that keeps it in ``.module``, as
    DistributedDataParallel does: ``nn.DataParallel``, which on CPU just calls the module."""
    return nn.DataParallel(module)


def read_scalars(directory: Path) -> dict[str, list[float]]:
    """Every TensorBoard scalar under ``directory`` (searched recursively), by tag, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events under {directory}"
    for path in files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return scalars


def run_example(script: str, method: str, *extra: str) -> str:
    """Run ``examples/<script>`` offline with a real model for two tiny steps; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        str(ROOT / "examples" / script),
        f"--method={method}",
        "--steps=2",
        "--batch-size=4",
        "--train-size=16",
        "--eval-size=16",
        "--max-length=16",
        *extra,
    ]
    completed = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert f"method: {method}" in completed.stdout
    assert "accuracy on amazon" in completed.stdout
    return completed.stdout


def scenario_records(results: list[dict], name: str) -> list[dict]:
    """One distributed scenario's records, one per rank; a worker's error fails the test."""
    records = [r[name] for r in results]
    for rank, record in enumerate(records):
        if "error" in record:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{record['error']}", pytrace=False)
    return records
