"""The main job: its preset is the cross-domain benchmark's budget, its sweeps and its closing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tram.experiments import generalization, main_job, report
from tram.experiments.run import CONFIG_DIR


def composed(overrides: list[str]) -> dict:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_preset_is_the_benchmark_budget_with_fewer_evaluation_examples():
    quick = composed([f"experiment={main_job.DEFAULT_EXPERIMENT}"])
    benchmark = composed(list(generalization.BUDGETS["cross_domain"]))
    assert quick["task"].pop("max_eval_examples") == 300
    assert benchmark["task"].pop("max_eval_examples") == 1000
    assert quick["name"] == "vader_sentiment_quick"
    for key in ("train", "task", "model", "trainer", "optimizer", "evaluate", "diagnostics"):
        assert quick[key] == benchmark[key], key
    assert (quick["train"]["max_steps"], quick["train"]["lr"]) == (80, 1e-4)


def test_tuned_values_are_the_benchmarks_choice():
    selection = Path(__file__).parents[1] / "benchmarks/results/generalization/cross_domain"
    chosen = json.loads((selection / "selection.json").read_text())
    tuned = main_job.TUNED[main_job.DEFAULT_EXPERIMENT]
    for method, overrides in tuned.items():
        entry = chosen[method]
        assert overrides == (f"optimizer.method.{entry['key']}={entry['value']:g}",)
        # ... and they reach the composed config the run is built from
        cfg = composed(
            [f"experiment={main_job.DEFAULT_EXPERIMENT}", f"optimizer={method}", *overrides]
        )
        assert cfg["optimizer"]["method"][entry["key"]] == entry["value"]
    assert (
        chosen["tram_x"]["value"] == composed(["optimizer=tram_x"])["optimizer"]["method"]["sigma"]
    )


def test_sweep_command_per_optimizer(tmp_path):
    command = main_job.sweep_command("sentiment_quick", "sam", "1,2", tmp_path, ["train.lr=3e-5"])
    assert command[:5] == [
        sys.executable,
        "-m",
        "tram.experiments.run",
        "-m",
        "experiment=sentiment_quick",
    ]
    assert command[5:] == [
        "optimizer=sam",
        "seed=1,2",
        f"hydra.sweep.dir={tmp_path / 'sam'}",
        "optimizer.method.rho=0.02",
        "train.lr=3e-5",  # the caller's overrides come last, so they win
    ]
    adamw = main_job.sweep_command("sentiment_quick", "adamw", "1", tmp_path)
    assert not any(part.startswith("optimizer.method") for part in adamw)
    other = main_job.sweep_command("sentiment_default", "sam", "1", tmp_path)
    assert not any(part.startswith("optimizer.method") for part in other)  # tuned for one budget


class FakeSweeps:
    """Stands in for the training subprocesses: writes the results files a sweep would."""

    def __init__(self, fail: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.threads: list[str] = []
        self.fail = fail

    def __call__(self, command: list[str], env: dict[str, str]) -> int:
        self.commands.append(command)
        self.threads.append(env["OMP_NUM_THREADS"])
        args = dict(part.split("=", 1) for part in command if "=" in part)
        optimizer = args["optimizer"]
        if optimizer == self.fail:
            return 3
        for seed in map(int, args["seed"].split(",")):
            gain = {"adamw": 0.0, "sam": 0.01, "tram_x": 0.02}[optimizer] + 0.004 * seed
            domains = {"movies": 0.8 + gain, "amazon": 0.75, "tweets": 0.66 + gain, "nyt": 0.78}
            run = Path(args["hydra.sweep.dir"]) / f"0_{optimizer}_seed{seed}"
            run.mkdir(parents=True)
            results = {
                "task": "vader_sentiment",
                "model": "minilm",
                "optimizer": optimizer,
                "seed": seed,
                "metric": "accuracy",
                "train_domain": "movies",
                "ood_domains": ["amazon", "tweets", "nyt"],
                "domains": {d: {"accuracy": v} for d, v in domains.items()},
                "ood_average": (0.75 + 0.66 + gain + 0.78) / 3,
                "train_time_s": 60.0,
            }
            (run / "results.json").write_text(json.dumps(results))
        return 0


def test_one_seed_ends_with_the_note_and_the_benchmark(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    sweeps = FakeSweeps()
    monkeypatch.setattr(subprocess, "call", sweeps)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main_job.main(["--out", str(tmp_path)]) == 0
    assert sweeps.threads == ["1", "1", "1"]  # main_job.THREADS
    optimizers = [
        dict(p.split("=", 1) for p in c if "=" in p)["optimizer"] for c in sweeps.commands
    ]
    assert optimizers == ["adamw", "sam", "tram_x"]
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1] == main_job.BENCHMARK
    assert f"- vader_sentiment · minilm: {report.ONE_SEED}." in printed
    assert "no method beats adamw" in main_job.BENCHMARK.lower()
    assert "benchmarks/results/generalization/cross_domain/" in main_job.BENCHMARK
    assert report.ONE_SEED in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    plt.close("all")


def test_a_failed_sweep_stops_the_job(tmp_path, monkeypatch, capsys):
    sweeps = FakeSweeps(fail="sam")
    monkeypatch.setattr(subprocess, "call", sweeps)
    assert main_job.main(["--out", str(tmp_path), "--seeds", "1,2"]) == 3
    assert len(sweeps.commands) == 2  # tram_x never started
    assert "the sam sweep failed (exit code 3)" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_empty_optimizer_list_is_refused(capsys):
    with pytest.raises(SystemExit):
        main_job.main(["--optimizers", " , "])
    assert "--optimizers: expected comma-separated names, got ' , '" in capsys.readouterr().err


def test_threads_from_the_option_or_the_environment(tmp_path, monkeypatch, capsys):
    sweeps = FakeSweeps()
    monkeypatch.setattr(subprocess, "call", sweeps)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert main_job.main(["--out", str(tmp_path / "a"), "--optimizers", "adamw"]) == 0
    assert (
        main_job.main(["--out", str(tmp_path / "b"), "--optimizers", "adamw", "--threads", "2"])
        == 0
    )
    assert sweeps.threads == ["5", "2"]
    assert "+ OMP_NUM_THREADS=5 " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main_job.main(["--threads", "0"])
    assert "--threads: expected a positive number, got 0" in capsys.readouterr().err
