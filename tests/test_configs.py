"""Every config under configs/ composes, and holds what it claims (the paper's settings)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import ClassVar

import pytest
import torch

pytest.importorskip("hydra")

from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import tram
from tram.experiments.build import optimizer_parts
from tram.experiments.run import CONFIG_DIR, training_arguments, validate
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
    assert set(options("trainer")) == {"cpu", "gpu", "ddp", "ddp_cpu"}
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
    validate(cfg)  # every _target_ imported, every argument checked against its signature
    parts = optimizer_parts(cfg.optimizer)
    assert parts.base.func is torch.optim.AdamW
    assert (parts.method is None) or not parts.regularizers, "one trust region per config"


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
    assert (get["sam"].method._target_, get["sam"].method.rho) == ("tram.SAM", 0.05)
    assert get["asam"].method.rho == 0.5
    fsam = get["fsam"].method
    assert (fsam._target_, fsam.rho, fsam.eta) == ("tram.FisherSAM", 0.1, 0.1)
    r3f = get["r3f"].regularizers.r3f
    assert (r3f._target_, r3f.sigma, r3f.weight) == ("tram.R3F", 0.1, 0.1)
    assert get["trpo"].regularizers.trpo.weight == 0.1
    assert (get["mesa"].regularizers.mesa.decay, get["mesa"].regularizers.mesa.weight) == (
        0.999,
        0.1,
    )
    regions = {n: get[n].method.trust_region for n in ("tram_x", "tram_theta0", "tram_prev")}
    assert regions == {"tram_x": "noise", "tram_theta0": "pretrained", "tram_prev": "previous"}
    fisher = get["tram_fisher"].method
    assert (fisher._target_, fisher.sigma, fisher.rho, fisher.eta) == (
        "tram.TRAMFisher",
        0.1,
        0.1,
        0.1,
    )
    assert get["tram_x"].method.sigma == 0.1


# What the 0.1 configs (method by name + kwargs, regularizer by name) built: the new _target_
# configs must build the same objects with the same arguments, but for the noise methods' seed,
# which is now the run's (seed=1 by default): each run seed its own noise stream, and with it,
# under torchrun, each rank its own draws (R3F and R4F drew from torch's global generator).
OBJECTS_0_1 = {
    "adamw": (None, {}, None, {}),
    "sam": ("sam", {"rho": 0.05}, None, {}),
    "asam": ("asam", {"rho": 0.5, "eta": 0.01}, None, {}),
    "fsam": ("fisher_sam", {"rho": 0.1, "eta": 0.1}, None, {}),
    "tram_x": ("tram", {"trust_region": "noise", "sigma": 0.1, "seed": 1}, None, {}),
    "tram_theta0": ("tram", {"trust_region": "pretrained"}, None, {}),
    "tram_prev": ("tram", {"trust_region": "previous"}, None, {}),
    "tram_fisher": (
        "tram",
        {"trust_region": "fisher", "sigma": 0.1, "rho": 0.1, "fisher_eta": 0.1, "seed": 1},
        None,
        {},
    ),
    "r3f": (None, {}, "R3F", {"sigma": 0.1, "weight": 0.1, "seed": 1}),
    "r4f": (None, {}, "R4F", {"sigma": 0.1, "weight": 0.1, "seed": 1}),
    "trpo": (None, {}, "TRPO", {"weight": 0.1}),
    "mesa": (None, {}, "MESA", {"weight": 0.1, "decay": 0.999}),
}


def _tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _wrapped(method, kwargs):
    """What TramTrainer builds: the method around an AdamW over a tiny model; its settings."""
    from tram.factory import wrap_optimizer

    model = _tiny_classifier()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapper = wrap_optimizer(method, base, model=model, **kwargs)
    plain = (int, float, str, bool, type(None))
    return (
        type(wrapper),
        [{k: v for k, v in g.items() if k != "params"} for g in wrapper.param_groups],
        {k: v for k, v in vars(wrapper).items() if isinstance(v, plain)},
    )


@pytest.mark.parametrize(
    ("optimizer", "where"),
    [("tram_x", "method"), ("tram_fisher", "method"), ("r3f", "r3f"), ("r4f", "r4f")],
)
def test_the_noise_methods_seed_their_noise_with_the_runs_seed(optimizer, where):
    """Each run seed its own noise stream (and under torchrun each rank its own draws): the
    method's or regularizer's ``seed`` is the run's."""
    cfg = compose_config([f"optimizer={optimizer}", "seed=7"])
    node = cfg.optimizer.method if where == "method" else cfg.optimizer.regularizers[where]
    assert node.seed == 7


