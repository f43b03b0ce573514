"""The asset cache: its root, the completeness marker, and building an entry exactly once.

Each entry is complete once its marker file ``.tram-complete`` exists: it is written into a
temporary sibling directory after everything else, and the directory is then renamed into
place, so an interrupted fetch or conversion is simply redone on the next call. A file lock per
entry (``filelock``, under ``<cache>/locks``) makes concurrent processes and threads (DDP
ranks, parallel pytest workers) wait for one another instead of building twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ENV_CACHE", "MARKER", "AssetUnavailableError", "build_once", "cache_dir", "is_complete"]

ENV_CACHE = "TRAM_CACHE"
"""Environment variable naming the cache root (default ``~/.cache/tram``)."""
MARKER = ".tram-complete"
"""Name of the file whose presence marks a complete cache entry."""


class AssetUnavailableError(RuntimeError):
    """An asset could not be fetched or prepared (pip failed, offline, unexpected contents)."""


def cache_dir() -> Path:
    """Return the cache root: ``$TRAM_CACHE`` if set and non-empty, else ``~/.cache/tram``.

    The directory is not created here; the fetch functions create what they need.
    """
    env = os.environ.get(ENV_CACHE, "").strip()
    root = Path(env) if env else Path.home() / ".cache" / "tram"
    return root.expanduser().absolute()


def is_complete(dest: Path) -> bool:
    """Whether the cache entry ``dest`` is complete (its marker exists)."""
    return (dest / MARKER).is_file()


def build_once(dest: Path, build: Callable[[Path], dict[str, Any]], *, lock_key: str) -> Path:
    """Create ``dest`` with ``build(tmp_dir)`` unless it is already complete; return ``dest``.

    ``build`` fills a fresh temporary sibling directory and returns provenance information,
    which goes into the marker file. The marker is written last and the temporary directory
    is then renamed to ``dest``, so ``dest`` is either absent, stale (no marker: rebuilt) or
    complete. Concurrent callers serialise on the lock ``<cache>/locks/<lock_key>.lock`` and
    the later ones find the entry complete.
    """
    from filelock import FileLock

    if is_complete(dest):
        return dest
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{lock_key}.lock"):
        if is_complete(dest):
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
