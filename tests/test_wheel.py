"""The built wheel works on its own: installed entry points find the configs shipped inside it.

The test builds the wheel from a copy of the sources, installs it into a fresh virtual
environment that cannot import the checkout, and runs the two console scripts from a directory
outside the checkout. The fresh environment borrows the running environment's installed
packages (torch, transformers, Hydra, ...) through a path file rather than installing them
again, which keeps the test within seconds and offline; path files processed that way do not
run the running environment's own path files, so its editable install of tram (a meta-path
finder that would import the checkout) stays out. Every script asserts where ``tram`` was
imported from.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("hydra")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "tram", "configs")
TIMEOUT = 300


def _run(command: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh virtual environment with the wheel installed; its bin folder and a work folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = tmp / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "-w",
            str(dist),
            str(source),
        ],
        cwd=tmp,
        env=env,
    )
    (wheel,) = dist.glob("tram-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=tmp,
        env=env,
    ).stdout.strip()
    borrowed = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (Path(purelib) / "_borrowed_site_packages.pth").write_text(
        "".join(f"{path}\n" for path in dict.fromkeys(borrowed))
    )
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--quiet",
            str(wheel),
        ],
        cwd=tmp,
        env=env,
    )
    work = tmp / "elsewhere"
    work.mkdir()
    return {"bin": python.parent, "python": python, "venv": venv, "work": work, "env": env}


def test_the_wheel_imports_tram_from_itself_with_its_configs(installed):
    script = (
        "import json, tram, tram.experiments.run as run; "
        "print(json.dumps({'tram': tram.__file__, 'configs': str(run.CONFIG_DIR)}))"
    )
    python = str(installed["python"])
    out = _run([python, "-c", script], cwd=installed["work"], env=installed["env"])
    where = json.loads(out.stdout.strip().splitlines()[-1])
    venv = installed["venv"].resolve()
    assert Path(where["tram"]).resolve().is_relative_to(venv), where
    configs = Path(where["configs"])
    assert configs.resolve().is_relative_to(venv), where
    assert configs.parent.name == "experiments"
    assert configs.name == "configs"
    shipped = sorted(p.relative_to(configs).as_posix() for p in configs.rglob("*.yaml"))
    source_dir = ROOT / "configs"
    source = sorted(p.relative_to(source_dir).as_posix() for p in source_dir.rglob("*.yaml"))
    assert shipped == source


def test_installed_tram_finetune_composes_the_smoke_experiment(installed):
    command = [str(installed["bin"] / "tram-finetune"), "experiment=smoke", "optimizer=tram_x"]
    out = _run([*command, "--cfg", "job", "--resolve"], cwd=installed["work"], env=installed["env"])
    assert "name: smoke_vader_sentiment" in out.stdout
    assert "max_steps: 20" in out.stdout
    assert "name: tram_x" in out.stdout


def test_installed_tram_finetune_takes_a_user_config_dir(installed, tmp_path):
    user = tmp_path / "my_configs" / "optimizer"
    user.mkdir(parents=True)
    (user / "my_sam.yaml").write_text(
        "defaults: [sam, _self_]\nname: my_sam\nmethod:\n  rho: 0.0371\n"
    )
    command = [str(installed["bin"] / "tram-finetune"), "--config-dir", str(user.parent)]
    out = _run(
        [*command, "experiment=smoke", "optimizer=my_sam", "--cfg", "job"],
        cwd=installed["work"],
        env=installed["env"],
    )
    assert "name: my_sam" in out.stdout
    assert "rho: 0.0371" in out.stdout


def test_installed_tram_report_aggregates_a_sweep(installed, tmp_path):
    sweep = tmp_path / "sweep"
    for optimizer, seed, accuracy in [
        ("adamw", 1, 0.61),
        ("adamw", 2, 0.64),
        ("sam", 1, 0.66),
        ("sam", 2, 0.63),
    ]:
        run = sweep / f"{optimizer}_seed{seed}"
        run.mkdir(parents=True)
        domains = {
            "movie": {"accuracy": accuracy, "loss": 1.0, "examples": 10},
            "tweets": {"accuracy": accuracy - 0.07, "loss": 1.2, "examples": 10},
        }
        results = {
            "task": "vader_sentiment",
            "model": "minilm",
            "optimizer": optimizer,
            "seed": seed,
            "metric": "accuracy",
            "higher_is_better": True,
            "train_domain": "movie",
            "ood_domains": ["tweets"],
            "domains": domains,
            "in_domain": accuracy,
            "ood_average": accuracy - 0.07,
            "train_time_s": 10.0 + seed,
            "steps": 20,
            "mean_radius": None,
        }
        (run / "results.json").write_text(json.dumps(results))
    out = _run(
        [str(installed["bin"] / "tram-report"), str(sweep), "--no-plot"],
        cwd=installed["work"],
        env=installed["env"],
    )
    report = (sweep / "report.md").read_text()
    assert "sam" in report
    assert "adamw" in report
    assert "62.5" in report  # adamw's mean in-domain accuracy, in percent
    assert "62.5" in out.stdout


def test_setup_cfg_lists_every_package():
    """setup.cfg lists its packages (one maps onto configs/); a new subpackage must be added."""
    from setuptools import find_packages

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = config["options"]["packages"].split()
    found = find_packages(str(ROOT), include=["tram", "tram.*"])
    assert sorted(listed) == sorted([*found, "tram.experiments.configs"])
    assert "tram.experiments.configs = configs" in config["options"]["package_dir"]