@pytest.mark.parametrize("optimizer", sorted(OBJECTS_0_1))
def test_configs_build_what_0_1_built(optimizer):
    pytest.importorskip("transformers")
    cfg = compose_config(["experiment=smoke", f"optimizer={optimizer}"])
    parts = optimizer_parts(cfg.optimizer)
    name, kwargs, regularizer, regularizer_kwargs = OBJECTS_0_1[optimizer]
    if name is None:
        assert parts.method is None
    else:
        assert _wrapped(parts.method.func, parts.method.keywords) == _wrapped(name, kwargs)
    if regularizer is None:
        assert parts.regularizers == {}
    else:
        (built,) = parts.regularizers.values()
        assert (built.func, built.keywords) == (getattr(tram, regularizer), regularizer_kwargs)
    assert set(options("optimizer")) == set(OBJECTS_0_1)


def _training_arguments_0_1(cfg, output_dir):
    """0.1's hand-written mapping from train.* and the trainer group to TrainingArguments, but
    for 0.1's ``prediction_loss_only`` under language modelling: the runner now reduces the
    logits to per-block token losses, whose mean is exact on any number of processes."""
    from transformers import TrainingArguments

    train = cfg.train
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": int(train.max_steps),
        "per_device_train_batch_size": int(train.batch_size),
        "per_device_eval_batch_size": int(train.eval_batch_size),
        "gradient_accumulation_steps": int(train.grad_accum),
        "learning_rate": float(train.lr),
        "weight_decay": float(train.weight_decay),
        "adam_beta1": float(train.adam_betas[0]),
        "adam_beta2": float(train.adam_betas[1]),
        "adam_epsilon": float(train.adam_epsilon),
        "optim": "adamw_torch",
        "lr_scheduler_type": str(train.scheduler),
        "warmup_steps": int(train.warmup_steps),
        "max_grad_norm": float(train.max_grad_norm),
        "logging_steps": int(train.logging_steps),
        "logging_first_step": True,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": ["tensorboard"],
        "disable_tqdm": False,
        "seed": int(cfg.seed),
        "remove_unused_columns": False,
    }
    device = OmegaConf.to_container(cfg.trainer)
    kwargs.update({k: device[k] for k in ("use_cpu", "bf16", "dataloader_num_workers")})
    return TrainingArguments(**kwargs)


@pytest.mark.parametrize("experiment", ["smoke", "smoke_lm", "sentiment_default", "topics_default"])
def test_training_arguments_and_base_optimizer_are_those_of_0_1(experiment, tmp_path):
    from transformers import Trainer

    cfg = compose_config([f"experiment={experiment}", "seed=7", "train.lr=3e-5"])
    args = training_arguments(cfg, tmp_path)
    reference = _training_arguments_0_1(cfg, tmp_path)
    assert args.to_dict() == reference.to_dict()
    # 0.1 let the Trainer build its AdamW from TrainingArguments; now optimizer.base does.
    base = optimizer_parts(cfg.optimizer).base_cls_and_kwargs
    assert base == Trainer.get_optimizer_cls_and_kwargs(reference)


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


@pytest.mark.parametrize("experiment", ["sentiment_default", "sentiment_quick"])
def test_sentiment_presets_are_offline_and_small(experiment):
    cfg = compose_config([f"experiment={experiment}"])
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
    fields = set(inspect.signature(TrainingArguments.__init__).parameters)
    for trainer in ("gpu", "ddp"):
        cfg = compose_config([f"trainer={trainer}"])
        keys = set(OmegaConf.to_container(cfg.trainer)) - {"_target_"}
        assert keys <= fields
        assert cfg.trainer.bf16 is True


