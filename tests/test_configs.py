"""Every config under configs/ composes, and holds what it claims (the paper's settings)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest

pytest.importorskip("hydra")

from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tram.experiments.run import CONFIG_DIR, REGULARIZERS, training_arguments, validate
from tram.experiments.tasks import ExperimentError, check_task_config

GROUPS = ("task", "model", "optimizer", "trainer", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str]):
    """The composed config, with its hydra node (cached: composing takes a while)."""
    return _compose(tuple(overrides))


@functools.cache
def _compose(overrides: tuple[str, ...]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def test_config_directory_is_the_repository_one():
    assert Path(__file__).resolve().parents[1] / "configs" == CONFIG_DIR
    assert (CONFIG_DIR / "finetune.yaml").is_file()


def test_groups_hold_the_documented_options():
    assert {"adamw", "sam", "asam", "fsam", "r3f", "r4f", "trpo", "mesa"} <= set(
        options("optimizer")
    )
    assert {"tram_x", "tram_theta0", "tram_prev", "tram_fisher"} <= set(options("optimizer"))
    assert {"minilm", "multilingual_e5", "smollm2", "xlm_roberta_base", "gpt2"} <= set(
        options("model")
    )
    assert {"vader_sentiment", "chatterbot_topics", "vader_lm", "xnli", "m2d2_wiki"} <= set(
        options("task")
    )
    assert set(options("trainer")) == {"cpu", "gpu", "ddp"}
    assert {"smoke", "sentiment_default", "xnli_paper", "m2d2_paper"} <= set(options("experiment"))


def test_default_config():
    cfg = compose_config([])
    assert (cfg.task.name, cfg.model.name, cfg.optimizer.name) == (
        "vader_sentiment",
        "minilm",
        "adamw",
    )
    assert cfg.trainer.use_cpu is True
    validate(cfg)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert OmegaConf.to_container(cfg, resolve=False)
        check_task_config(cfg.task)
        assert cfg.optimizer.name
        assert cfg.model.name
        assert cfg.task.name


@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_optimizer_is_a_valid_spec(optimizer):
    cfg = compose_config([f"optimizer={optimizer}"])
    assert cfg.optimizer.name == optimizer
    validate(cfg)  # the method name and its arguments, or the regularizer and its arguments
    spec = cfg.optimizer
    assert (spec.method is None) or (spec.regularizer is None), "one trust region per config"
    if spec.regularizer is not None:
        assert spec.regularizer.name in REGULARIZERS


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    validate(cfg)
    if cfg.task.type == "lm":
        assert cfg.model.kind == "decoder"
    assert cfg.hydra.job.chdir is False


def test_paper_hyperparameters():
    """paper.md §7-8: SAM 0.05, ASAM 0.5, FSAM (0.1, 0.1), R3F σ=λ=0.1, TRPO λ=0.1, MESA 0.999."""
    get = {name: compose_config([f"optimizer={name}"]).optimizer for name in options("optimizer")}
    assert get["sam"].kwargs.rho == 0.05
    assert get["asam"].kwargs.rho == 0.5
    assert (get["fsam"].method, get["fsam"].kwargs.rho, get["fsam"].kwargs.eta) == (
        "fisher_sam",
        0.1,
        0.1,
    )
    assert (get["r3f"].regularizer.sigma, get["r3f"].regularizer.weight) == (0.1, 0.1)
    assert get["trpo"].regularizer.weight == 0.1
    assert (get["mesa"].regularizer.decay, get["mesa"].regularizer.weight) == (0.999, 0.1)
    regions = {n: get[n].kwargs.trust_region for n in get if n.startswith("tram_")}
    assert regions == {
        "tram_x": "noise",
        "tram_theta0": "pretrained",
        "tram_prev": "previous",
        "tram_fisher": "fisher",
    }
    assert get["tram_x"].kwargs.sigma == 0.1


@pytest.mark.parametrize("experiment", ["xnli_paper", "m2d2_paper"])
def test_paper_presets(experiment):
    """paper.md §9.1: 50k steps, lr 2e-5, 10k warm-up, polynomial decay, Adam (0.9, 0.99)."""
    cfg = compose_config([f"experiment={experiment}"])
    train = cfg.train
    assert (train.max_steps, train.lr, train.warmup_steps) == (50000, 2e-5, 10000)
    assert train.scheduler == "polynomial"
    assert list(train.adam_betas) == [0.9, 0.99]
    assert cfg.trainer.use_cpu is False
    if experiment == "xnli_paper":
        assert (cfg.model.name, cfg.task.name, train.batch_size) == ("xlm_roberta_base", "xnli", 32)
        assert len(cfg.task.domains) == 15
        assert cfg.task.train_domain == "en"
    else:
        assert (cfg.model.name, cfg.task.name, train.batch_size) == ("gpt2", "m2d2_wiki", 16)
        assert cfg.task.block_size == 1024
        assert len(cfg.task.domains) == 11


def test_main_job_preset_is_offline_and_small():
    cfg = compose_config(["experiment=sentiment_default"])
    assert (cfg.task.source, cfg.model.source, cfg.trainer.use_cpu) == ("vader", "minilm", True)
    assert cfg.train.max_steps * cfg.train.batch_size <= 16 * 250


def test_topics_preset_freezes_the_embedding_table():
    cfg = compose_config(["experiment=topics_default"])
    assert cfg.model.name == "multilingual_e5"
    assert cfg.model.freeze_embeddings is True
    assert cfg.model.text_prefix == "query: "


def test_run_and_sweep_directories_name_optimizer_and_seed():
    cfg = compose_config(["optimizer=sam", "seed=3"])
    assert cfg.hydra.run.dir.endswith("_sam_seed3")
    assert "${optimizer.name}_seed${seed}" in OmegaConf.to_container(cfg.hydra.sweep)["subdir"]


def test_unknown_group_value_names_the_options():
    with pytest.raises(MissingConfigException, match="optimizer/nope") as error:
        compose_config(["optimizer=nope"])
    assert "tram_x" in str(error.value)  # Hydra lists the available options


def test_training_arguments_from_the_config(tmp_path):
    from transformers import TrainingArguments

    cfg = compose_config(["experiment=smoke"])
    args = training_arguments(cfg, tmp_path)
    assert (args.max_steps, args.per_device_train_batch_size) == (20, 8)
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.99)
    assert args.report_to == ["tensorboard"]
    assert args.disable_tqdm is False
    for trainer in ("gpu", "ddp"):
        keys = set(OmegaConf.to_container(compose_config([f"trainer={trainer}"]).trainer))
        assert keys <= set(inspect.signature(TrainingArguments.__init__).parameters)


def test_unknown_trainer_key_is_an_error(tmp_path):
    cfg = compose_config(["+trainer.no_such_field=1"])
    with pytest.raises(ExperimentError, match="no_such_field"):
        training_arguments(cfg, tmp_path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optimizer=sam", "optimizer.method=nosuch"], "Unknown optimizer method"),
        (["optimizer=r3f", "optimizer.regularizer.name=nosuch"], "unknown regularizer"),
        (["optimizer=r3f", "+optimizer.regularizer.radius=1"], "radius"),
        (["task=vader_lm", "model=minilm"], "needs a causal LM"),
        (["optimizer=r4f", "task=vader_lm", "model=smollm2"], "classification"),
        (["task.train_domain=imdb"], "train_domain"),
        (["task.source=nosuch"], "unknown source"),
    ],
)
def test_validate_rejects(overrides, match):
    with pytest.raises(ExperimentError, match=match):
        validate(compose_config(overrides))
