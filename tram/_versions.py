"""The oldest release of each framework that tram's integrations are tested against.

``MINIMUM_VERSIONS`` is the one list: ``setup.cfg``'s extras name the same floors,
``.ci/oldest.txt`` pins them for ``make test-oldest`` (``tests/test_versions.py`` checks that the
three agree), and each integration refuses an older release when it is imported or bound, with
the command that fixes it. Older releases are refused rather than tried because the suite showed
them taking other steps: transformers 5.5's Trainer and the hand-written loop part with
gradient accumulation, Lightning 2.5.3's manual optimization under ``"16-mixed"`` steps away from
``tram.scaled_step``, accelerate 1.13 cannot resume an FSDP2 run, PEFT 0.13 lacks the LoRA
layer types ``tram.adapters`` replays.
"""

from __future__ import annotations

import importlib.metadata
import re

__all__ = ["MINIMUM_VERSIONS", "release", "require", "require_installed"]

MINIMUM_VERSIONS: dict[str, str] = {
    "torch": "2.12.0",
    "transformers": "5.6.0",
    "accelerate": "1.14.0",
    "trl": "1.16.0",
    "lightning": "2.5.6",
    "peft": "0.14.0",
}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.5.6.post0"`` and ``"2.5.6rc1"`` give
    ``(2, 5, 6)``, ``"2.13.0+cpu"`` gives ``(2, 13, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"version must start with a number, but got {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def require(package: str, installed: str, *, needed_by: str) -> None:
    """Raise ``ImportError`` when ``installed`` (the version of ``package`` found) is older
    than ``MINIMUM_VERSIONS[package]``; the message names both and the fix."""
    minimum = MINIMUM_VERSIONS[package]
    if release(installed) < release(minimum):
        raise ImportError(
            f"{needed_by} needs {package}>={minimum} (the oldest release tram is tested with), "
            f"but found {package} {installed}; upgrade it: pip install -U '{package}>={minimum}'"
        )


def require_installed(package: str, *, needed_by: str) -> None:
    """:func:`require` with the installed distribution's version."""
    require(package, importlib.metadata.version(package), needed_by=needed_by)