def test_unknown_trainer_key_is_an_error(tmp_path):
    cfg = compose_config(["+trainer.no_such_field=1"])
    with pytest.raises(ExperimentError, match="no_such_field"):
        training_arguments(cfg, tmp_path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optimizer=sam", "optimizer.method=nosuch"], "Unknown optimizer method"),
        (["optimizer=sam", "optimizer.method._target_=tram.NoSuch"], "tram.NoSuch"),
        (["optimizer=sam", "optimizer.method._target_=torch.optim.SGD"], "TwoPassOptimizer"),
        (["optimizer=sam", "+optimizer.method.radius=1"], "radius"),
        (["optimizer=sam", "optimizer.method.rho=-0.5"], "rho"),
        (["optimizer=r3f", "+optimizer.regularizers.r3f.radius=1"], r"radius.*accepts: .*sigma"),
        (["optimizer=r4f", "+optimizer.regularizers.r4f.radius=1"], r"radius.*accepts: .*head"),
        (["+optimizer.regularizers.extra={sigma: 1}"], "needs|must be a config node"),
        (["+optimizer.base.weight_decay=0.1"], "train.weight_decay"),
        (["optimizer.base.lr=0.001"], r"optimizer.base.lr \(0.001\) differs.*train.lr"),
        (["optimizer.base.betas=[0.9,0.999]"], r"optimizer.base.betas .*train.adam_betas"),
        (["optimizer.base.eps=1e-6"], r"optimizer.base.eps \(1e-06\) differs.*adam_epsilon"),
        # Hydra's "+" adds any key, even to a typed node: each would run the default silently.
        (["optimizer=sam", "+optimizer.rho=0.1"], r"optimizer.rho .*optimizer.method.rho"),
        (["+train.lrr=1e-3"], r"train.lrr is not a setting of train"),
        (["+evaluate.tests=false"], r"evaluate.tests is not a setting"),
        (["+diagnostics.ckaa=true"], r"diagnostics.ckaa is not a setting"),
        (["+optimizer.base.momentum=0.9"], r"optimizer.base.*momentum"),
        (["task=vader_lm", "model=minilm"], "needs a causal LM"),
        (["optimizer=r4f", "task=vader_lm", "model=smollm2"], "classification"),
        (["task.train_domain=imdb"], "train_domain"),
        (["task.source=nosuch"], "unknown source"),
    ],
)
def test_validate_rejects(overrides, match):
    with pytest.raises(ExperimentError, match=match):
        validate(compose_config(overrides))


