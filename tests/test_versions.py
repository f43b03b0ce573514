"""The oldest supported releases: one list (``tram._versions.MINIMUM_VERSIONS``) that
``setup.cfg``'s floors and ``.ci/oldest.txt``'s pins repeat, and the refusal of older ones."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

from tram._versions import MINIMUM_VERSIONS, release, require

ROOT = Path(__file__).resolve().parent.parent


def trimmed(version: str) -> tuple[int, ...]:
    """``release`` without trailing zeros, so that ``2.12`` and ``2.12.0`` compare equal."""
    parts = list(release(version))
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def setup_cfg_floors() -> dict[str, set[str]]:
    """Every ``name>=version`` of ``install_requires`` and the extras, by name."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra in config["options.extras_require"].values():
        lines += extra.splitlines()
    floors: dict[str, set[str]] = {}
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", line)
        if match:
            floors.setdefault(match.group(1).lower(), set()).add(match.group(2))
    return floors


def oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


@pytest.mark.parametrize("package", sorted(MINIMUM_VERSIONS))
def test_setup_cfg_and_the_oldest_job_name_the_same_floor(package: str) -> None:
    floors = setup_cfg_floors()
    assert package in floors, f"setup.cfg has no floor for {package}"
    assert {trimmed(v) for v in floors[package]} == {trimmed(MINIMUM_VERSIONS[package])}
    assert oldest_pins()[package] == MINIMUM_VERSIONS[package]


def test_the_oldest_job_pins_every_floor_of_setup_cfg() -> None:
    """``make test-oldest`` installs each package ``setup.cfg`` names at its floor, so that
    every floor is one the suite ran on (a stated floor never tested said scipy 1.10, whose
    Wilcoxon p-values differ, and gguf 0.10, which does not import)."""
    pins = oldest_pins()
    floors = setup_cfg_floors()
    for package, versions in sorted(floors.items()):
        assert package in pins, f".ci/oldest.txt does not pin {package}"
        assert len({trimmed(v) for v in versions}) == 1, (package, versions)
        assert trimmed(pins[package]) == trimmed(next(iter(versions))), (package, pins[package])


def test_the_oldest_job_pins_both_names_of_lightning_alike() -> None:
    pins = oldest_pins()
    assert pins["pytorch-lightning"] == pins["lightning"]


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("2.5.6", (2, 5, 6)),
        ("2.5.6.post0", (2, 5, 6)),
        ("2.13.0+cpu", (2, 13, 0)),
        ("5.6.0rc1", (5, 6, 0)),
        (" 1.14 ", (1, 14)),
    ],
)
def test_release_is_the_numeric_part(version: str, expected: tuple[int, ...]) -> None:
    assert release(version) == expected


def test_release_refuses_what_is_not_a_version() -> None:
    with pytest.raises(ValueError, match=r"version must start with a number, but got 'dev'"):
        release("dev")


@pytest.mark.parametrize("installed", ["2.5.5", "2.4.9", "1.99.99", "2.5.5.post1"])
def test_an_older_release_is_refused_with_the_fix(installed: str) -> None:
    assert MINIMUM_VERSIONS["lightning"] == "2.5.6"
    message = (
        r"tram.integrations.lightning needs lightning>=2.5\.6 \(the oldest release tram is "
        rf"tested with\), but found lightning {re.escape(installed)}; upgrade it: "
        r"pip install -U 'lightning>=2\.5\.6'"
    )
    with pytest.raises(ImportError, match=f"^{message}$"):
        require("lightning", installed, needed_by="tram.integrations.lightning")


@pytest.mark.parametrize("installed", ["2.5.6", "2.5.6.post0", "2.5.10", "2.6.0", "3.0.0"])
def test_the_oldest_release_and_newer_ones_pass(installed: str) -> None:
    require("lightning", installed, needed_by="tram.integrations.lightning")


def test_the_installed_frameworks_meet_the_floors() -> None:
    """What this environment runs the suite with is at or above every floor (so the checks at
    import let the suite through, and the floors are no newer than what it tests)."""
    import importlib.metadata

    for package, minimum in MINIMUM_VERSIONS.items():
        assert release(importlib.metadata.version(package)) >= release(minimum), package


# One release below each floor, as each check is told it.
BELOW_THE_FLOOR = {
    "transformers": "5.5.0",
    "accelerate": "1.13.0",
    "trl": "1.15.2",
    "lightning": "2.5.3",
    "peft": "0.13.2",
}

CHECKS_AT_IMPORT = r"""
import importlib, importlib.metadata, json, sys
real_version = importlib.metadata.version
old = json.loads(sys.argv[1])
outcome = {}

def importing(module, package):
    importlib.metadata.version = lambda name: old[name] if name == package else real_version(name)
    for name in [m for m in sys.modules if m.startswith("tram.integrations")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
        outcome[package] = None
    except ImportError as error:
        outcome[package] = str(error)
    finally:
        importlib.metadata.version = real_version

importing("tram.integrations.hf", "transformers")
importing("tram.integrations.hf", "accelerate")
importing("tram.integrations.trl", "trl")
import lightning.pytorch as pl
installed, pl.__version__ = pl.__version__, old["lightning"]
for name in [m for m in sys.modules if m.startswith("tram.integrations")]:
    del sys.modules[name]
try:
    import tram.integrations.lightning
    outcome["lightning"] = None
except ImportError as error:
    outcome["lightning"] = str(error)
pl.__version__ = installed
from peft import LoraConfig, get_peft_model
import torch
from tram.adapters import AdapterOff
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), LoraConfig(target_modules=["0"]))
importlib.metadata.version = lambda name: old[name] if name == "peft" else real_version(name)
try:
    AdapterOff().bind(model)
    outcome["peft"] = None
except ImportError as error:
    outcome["peft"] = str(error)
print(json.dumps(outcome))
"""


def test_each_integration_refuses_a_release_older_than_its_floor() -> None:
    """In a fresh interpreter, each framework reported one release below its floor: importing
    the integration (binding ``AdapterOff`` for PEFT) raises ``ImportError`` with the fix."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", CHECKS_AT_IMPORT, json.dumps(BELOW_THE_FLOOR)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(outcome) == set(BELOW_THE_FLOOR)
    for package, installed in BELOW_THE_FLOOR.items():
        minimum = MINIMUM_VERSIONS[package]
        assert release(installed) < release(minimum), package
        assert outcome[package] is not None, f"{package} {installed} was not refused"
        assert f"needs {package}>={minimum}" in outcome[package]
        assert f"but found {package} {installed}; upgrade it" in outcome[package]