def test_the_optimizer_schema_rejects_a_misspelt_key_in_a_users_file(tmp_path):
    """A user's optimizer file starts from adamw, hence from the schema: a typo fails."""
    from hydra.errors import ConfigCompositionException

    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "mine.yaml").write_text(
        "defaults: [adamw, _self_]\nname: mine\nregularizer_s: {}\n"
    )
    (tmp_path / "optimizer" / "fine.yaml").write_text("defaults: [adamw, _self_]\nname: fine\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    assert compose_config([searchpath, "optimizer=fine"]).optimizer.name == "fine"
    with pytest.raises(ConfigCompositionException, match="regularizer_s"):
        compose_config([searchpath, "optimizer=mine"])


# ------------------------------------------------------------------------------ user classes
# A user points the configs at classes tram does not know: these three live in this module.


class HalvedSGD(torch.optim.SGD):
    """A user's base optimizer: SGD at half the configured learning rate."""

    def __init__(self, params, *, lr: float, nesterov_like: bool = False):
        super().__init__(params, lr=lr / 2)
        self.nesterov_like = nesterov_like


class HeavyBall(torch.optim.SGD):
    """A user's base optimizer with its own signature (the README's example)."""

    def __init__(self, params, *, lr: float, momentum: float):
        super().__init__(params, lr=lr, momentum=momentum)


class RecordingSAM(tram.SAM):
    """A user's two-pass method."""

    built: ClassVar[list[RecordingSAM]] = []

    def __init__(self, base_optimizer, *, rho: float = 0.05, note: str = "", **kwargs):
        super().__init__(base_optimizer, rho=rho, **kwargs)
        self.note = note
        RecordingSAM.built.append(self)


class SquaredLogits:
    """A user's regularizer: weight · mean(logits²)."""

    calls = 0

    def __init__(self, model, *, weight: float):
        self.model = model
        self.weight = weight

    def __call__(self, model, inputs, logits):
        SquaredLogits.calls += 1
        return self.weight * logits.float().pow(2).mean()


def user_overrides() -> list[str]:
    here = __name__
    return [
        f"optimizer.base._target_={here}.HalvedSGD",
        "~optimizer.base.betas",
        "~optimizer.base.eps",
        "+optimizer.base.nesterov_like=true",
        f"+optimizer.method={{_target_: {here}.RecordingSAM, rho: 0.031, note: mine}}",
        f"+optimizer.regularizers.squares={{_target_: {here}.SquaredLogits, weight: 0.23}}",
    ]


def test_configs_instantiate_a_users_classes():
    cfg = compose_config(["experiment=smoke", *user_overrides()])
    validate(cfg)
    parts = optimizer_parts(cfg.optimizer)
    base_cls, base_kwargs = parts.base_cls_and_kwargs
    assert (base_cls, base_kwargs) == (HalvedSGD, {"lr": 5e-5, "nesterov_like": True})
    assert parts.method.func is RecordingSAM
    assert parts.method.keywords == {"rho": 0.031, "note": "mine"}
    assert parts.method_target == f"{__name__}.RecordingSAM"
    model = torch.nn.Linear(3, 2)
    base = base_cls(model.parameters(), **base_kwargs)
    assert base.param_groups[0]["lr"] == 2.5e-5
    wrapper = parts.method(base)
    assert (type(wrapper), wrapper.note) == (RecordingSAM, "mine")
    from tram.experiments.build import build_regularizers

    (regularizer,) = build_regularizers(parts, model)
    assert (type(regularizer), regularizer.model, regularizer.weight) == (
        SquaredLogits,
        model,
        0.23,
    )


def test_user_class_argument_errors_name_the_argument():
    overrides = ["experiment=smoke", *user_overrides(), "+optimizer.method.radius=2"]
    with pytest.raises(ExperimentError, match="radius"):
        validate(compose_config(overrides))
    overrides = ["experiment=smoke", *user_overrides(), "+optimizer.regularizers.squares.rho=2"]
    with pytest.raises(ExperimentError, match=r"squares.*\['rho'\].*weight"):
        validate(compose_config(overrides))


# ------------------------------------------------------------------------------ the 0.1 form


def test_the_0_1_optimizer_form_still_builds_the_same_objects_with_a_warning():
    legacy = compose_config(
        [
            "optimizer=adamw",
            "optimizer.method=asam",
            "optimizer.kwargs={rho: 0.37, eta: 0.02}",
            "optimizer.regularizer={name: trpo, weight: 0.13}",
        ]
    )
    with pytest.warns(FutureWarning, match=r"deprecated.*_target_"):
        parts = optimizer_parts(legacy.optimizer)
    assert (parts.method.func, parts.method.keywords) == (tram.ASAM, {"rho": 0.37, "eta": 0.02})
    (trpo,) = parts.regularizers.values()
    assert (trpo.func, trpo.keywords) == (tram.TRPO, {"weight": 0.13})
    assert (
        parts.base_cls_and_kwargs
        == optimizer_parts(compose_config([]).optimizer).base_cls_and_kwargs
    )


def test_the_0_1_kwargs_override_still_reaches_the_method():
    cfg = compose_config(["optimizer=sam", "optimizer.kwargs={rho: 0.08}"])
    with pytest.warns(FutureWarning):
        parts = optimizer_parts(cfg.optimizer)
    assert (parts.method.func, parts.method.keywords) == (tram.SAM, {"rho": 0.08})


def test_the_readme_example_config_builds_a_users_classes(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```yaml\ndefaults: [schema, _self_]", 1)[1].split("```", 1)[0]
    text = "defaults: [schema, _self_]" + block
    text = text.replace("my_package.optim.MySAM", f"{__name__}.RecordingSAM")
    text = text.replace("my_package.optim.", f"{__name__}.")
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "my_sam.yaml").write_text(text)
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "optimizer=my_sam"])
    validate(cfg)
    parts = optimizer_parts(cfg.optimizer)
    assert parts.base_cls_and_kwargs == (HeavyBall, {"lr": 2e-5, "momentum": 0.9})
    assert (parts.method.func, parts.method.keywords) == (RecordingSAM, {"rho": 0.03})
    (r3f,) = parts.regularizers.values()
    assert (r3f.func, r3f.keywords) == (tram.R3F, {"sigma": 0.1, "weight": 0.1})


def test_the_0_1_regularizer_table_warns():
    from tram.experiments import run

    with pytest.warns(FutureWarning, match=r"REGULARIZERS is deprecated.*_target_"):
        table = run.REGULARIZERS
    assert table == {"r3f": "R3F", "r4f": "R4F", "trpo": "TRPO", "mesa": "MESA"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        run.nope
