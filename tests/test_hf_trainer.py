"""TramTrainer: the Hugging Face Trainer with tram methods and regularizers.

Everything runs on a tiny randomly initialised BERT on CPU. The distributed tests launch this
file with torchrun (``python tests/test_hf_trainer.py --ddp-worker OUT``, ``--fsdp2-worker``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch.utils.data import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_scheduler,
)

import tram  # noqa: E402
import tram._checkpointing  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_same_state,
    end_distributed_worker,
    layer_checkpointing,
    read_scalars,
    some_fast,
    some_fast_rows,
    tiny_bert_config,
    torchrun,
)
from tram import factory  # noqa: E402
from tram.integrations.hf import REGULARIZERS_NAME, TramTrainer  # noqa: E402

VOCAB = 100
SEQ = 12


def tiny_config(dropout: float = 0.0) -> BertConfig:
    return tiny_bert_config(dropout=dropout, max_position_embeddings=32, num_labels=2)


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    return helpers.tiny_bert(seed=seed, dropout=dropout, max_position_embeddings=32, num_labels=2)


class TinyDataset(Dataset):
    """Deterministic token sequences with a learnable label (is token 7 present?)."""

    def __init__(self, size: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (size, SEQ), generator=generator)
        self.lengths = torch.randint(SEQ // 2, SEQ + 1, (size,), generator=generator)
        self.labels = (self.input_ids[:, :4] < 30).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        mask = (torch.arange(SEQ) < self.lengths[index]).long()
        return {
            "input_ids": self.input_ids[index] * mask,
            "attention_mask": mask,
            "labels": self.labels[index],
        }


def make_args(output_dir: Path | str, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


class FakeRegularizer:
    """Follows the tram.regularizers protocol; its state changes the loss (an EMA centre)."""

    name = "fake"

    def __init__(self, weight: float = 0.1, decay: float = 0.5) -> None:
        self.weight = weight
        self.decay = decay
        self.center: torch.Tensor | None = None
        self.calls = 0
        self.steps = 0

    def __call__(self, model, inputs, logits):
        assert isinstance(inputs, Mapping)
        assert "input_ids" in inputs
        assert not hasattr(model, "module")  # the unwrapped model
        self.calls += 1
        head = model.classifier.weight
        if self.center is None:
            self.center = head.detach().clone()
        return self.weight * (logits.float().pow(2).mean() + (head - self.center).pow(2).sum())

    def after_step(self, model) -> None:
        self.steps += 1
        with torch.no_grad():
            self.center.mul_(self.decay).add_(model.classifier.weight, alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"center": self.center, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.center = state["center"].clone()
        self.steps = state["steps"]


class ForwardCounter:
    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if module.training:
            self.count += 1


def method_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = [("sam", {"rho": 0.05}), ("asam", {"rho": 0.5}), ("fisher_sam", {"rho": 0.1})]
    if "tram" in factory.list_methods():
        cases.append(("tram", {"trust_region": "noise"}))
    return cases


def method_ids() -> list[str]:
    return [name for name, _ in method_cases()]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- equivalence


def loss_of(model: torch.nn.Module, batch: Any, autocast: torch.dtype | None) -> torch.Tensor:
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return model(**batch).loss.float()


def reference_run(
    method: str,
    method_kwargs: dict[str, Any],
    args: TrainingArguments,
    dataset: Dataset,
    *,
    ga_divisor: int,
    autocast: torch.dtype | None = None,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
):
    """The two-pass step with gradient accumulation written out by hand; ``prepare`` maps the
    model to the module the loop calls (accelerate's, which autocasts and compiles it).

    Data order: the Trainer's sequential sampler, i.e. batches of consecutive examples. Loss
    normalisation mirrors the Trainer's (integration.md §1.1): BertForSequenceClassification
    takes ``**kwargs``, so the Trainer treats its loss as already scaled for accumulation and
    does not divide it (ga_divisor=1).
    """
    model = tiny_bert()
    model.train()
    called = model if prepare is None else prepare(model)
    no_decay = [n for n, _ in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if n not in no_decay],
            "weight_decay": args.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]
    base = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    optimizer = factory.wrap_optimizer(method, base, model=model, **method_kwargs)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps
    )
    batch = args.per_device_train_batch_size
    ga = args.gradient_accumulation_steps
    cursor = 0
    for _ in range(args.max_steps):
        window = []
        for _ in range(ga):
            indices = [(cursor + i) % len(dataset) for i in range(batch)]
            cursor += batch
            window.append(default_data_collator([dataset[i] for i in indices]))
        for micro_batch in window:
            with optimizer.first_pass():
                (loss_of(called, micro_batch, autocast) / ga_divisor).backward()
        if optimizer.first_step():
            for micro_batch in window:
                (loss_of(called, micro_batch, autocast) / ga_divisor).backward()
            optimizer.restore()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        model.zero_grad()
    return model, optimizer


@pytest.mark.parametrize(("method", "method_kwargs"), method_cases(), ids=method_ids())
def test_gradient_accumulation_equals_the_hand_written_loop(tmp_path, method, method_kwargs):
    dataset = TinyDataset()
    args = make_args(tmp_path, train_sampling_strategy="sequential")
    model = tiny_bert()
    counter = ForwardCounter(model)
    trainer = TramTrainer(
        model=model, args=args, train_dataset=dataset, method=method, method_kwargs=method_kwargs
    )
    trainer.train()
    # 2 forwards per micro-batch, GA=2: 4 per optimizer step (no TRAM extra forward counted:
    # its reference forward, where it has one, runs in no_grad on the same module).
    assert counter.count >= 4 * args.max_steps
    if method != "tram":
        assert counter.count == 4 * args.max_steps
    ga_divisor = 1 if trainer.model_accepts_loss_kwargs else args.gradient_accumulation_steps
    reference, reference_optimizer = reference_run(
        method, method_kwargs, args, dataset, ga_divisor=ga_divisor
    )
    difference = (flat_params(model) - flat_params(reference)).abs().max().item()
    assert difference == 0.0
    wrapper = trainer.two_pass_optimizer
    assert type(wrapper) is factory.get_method(method)
    assert not wrapper.is_perturbed
    assert wrapper.steps == args.max_steps
    assert_same_state(wrapper.state_dict(), reference_optimizer.state_dict())


def test_without_a_method_it_is_the_plain_trainer(tmp_path):
    dataset = TinyDataset()
    models = []
    for cls in (Trainer, TramTrainer):
        model = tiny_bert()
        cls(model=model, args=make_args(tmp_path / cls.__name__), train_dataset=dataset).train()
        models.append(model)
    assert torch.equal(flat_params(models[0]), flat_params(models[1]))


# --------------------------------------------------------------------------- optimizer setup


def test_the_trainer_configured_base_optimizer_is_wrapped(tmp_path):
    model = tiny_bert()
    args = make_args(tmp_path, optim="sgd", learning_rate=0.25, weight_decay=0.1)
    trainer = TramTrainer(
        model=model,
        args=args,
        train_dataset=TinyDataset(),
        method="asam",
        method_kwargs={"rho": 0.3},
    )
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, tram.ASAM)
    assert type(optimizer.base_optimizer) is torch.optim.SGD
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.25 and g["rho"] == 0.3 for g in optimizer.param_groups)
    assert optimizer.model is model
    assert trainer.create_optimizer() is optimizer  # idempotent


@pytest.mark.parametrize("trust_region", ["noise", "fisher"])
def test_noise_left_unseeded_takes_the_trainers_seed(tmp_path, trust_region):
    """TRAM-x's and TRAM-Fisher's noise, built without seed=, is seeded by the Trainer's own
    set_seed(args.seed) (torch.initial_seed() when the optimizer is built): runs of other seeds
    draw other noise, whatever the process was seeded with before."""
    seeds = []
    for seed in (17, 29):
        torch.manual_seed(4)  # the Trainer reseeds
        trainer = TramTrainer(
            model=tiny_bert(),
            args=make_args(tmp_path / str(seed), seed=seed),
            train_dataset=TinyDataset(),
            method="tram",
            method_kwargs={"trust_region": trust_region, "sigma": 0.3},
        )
        optimizer = trainer.create_optimizer()
        target = optimizer.noised_inputs if trust_region == "fisher" else optimizer.target
        seeds.append(target.seed)
    assert seeds == [17, 29]


def test_optimizer_cls_and_kwargs_and_a_passed_optimizer_are_wrapped(tmp_path):
    model = tiny_bert()
    trainer = TramTrainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=TinyDataset(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}),
        method="sam",
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer.base_optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["momentum"] == 0.9

    base = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = TramTrainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=TinyDataset(),
        optimizers=(base, None),
        method="fisher_sam",
    )
    assert trainer.create_optimizer().base_optimizer is base

    ready = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = TramTrainer(
        model=model, args=make_args(tmp_path), train_dataset=TinyDataset(), optimizers=(ready, None)
    )
    assert trainer.create_optimizer() is ready


def test_the_schedule_reaches_the_base_optimizer(tmp_path):
    seen = []

    class Watch(TrainerCallback):
        def _check(self, when, kwargs):
            trainer_scheduler = kwargs["lr_scheduler"]
            base = wrapper_of(kwargs["optimizer"]).base_optimizer
            seen.append(
                (when, list(trainer_scheduler.get_last_lr()), [g["lr"] for g in base.param_groups])
            )

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._check("pre", kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            self._check("end", kwargs)

    def wrapper_of(optimizer):
        from tram.integrations.accelerate import unwrap_optimizer

        return unwrap_optimizer(optimizer)

    args = make_args(tmp_path, max_steps=5, warmup_steps=2)
    trainer = TramTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=TinyDataset(),
        method="sam",
        callbacks=[Watch()],
    )
    trainer.train()
    wrapper = trainer.two_pass_optimizer
    assert wrapper.param_groups is wrapper.base_optimizer.param_groups
    assert len(seen) == 2 * args.max_steps
    for _, scheduled, base_lrs in seen:
        assert scheduled == base_lrs
    learning_rates = [lrs[0] for when, lrs, _ in seen if when == "pre"]
    assert learning_rates == pytest.approx([0.0, 5e-4, 1e-3, 2e-3 / 3, 1e-3 / 3])  # warmup 2 of 5
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(learning_rates)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("resume_from", ["path", "latest"])
def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path, resume_from):
    dataset = TinyDataset(size=40)

    has_tram = "tram" in factory.list_methods()

    def run(output_dir, resume=None):
        model = tiny_bert(dropout=0.1)
        regularizer = FakeRegularizer()
        # The library's regularizers with state: R3F's noise generator, TRPO's θt−1, MESA's EMA.
        library = [tram.R3F(seed=1), tram.TRPO(model), tram.MESA(model)]
        args = make_args(
            output_dir, max_steps=6, save_strategy="steps", save_steps=3, warmup_steps=2
        )
        trainer = TramTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            method="tram" if has_tram else "asam",
            method_kwargs={"trust_region": "previous"} if has_tram else {"rho": 0.5},
            regularizers=[regularizer, *library],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model, regularizer

    full, full_model, full_regularizer = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["tram"]["steps"] == 3
    assert (checkpoint / REGULARIZERS_NAME).is_file()

    resume: str | bool = str(checkpoint)
    if resume_from == "latest":  # resume_from_checkpoint=True: the last checkpoint in output_dir
        shutil.copytree(checkpoint, tmp_path / "resumed" / checkpoint.name)
        resume = True
    resumed, resumed_model, resumed_regularizer = run(tmp_path / "resumed", resume=resume)
    assert resumed.state.global_step == 6
    assert (flat_params(full_model) - flat_params(resumed_model)).abs().max().item() == 0.0
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict())
    assert_same_state(full.lr_scheduler.state_dict(), resumed.lr_scheduler.state_dict())
    assert resumed_regularizer.steps == full_regularizer.steps == 6
    assert torch.equal(resumed_regularizer.center, full_regularizer.center)
    # The resumed history starts with the checkpoint's first three entries.
    losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert resumed_losses == losses


def test_a_checkpoint_without_the_regularizers_state_warns(tmp_path, caplog):
    from tram.integrations.hf import _load_regularizer_states

    (tmp_path / "checkpoint-2").mkdir()
    with caplog.at_level(logging.WARNING, logger="tram.integrations.hf"):
        _load_regularizer_states(str(tmp_path / "checkpoint-2"), ["fake"], [FakeRegularizer()])
    assert f"checkpoint-2 has no {REGULARIZERS_NAME}; the regularizers start from a fresh" in (
        caplog.text
    )


def test_saving_the_regularizers_outside_the_checkpoint_folder_fails_loudly(tmp_path):
    trainer = TramTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path),
        train_dataset=TinyDataset(),
        regularizers=[FakeRegularizer()],
    )
    (callback,) = [
        cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "_TramCallback"
    ]
    trainer.state.global_step = 7
    with pytest.raises(RuntimeError, match=r"checkpoint folder \S*checkpoint-7 does not exist"):
        callback.on_save(trainer.args, trainer.state, trainer.control)
    (tmp_path / "checkpoint-7").mkdir()
    callback.on_save(trainer.args, trainer.state, trainer.control)
    saved = torch.load(tmp_path / "checkpoint-7" / REGULARIZERS_NAME, weights_only=True)
    assert saved == {"fake": {"center": None, "steps": 0}}


# --------------------------------------------------------------------------- regularizers


def test_regularizers_enter_the_training_loss_and_are_logged(tmp_path):
    regularizer = FakeRegularizer(weight=0.5)
    trainer = TramTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, max_steps=3),
        train_dataset=TinyDataset(),
        eval_dataset=TinyDataset(size=8, seed=1),
        regularizers=[regularizer],
    )
    trainer.train()
    # No method: one pass per micro-batch.
    assert regularizer.calls == 3 * 2
    assert regularizer.steps == 3
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["tram/fake"] > 0
        # Trainer's loss (GA x, see reference_run) = task + penalty.
        assert entry["loss"] == pytest.approx(
            2 * (entry["tram/task_loss"] + entry["tram/fake"]), rel=1e-5
        )
        assert "tram/skipped_ascents" not in entry
    metrics = trainer.evaluate()
    assert regularizer.calls == 3 * 2  # not in evaluation
    assert "eval_loss" in metrics


class ZeroPenalty:
    """Adds exactly zero to the loss and to every gradient."""

    name = "zero"

    def __call__(self, model, inputs, logits):
        return 0.0 * logits.sum()


def test_a_zero_regularizer_trains_exactly_like_the_plain_trainer(tmp_path):
    """Nothing runs around a regularizer: no extra forward, no random draw, no other data order
    (dropout on and a shuffled sampler, so any of these would change the weights)."""
    dataset = TinyDataset()
    models = []
    for cls, extra in ((Trainer, {}), (TramTrainer, {"regularizers": [ZeroPenalty()]})):
        model = tiny_bert(dropout=0.1)
        args = make_args(tmp_path / cls.__name__, max_steps=3)
        cls(model=model, args=args, train_dataset=dataset, **extra).train()
        models.append(model)
    assert torch.equal(flat_params(models[0]), flat_params(models[1]))


def test_regularizers_combine_with_a_method(tmp_path):
    regularizer = FakeRegularizer()
    trainer = TramTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=TinyDataset(),
        method="sam",
        regularizers=[regularizer],
    )
    trainer.train()
    assert regularizer.calls == 2 * 2 * 2  # both passes
    assert regularizer.steps == 2
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert {"tram/fake", "tram/task_loss", "tram/ascent_grad_norm", "tram/skipped_ascents"} <= set(
        entry
    )


# --------------------------------------------------------------------------- gradient checkpointing

CHECKPOINTING_KWARGS: dict[str, dict[str, bool] | None] = {
    "default": None,
    "non-reentrant": {"use_reentrant": False},
    "reentrant": {"use_reentrant": True},
}
CHECKPOINTED_METHODS = {
    "sam": ("sam", {"rho": 0.05}, False),
    "tram-noise-r3f": ("tram", {"trust_region": "noise", "sigma": 0.3}, True),
}


def checkpointing_run(
    output_dir: Path, case: str, gradient_checkpointing_kwargs: str | None
) -> tuple[torch.Tensor, int]:
    """Two optimizer steps (two micro-batches each) of a BERT with dropout 0.15; ``None``: no
    checkpointing. The flat weights, and how many forwards of the first layer's attention the
    backward recomputed (0 without checkpointing)."""
    method, method_kwargs, r3f = CHECKPOINTED_METHODS[case]
    model = tiny_bert(dropout=0.15)
    recomputed = []
    model.bert.encoder.layer[0].attention.register_forward_hook(
        lambda module, args, output: recomputed.append(tram._checkpointing.checkpoint_phase())
    )
    settings = layer_checkpointing(
        gradient_checkpointing_kwargs is not None,
        None
        if gradient_checkpointing_kwargs is None
        else CHECKPOINTING_KWARGS[gradient_checkpointing_kwargs],
    )
    trainer = TramTrainer(
        model=model,
        args=make_args(output_dir, max_steps=2, **settings),
        train_dataset=TinyDataset(),
        method=method,
        method_kwargs=method_kwargs,
        regularizers=[tram.regularizers.R3F(sigma=0.2, weight=0.7, seed=3)] if r3f else None,
    )
    trainer.train()
    recomputations = sum(phase is not None and phase[0] == "recomputation" for phase in recomputed)
    return flat_params(model), recomputations


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_kwargs` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("case", "kwargs"),
    some_fast_rows(
        (
            (f"{case}-{kwargs}", (case, kwargs))
            for case in CHECKPOINTED_METHODS
            for kwargs in CHECKPOINTING_KWARGS
        ),
        *("sam-default", "sam-non-reentrant", "tram-noise-r3f-reentrant"),
    ),
)
def test_gradient_checkpointing_trains_as_without_it(tmp_path, case, kwargs):
    """``TrainingArguments(activation_checkpointing=True)`` (``gradient_checkpointing`` in
    earlier transformers): the same weights. Bit for bit, except R3F under
    ``use_reentrant=True``: a reentrant block's weights get their gradient from a backward of
    their own per forward, so the clean and the noised forward's gradients are summed into
    ``.grad`` in another order (the plain Trainer with R3F differs the same, by
    4e-9 after these steps); fp32 round-off, far below one step's change (lr 1e-3)."""
    expected, none = checkpointing_run(tmp_path / "plain", case, None)
    got, recomputations = checkpointing_run(tmp_path / "checkpointed", case, kwargs)
    assert none == 0
    # 2 steps x 2 micro-batches x 2 passes, and R3F's noised forward in each.
    assert recomputations == 8 * (2 if CHECKPOINTED_METHODS[case][2] else 1)
    if kwargs == "reentrant" and CHECKPOINTED_METHODS[case][2]:
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-7)
    else:
        assert torch.equal(got, expected), f"max difference {(got - expected).abs().max()}"


def test_gradient_checkpointing_refuses_r3f_noise_inside_a_checkpointed_layer(tmp_path):
    model = tiny_bert(dropout=0.15)
    before = flat_params(model)
    trainer = TramTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1, **layer_checkpointing(True)),
        train_dataset=TinyDataset(),
        method="sam",
        method_kwargs={"rho": 0.05},
        regularizers=[
            tram.regularizers.R3F(sigma=0.2, embeddings="bert.encoder.layer.0.output.dense")
        ],
    )
    with pytest.raises(RuntimeError, match=r"activation-checkpointed block.*embeddings="):
        trainer.train()
    assert torch.equal(flat_params(model), before)


# --------------------------------------------------------------------------- mixed precision


MIXED_PRECISION_CASES = {
    "sam": ("sam", {"rho": 0.05}),
    "tram-noise": ("tram", {"trust_region": "noise", "sigma": 0.3}),
    "tram-fisher": (
        "tram",
        {"trust_region": "fisher", "sigma": 0.3, "rho": 0.05, "fisher_eta": 0.5},
    ),
}
NO_ASCENT = {"sam": {"rho": 0.0}, "tram-fisher": {"rho": 0.0}}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("case", list(MIXED_PRECISION_CASES))
def test_mixed_precision_equals_the_hand_written_loop(tmp_path, precision, case):
    """bf16 autocasts on CPU: the reference is the hand-written loop under the same autocast.
    fp16=True on CPU runs without autocast or scaler (accelerate supports neither there), so
    its reference is the float32 loop; the scaled fp16 path is tested below with a CPU
    GradScaler. The same runs without an ascent end elsewhere, so the test can fail (TRAM-x's
    radius on this untrained model is ~1e-5, too small to move the weights visibly: its radii
    are compared instead)."""
    method, method_kwargs = MIXED_PRECISION_CASES[case]
    dataset = TinyDataset()
    args = make_args(
        tmp_path, max_steps=3, train_sampling_strategy="sequential", **{precision: True}
    )
    model = tiny_bert()
    trainer = TramTrainer(
        model=model, args=args, train_dataset=dataset, method=method, method_kwargs=method_kwargs
    )
    trainer.train()
    wrapper = trainer.two_pass_optimizer
    assert (wrapper.steps, wrapper.skipped_ascents) == (3, 0)
    autocast = torch.bfloat16 if precision == "bf16" else None
    ga_divisor = 1 if trainer.model_accepts_loss_kwargs else args.gradient_accumulation_steps
    reference, reference_optimizer = reference_run(
        method, method_kwargs, args, dataset, ga_divisor=ga_divisor, autocast=autocast
    )
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    if case == "tram-noise":
        assert min(wrapper.radius_history) > 1e-6
        assert wrapper.radius_history == pytest.approx(reference_optimizer.radius_history, rel=1e-4)
    else:
        no_ascent, _ = reference_run(
            method,
            {**method_kwargs, **NO_ASCENT[case]},
            args,
            dataset,
            ga_divisor=ga_divisor,
            autocast=autocast,
        )
        assert (flat_params(model) - flat_params(no_ascent)).abs().max() > 1e-4


# --------------------------------------------------------------------------- torch.compile
COMPILE_CASES = {
    **MIXED_PRECISION_CASES,
    "tram-pretrained": ("tram", {"trust_region": "pretrained"}),
}


def compiled_run(
    output_dir: Path, case: str, *, compile: bool, dropout: float = 0.1, **overrides: Any
) -> TramTrainer:
    """``torch_compile=True`` compiles the model (accelerate: ``torch.compile(model)``) with the
    ``aot_eager`` backend, so a compiled run equals the eager one bit for bit."""
    method, method_kwargs = COMPILE_CASES[case]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_options: dict[str, Any] = (
        {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compile else {}
    )
    trainer = TramTrainer(
        model=tiny_bert(dropout=dropout),
        args=make_args(output_dir, **compile_options, **overrides),
        train_dataset=TinyDataset(size=40),
        method=method,
        method_kwargs=method_kwargs,
    )
    return trainer


def logged(trainer: TramTrainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("case", some_fast(COMPILE_CASES, "tram-fisher"))
def test_torch_compile_trains_as_the_eager_trainer(tmp_path, case):
    """With dropout and gradient accumulation; TRAM-x's and TRAM-θ0's d logged as the eager
    run's. Counted graphs show the compiled model ran (a test of nothing would pass too)."""
    runs = []
    for compile in (False, True):
        trainer = compiled_run(tmp_path / str(compile), case, compile=compile)
        trainer.train()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compile, graphs
        runs.append(trainer)
    eager, compiled = runs
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"
    assert torch.equal(flat_params(compiled.model), flat_params(eager.model))
    assert logged(compiled, "loss") == logged(eager, "loss")
    if case in ("tram-noise", "tram-pretrained"):
        radii = logged(compiled, "tram/radius")
        assert radii == logged(eager, "tram/radius")
        assert len(radii) == 4
        assert max(radii) > 0


@pytest.mark.slow  # 25 s; compiling through the Trainer stays in the fast suite (above)
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_torch_compile_under_bf16_equals_the_compiled_hand_loop(tmp_path, case):
    """Compiled under bf16 autocast, a graph rounds otherwise than the eager model (the plain
    ``Trainer`` ends ~2e-3 away from its eager run here): the reference is the hand-written loop
    calling the model as the plain Trainer's accelerator prepares it, autocast and compiled."""
    method, method_kwargs = COMPILE_CASES[case]
    dataset = TinyDataset()
    args = make_args(
        tmp_path,
        max_steps=3,
        train_sampling_strategy="sequential",
        bf16=True,
        torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    torch._dynamo.reset()
    model = tiny_bert()
    trainer = TramTrainer(
        model=model, args=args, train_dataset=dataset, method=method, method_kwargs=method_kwargs
    )
    trainer.train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def prepare(reference: torch.nn.Module) -> torch.nn.Module:
        return Trainer(model=reference, args=args).accelerator.prepare_model(reference)

    ga_divisor = 1 if trainer.model_accepts_loss_kwargs else args.gradient_accumulation_steps
    reference, reference_optimizer = reference_run(
        method, method_kwargs, args, dataset, ga_divisor=ga_divisor, prepare=prepare
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert torch.equal(flat_params(model), flat_params(reference))
    if case in ("tram-noise", "tram-pretrained"):
        radii = trainer.two_pass_optimizer.radius_history
        assert radii == reference_optimizer.radius_history
        assert max(radii) > 0


@pytest.mark.slow  # ~20 s; a compiled model's resume: test_compile, test_lightning, test_fabric
def test_torch_compile_resumes_bit_exactly(tmp_path):
    """TRAM-θ0's reference weights and the dropout generator come back from the checkpoint."""
    full = compiled_run(
        tmp_path / "full", "tram-pretrained", compile=True, save_strategy="steps", save_steps=2
    )
    full.train()
    resumed = compiled_run(tmp_path / "resumed", "tram-pretrained", compile=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert torch.equal(flat_params(resumed.model), flat_params(full.model))
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict())
    assert logged(resumed, "tram/radius") == logged(full, "tram/radius")


@pytest.mark.slow
def test_torch_compile_with_inductor_trains_as_the_eager_trainer(tmp_path):
    """The default backend (inductor's generated C++ kernels): its fused reductions round
    otherwise, so the comparison is to float32 round-off; without dropout, whose masks inductor
    draws from its own generator."""
    eager = compiled_run(tmp_path / "eager", "tram-noise", compile=False, dropout=0.0)
    eager.train()
    inductor = compiled_run(
        tmp_path / "inductor", "tram-noise", compile=False, dropout=0.0, torch_compile=True
    )
    inductor.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(
        flat_params(inductor.model), flat_params(eager.model), rtol=1e-4, atol=1e-6
    )
    radii = logged(inductor, "tram/radius")
    assert radii == pytest.approx(logged(eager, "tram/radius"), rel=1e-3)
    assert min(radii) > 0
    # With dropout, TRAM-θ0's reference forward draws the masks of the compiled training
    # forward: d = 0 exactly while the weights are still θ0 (the optimizer's first window).
    dropout = compiled_run(
        tmp_path / "dropout", "tram-pretrained", compile=False, torch_compile=True
    )
    dropout.train()
    radii = logged(dropout, "tram/radius")
    assert radii[0] == 0.0
    assert min(radii[2:]) > 0


class InjectInf:
    """Make the logits non-finite in one pass of one optimizer step."""

    def __init__(self, trainer: TramTrainer, step: int, perturbed: bool) -> None:
        self.trainer, self.step, self.perturbed = trainer, step, perturbed
        trainer.model.classifier.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        optimizer = self.trainer.two_pass_optimizer
        if (
            module.training
            and self.trainer.state.global_step == self.step
            and optimizer.is_perturbed == self.perturbed
        ):
            return output * float("inf")
        return output


@pytest.mark.parametrize("perturbed", [True, False], ids=["pass2", "pass1"])
def test_fp16_grad_scaler_overflow_skips_the_step_with_the_weights_restored(tmp_path, perturbed):
    """fp16 through the Trainer with a CPU GradScaler.

    accelerate creates no GradScaler on CPU (it refuses CPU fp16 loss scaling); the GPU path is
    reproduced by giving the Trainer's accelerator a ``GradScaler("cpu")`` before training:
    accelerate then autocasts to fp16, scales in ``backward`` and steps through the scaler.
    """
    args = make_args(tmp_path, fp16=True, max_steps=3, warmup_steps=0, lr_scheduler_type="constant")
    trainer = TramTrainer(model=tiny_bert(), args=args, train_dataset=TinyDataset(), method="sam")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.accelerator.scaler = scaler
    trainer.accelerator.native_amp = True
    InjectInf(trainer, step=1, perturbed=perturbed)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            snapshots.append(("begin", state.global_step, flat_params(kwargs["model"]).clone()))

        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(("end", state.global_step, flat_params(kwargs["model"]).clone()))
            snapshots.append(("scale", state.global_step, scaler.get_scale()))

    trainer.add_callback(Snapshot())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    wrapper = trainer.two_pass_optimizer
    assert not wrapper.is_perturbed
    assert wrapper.skipped_ascents == (0 if perturbed else 1)
    by_key = {(kind, step): value for kind, step, value in snapshots}
    # Step 1 (global_step 1 -> 2) was skipped: weights exactly as before it, scale halved.
    assert torch.equal(by_key[("begin", 1)], by_key[("end", 2)])
    assert not torch.equal(by_key[("begin", 0)], by_key[("end", 1)])
    assert not torch.equal(by_key[("begin", 2)], by_key[("end", 3)])
    assert by_key[("scale", 2)] == by_key[("scale", 1)] / 2
    assert wrapper.steps == 2
    assert torch.isfinite(flat_params(trainer.model)).all()


def scaled_fp16_run(tmp_path, method: str, method_kwargs: dict[str, Any], scale: float):
    """TramTrainer under fp16 autocast with a CPU GradScaler (see the test above)."""
    # SGD: AdamW would turn the round-off of an fp16 gradient near zero into a step of ~lr.
    args = make_args(
        tmp_path,
        fp16=True,
        max_steps=3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        optim="sgd",
        learning_rate=0.5,
    )
    model = tiny_bert()
    trainer = TramTrainer(
        model=model,
        args=args,
        train_dataset=TinyDataset(),
        method=method,
        method_kwargs=method_kwargs,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    trainer.accelerator.scaler = scaler
    trainer.accelerator.native_amp = True
    trainer.train()
    assert trainer.two_pass_optimizer.steps == 3
    assert scaler.get_scale() == scale  # no overflow, no growth
    return flat_params(model)


SCALE_DEPENDENT = {
    "fisher_sam": ("fisher_sam", {"rho": 0.05, "eta": 0.5}),
    "tram-fisher": MIXED_PRECISION_CASES["tram-fisher"],
}


@pytest.mark.parametrize("case", list(SCALE_DEPENDENT))
def test_fp16_grad_scaler_equals_the_unscaled_run(tmp_path, case):
    """Fisher SAM's direction g / (1 + eta g^2) depends on the gradient's scale, so the Trainer
    must hand the loss scale to ``first_step``. Scales are powers of two: fp16 gradients at two
    scales large enough that none underflows, once unscaled, are the same numbers, so the run at
    another scale is the reference (the scale-1 run is not: its small fp16 gradients underflow).
    A wrapper handed the scaled gradients would take a different direction at each scale.
    Without an ascent the weights end elsewhere: the test can fail."""
    method, method_kwargs = SCALE_DEPENDENT[case]
    scaled = scaled_fp16_run(tmp_path / "scaled", method, method_kwargs, 2.0**10)
    reference = scaled_fp16_run(tmp_path / "other", method, method_kwargs, 2.0**13)
    # fp16 round-off of the backward at two scales: measured up to 2.6e-5 (TRAM-Fisher).
    torch.testing.assert_close(scaled, reference, rtol=0, atol=5e-5)
    no_ascent = scaled_fp16_run(tmp_path / "plain", method, {**method_kwargs, "rho": 0.0}, 2.0**10)
    assert (scaled - no_ascent).abs().max() > 20 * 5e-5


def test_a_non_finite_first_pass_without_a_scaler_skips_the_step(tmp_path):
    regularizer = FakeRegularizer()
    trainer = TramTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, max_steps=3),
        train_dataset=TinyDataset(),
        method="sam",
        regularizers=[regularizer],
    )
    InjectInf(trainer, step=1, perturbed=False)
    weights, scheduler_steps = [], []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights.append(flat_params(kwargs["model"]).clone())
            scheduler_steps.append(kwargs["lr_scheduler"].last_epoch)

    trainer.add_callback(Snapshot())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    wrapper = trainer.two_pass_optimizer
    assert (wrapper.steps, wrapper.skipped_ascents, wrapper.skipped_steps) == (2, 1, 1)
    assert torch.equal(weights[0], weights[1])
    assert torch.isfinite(weights[2]).all()
    assert not torch.equal(weights[1], weights[2])
    assert scheduler_steps == [1, 1, 2]  # the skipped step leaves the schedule where it was
    assert regularizer.steps == 2  # after_step only after steps taken
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["tram/skipped_steps"] for entry in logs] == [0.0, 1.0, 1.0]
    assert [entry["tram/skipped_ascents"] for entry in logs] == [0.0, 1.0, 1.0]


def test_a_skipped_step_the_trainer_cannot_be_told_of_warns(tmp_path):
    """Should accelerate drop the ``_is_overflow`` flag, a skipped step warns instead of moving
    the schedule silently."""
    from accelerate.optimizer import AcceleratedOptimizer

    class WithoutTheFlag(AcceleratedOptimizer):
        @property
        def _is_overflow(self):
            raise AttributeError("_is_overflow")

        @property
        def step_was_skipped(self):
            return False

    trainer = TramTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=TinyDataset(),
        method="sam",
    )
    InjectInf(trainer, step=1, perturbed=False)

    class DropTheFlag(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            del trainer.optimizer.__dict__["_is_overflow"]
            trainer.optimizer.__class__ = WithoutTheFlag

    trainer.add_callback(DropTheFlag())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("has no '_is_overflow' flag to report it" in m for m in messages), messages
    assert trainer.two_pass_optimizer.skipped_steps == 1


# --------------------------------------------------------------------------- logging


def test_tensorboard_receives_the_radius_the_norms_and_the_regularizers(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    method = "tram" if "tram" in factory.list_methods() else "sam"
    trainer = TramTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path / "out", max_steps=3, report_to=["tensorboard"]),
        train_dataset=TinyDataset(),
        method=method,
        regularizers=[FakeRegularizer()],
    )
    trainer.train()
    scalars = read_scalars(tmp_path / "tb")
    expected = {
        "train/loss",
        "train/grad_norm",
        "train/learning_rate",
        "train/tram/ascent_grad_norm",
        "train/tram/skipped_ascents",
        "train/tram/skipped_steps",
        "train/tram/task_loss",
        "train/tram/fake",
    }
    if method == "tram":
        expected.add("train/tram/radius")
    assert expected <= set(scalars), sorted(scalars)
    for tag in expected:
        assert len(scalars[tag]) == 3, tag
        assert all(math.isfinite(v) for v in scalars[tag]), tag
    assert scalars["train/tram/skipped_ascents"] == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_training(tmp_path):
    common = {"model": tiny_bert(), "args": make_args(tmp_path), "train_dataset": TinyDataset()}
    with pytest.raises(ValueError, match=r"Unknown optimizer method 'adamsam'; known methods: "):
        TramTrainer(**common, method="adamsam")
    with pytest.raises(TypeError, match=r"'sam' \(SAM\) got unexpected argument 'eta'"):
        TramTrainer(**common, method="sam", method_kwargs={"rho": 0.05, "eta": 0.1})
    with pytest.raises(ValueError, match="Invalid rho"):
        TramTrainer(**common, method="asam", method_kwargs={"rho": -0.5})
    with pytest.raises(ValueError, match="method_kwargs given without a method"):
        TramTrainer(**common, method_kwargs={"rho": 0.05})
    with pytest.raises(TypeError, match="regularizer must be callable"):
        TramTrainer(**common, regularizers=["r3f"])
    ready = tram.SAM(torch.optim.SGD(common["model"].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already holds a tram optimizer"):
        TramTrainer(**common, optimizers=(ready, None), method="sam")


def test_training_step_refuses_a_window_that_never_synchronises(tmp_path):
    dataset = TinyDataset()
    trainer = TramTrainer(
        model=tiny_bert(), args=make_args(tmp_path), train_dataset=dataset, method="sam"
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop
    batch = default_data_collator([dataset[i] for i in range(4)])
    gradient_state = trainer.accelerator.gradient_state
    gradient_state._set_sync_gradients(False)  # inside an accumulation window
    try:
        trainer.model.train()
        # Up to 2k - 1 micro-batches: an epoch's carried ones and the next step's (below).
        for _ in range(2 * trainer.args.gradient_accumulation_steps - 1):
            trainer.training_step(trainer.model, batch)
        with pytest.raises(
            RuntimeError,
            match=r"received 4 micro-batches since the last optimizer step "
            r"\(gradient_accumulation_steps=2\) without one that synchronises",
        ):
            trainer.training_step(trainer.model, batch)
    finally:
        gradient_state._set_sync_gradients(True)


class StreamedTinyDataset(torch.utils.data.IterableDataset):
    """``TinyDataset`` streamed: the Trainer knows no length, so an epoch that does not fill
    its last accumulation window ends without a step, and the Trainer adds its micro-batches to
    the next epoch's first step (each normalised as in its own, shorter window)."""

    def __init__(self, size: int) -> None:
        self.data = TinyDataset(size=size)

    def __iter__(self) -> Any:
        return (self.data[index] for index in range(len(self.data)))


def test_micro_batches_an_iterable_epoch_carried_over_are_replayed_as_they_ran(tmp_path):
    """20 examples, 4 per micro-batch, 2 per step: every epoch leaves one micro-batch that the
    Trainer adds to the next epoch's first step, normalised as in its own window: divided by 1,
    the other two by 2 (``model_accepts_loss_kwargs = False``, as for a model whose forward
    takes no loss keywords; BERT's classification loss is the batch mean whatever the item
    count, so the division is what tells the windows apart). ρ = 0 takes the plain Trainer's
    steps bit for bit, so the replay normalised each micro-batch as its first pass did;
    TramTrainer used to refuse the third micro-batch."""
    finals = []
    for name, kwargs in (
        ("plain", {}),
        ("rho0", {"method": "sam", "method_kwargs": {"rho": 0.0}}),
        ("sam", {"method": "sam", "method_kwargs": {"rho": 0.05}}),
    ):
        model = tiny_bert()
        trainer_class = Trainer if name == "plain" else TramTrainer
        trainer = trainer_class(
            model=model,
            args=make_args(tmp_path / name, max_steps=6),
            train_dataset=StreamedTinyDataset(20),
            **kwargs,
        )
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        assert trainer.state.global_step == 6
        finals.append(flat_params(model))
    assert torch.equal(finals[0], finals[1])
    assert not torch.equal(finals[0], finals[2])


class StreamedTokens(torch.utils.data.IterableDataset):
    """Causal-LM rows whose label counts differ (the rest masked with -100), streamed."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(2)
        self.input_ids = torch.randint(2, 100, (size, 12), generator=generator)
        self.kept = torch.randint(3, 12, (size,), generator=generator)

    def __iter__(self) -> Any:
        for ids, kept in zip(self.input_ids, self.kept, strict=True):
            labels = ids.clone()
            labels[kept:] = -100
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_carried_micro_batches_keep_their_own_label_counts(tmp_path):
    """The same with a causal LM, whose loss the Trainer normalises by the label tokens of the
    micro-batch's window (``num_items_in_batch``): the carried micro-batch keeps its own
    window's count in the replay. ρ = 0 takes the plain Trainer's steps bit for bit."""
    finals = []
    for name, kwargs in (("plain", {}), ("rho0", {"method": "sam", "method_kwargs": {"rho": 0.0}})):
        model = helpers.tiny_gpt2()
        trainer_class = Trainer if name == "plain" else TramTrainer
        trainer = trainer_class(
            model=model,
            args=make_args(tmp_path / name, max_steps=6),
            train_dataset=StreamedTokens(20),
            **kwargs,
        )
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        finals.append(flat_params(model))
    assert torch.equal(finals[0], finals[1])


def test_a_regularizer_on_a_model_without_logits_fails_before_the_first_step(tmp_path):
    torch.manual_seed(0)
    model = BertModel(tiny_config(), add_pooling_layer=True)
    before = flat_params(model).clone()
    regularizer = FakeRegularizer()
    trainer = TramTrainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=TinyDataset(),
        method="sam",
        regularizers=[regularizer],
    )
    with pytest.raises(
        ValueError, match=r"regularizer needs the model's logits.*last_hidden_state"
    ):
        trainer.train()
    assert regularizer.calls == 0
    assert trainer.state.global_step == 0
    assert torch.equal(before, flat_params(model))


# --------------------------------------------------------------------------- distributed


def _ddp_worker(out_path: str) -> None:
    """Run under torchrun: train in both ascent modes and compare the replicas."""
    import torch.distributed as dist

    results: dict[str, Any] = {"method": "tram" if "tram" in factory.list_methods() else "sam"}
    method = results["method"]
    finals: dict[str, torch.Tensor] = {}
    for mode in ("sync", "local"):
        model = tiny_bert()
        trainer = TramTrainer(
            model=model,
            args=make_args(f"{out_path}-{mode}", max_steps=3, ddp_backend="gloo"),
            train_dataset=TinyDataset(size=48),
            method=method,
            method_kwargs={"local_ascent": mode == "local"},
            # R3F runs an extra forward of the unwrapped module inside DDP's forward/backward.
            regularizers=[FakeRegularizer(), tram.R3F(seed=1)],
        )
        trainer.train()
        params = flat_params(model)
        gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, params)
        finals[mode] = params
        results[mode] = {
            "wrapped": type(trainer.model_wrapped).__name__,
            "world": dist.get_world_size(),
            "replica_diff": max((g - gathered[0]).abs().max().item() for g in gathered),
            "moved": (params - flat_params(tiny_bert())).abs().max().item(),
            "steps": trainer.two_pass_optimizer.steps,
            "logged": sorted(next(e for e in trainer.state.log_history if "loss" in e)),
        }
    results["mode_diff"] = (finals["sync"] - finals["local"]).abs().max().item()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    # The Trainer's accelerator created the process group and never destroys it.
    end_distributed_worker()


@pytest.mark.distributed
def test_ddp_replicas_stay_identical_in_both_ascent_modes(tmp_path):
    out = tmp_path / "ddp.json"
    torchrun(__file__, "--ddp-worker", str(out))
    results = json.loads(out.read_text())
    for mode in ("sync", "local"):
        result = results[mode]
        assert result["world"] == 2
        assert result["wrapped"] == "DistributedDataParallel"
        assert result["replica_diff"] == 0.0
        assert result["moved"] > 0
        assert result["steps"] == 3
        assert {"tram/fake", "tram/r3f", "tram/ascent_grad_norm"} <= set(result["logged"])
        if results["method"] == "tram":
            assert "tram/radius" in result["logged"]
    # The modes are different algorithms: per-worker ascents differ from the global one.
    assert results["mode_diff"] > 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ddp-worker":
    with contextlib.suppress(AttributeError):
        torch.set_num_threads(1)
    _ddp_worker(sys.argv[2])


# --------------------------------------------------------------------------- FSDP2

FSDP2_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sam": ("sam", {"rho": 0.07}),
    "tram_x": ("tram", {"trust_region": "noise", "sigma": 0.3, "seed": 3}),
}


class CpuFsdp2TramTrainer(TramTrainer):
    """TramTrainer under accelerate's FSDP2 on CPU (see ``helpers.accelerate_fsdp2_on_cpu``:
    accelerate 1.15 ignores the plugin the Trainer builds from ``fsdp_config`` on CPU)."""

    def create_accelerator_and_postprocess(self) -> None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        helpers.accelerate_fsdp2_on_cpu(self.accelerator, plugin)
        self.is_fsdp_enabled = True


def fsdp2_trainer_run(output_dir: str, case: str, *, fsdp: bool, resume: str | None = None):
    method, method_kwargs = FSDP2_CASES[case]
    settings: dict[str, Any] = {"max_steps": 3, "ddp_backend": "gloo"}
    settings.update(train_sampling_strategy="sequential", save_strategy="steps", save_steps=2)
    if fsdp:
        # BertLayer only: the default policy (the model's _no_split_modules) shards
        # BertEmbeddings, then accelerate 1.15 shards its word embeddings again and fails
        # (fsdp2_prepare_model: "Invariant encountered: value was None").
        layers = ["BertLayer"]
        settings.update(
            fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": layers}
        )
    model = tiny_bert()
    trainer = (CpuFsdp2TramTrainer if fsdp else TramTrainer)(
        model=model,
        args=make_args(output_dir, **settings),
        train_dataset=TinyDataset(size=48),
        method=method,
        method_kwargs=method_kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _fsdp2_worker(out_path: str) -> None:
    """Run under torchrun: each case with DDP, then with FSDP2, then FSDP2 resumed."""
    import torch.distributed as dist

    def gathered(trainer) -> torch.Tensor:
        full = [getattr(p, "full_tensor", lambda p=p: p)() for p in trainer.model.parameters()]
        return torch.cat([p.detach().reshape(-1) for p in full])

    results: dict[str, Any] = {}
    for case in FSDP2_CASES:  # DDP first: FSDP2 is forced on the process's accelerate state
        ddp = fsdp2_trainer_run(f"{out_path}-{case}-ddp", case, fsdp=False)
        results[case] = {"ddp": gathered(ddp)}
    results["world"] = dist.get_world_size()  # the Trainer's accelerator made the group
    for case in FSDP2_CASES:
        directory = f"{out_path}-{case}-fsdp2"
        trainer = fsdp2_trainer_run(directory, case, fsdp=True)
        resumed = fsdp2_trainer_run(
            f"{directory}-resumed", case, fsdp=True, resume=f"{directory}/checkpoint-2"
        )
        results[case].update(
            fsdp2=gathered(trainer),
            resumed=gathered(resumed),
            wrapped=type(trainer.model_wrapped).__name__,
            sharded=type(next(trainer.model.parameters())).__name__,
            steps=[trainer.two_pass_optimizer.steps, resumed.two_pass_optimizer.steps],
            logged=sorted(next(e for e in trainer.state.log_history if "loss" in e)),
        )
    if dist.get_rank() == 0:
        method, method_kwargs = FSDP2_CASES["sam"]
        args = make_args(f"{out_path}-one", max_steps=3, per_device_train_batch_size=8)
        # The global batch's loss times the ranks: the Trainer multiplies the loss of a model
        # that takes loss kwargs by the number of processes (average_tokens_across_devices),
        # and BERT's classification loss is the batch mean whatever num_items_in_batch is.
        dataset = TinyDataset(size=48)
        one, _ = reference_run(method, method_kwargs, args, dataset, ga_divisor=0.5)
        results["sam"]["one_process"] = flat_params(one)
        torch.save(results, out_path)
    end_distributed_worker()


def test_local_ascent_under_fsdp2_is_refused(tmp_path):
    """Under FSDP2 a backward always reduce-scatters: there is no per-rank gradient to ascend
    along."""
    from accelerate.state import AcceleratorState

    try:
        trainer = CpuFsdp2TramTrainer(
            model=tiny_bert(),
            args=make_args(tmp_path, fsdp=True, fsdp_config={"version": 2}),
            train_dataset=TinyDataset(),
            method="sam",
            method_kwargs={"local_ascent": True},
        )
        with pytest.raises(ValueError, match="local_ascent=True is not available under FSDP"):
            trainer.create_optimizer()
    finally:  # the FSDP2 forced on accelerate's process-wide state must not reach other tests
        AcceleratorState._reset_state(True)


# float32 round-off only (measured up to 6e-8); an ascent norm taken over each rank's shard
# alone moves the weights by 3e-3.
FSDP2_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.distributed
def test_fsdp2_trains_as_ddp_and_resumes_exactly(tmp_path):
    """TramTrainer under FSDP2 (``fsdp=True, fsdp_config={"version": 2}``; two gloo ranks,
    accelerate's FSDP2 forced on CPU) trains as under DDP, SAM as one process on the global
    batch, and a resume from the Trainer's FSDP2 checkpoint ends where the run does, bit for
    bit (the step counter and TRAM-x's noise generator with it)."""
    out = tmp_path / "fsdp2.pt"
    torchrun(__file__, "--fsdp2-worker", str(out))
    results = torch.load(out, weights_only=True)
    assert results["world"] == 2
    initial = flat_params(tiny_bert())
    for case in FSDP2_CASES:
        result = results[case]
        assert result["wrapped"] == "FSDPBertForSequenceClassification"
        assert result["sharded"] == "DTensor"
        assert result["steps"] == [3, 3]
        assert torch.equal(result["resumed"], result["fsdp2"])
        assert (result["fsdp2"] - initial).abs().max() > 1e-3
        torch.testing.assert_close(result["fsdp2"], result["ddp"], **FSDP2_TOLERANCE)
    assert "tram/radius" in results["tram_x"]["logged"]
    sam = results["sam"]
    torch.testing.assert_close(sam["fsdp2"], sam["one_process"], **FSDP2_TOLERANCE)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--fsdp2-worker":
    torch.set_num_threads(1)
    _fsdp2_worker(sys.argv[2])


# --------------------------------------------------------------------------- example


def run_example(script: str, *extra: str) -> str:
    """Run an example with a real model for a couple of steps; return its stdout."""
    method = "tram" if "tram" in factory.list_methods() else "asam"
    stdout = helpers.run_example(script, method, *extra)
    assert "accuracy on movies" in stdout
    return stdout


@pytest.mark.slow
@pytest.mark.representative
def test_example_hf_trainer_fine_tunes_minilm(tmp_path):
    stdout = run_example("hf_trainer.py", f"--output-dir={tmp_path}")
    assert "steps: 2" in stdout
    assert list(tmp_path.rglob("events.out.tfevents.*"))


class InputNormBert(torch.nn.Module):
    """A tiny BERT whose logits are shifted by a BatchNorm of the raw token ids: a BatchNorm
    with no trainable weights that no perturbed weight feeds."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert()
        self.norm = torch.nn.BatchNorm1d(SEQ, affine=False, momentum=0.3)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.bert(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits + self.norm(input_ids.float()).mean(dim=1, keepdim=True)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("model_given", [False, True], ids=["without model=", "model="])
def test_the_replay_counts_as_the_second_pass_for_batchnorm_statistics(tmp_path, model_given):
    """TramTrainer replays the window inside the wrapper's ``second_pass()``. A BatchNorm on the
    raw inputs would update its statistics in both passes, silently, as another model's: with a
    ready-made wrapper built without ``model=`` it is refused, naming ``model=``; with the
    wrapper TramTrainer builds (``model=`` the model) the statistics keep the first pass's
    update, one per micro-batch."""
    model = InputNormBert()
    options: dict[str, Any] = {"method": "sam"}
    if not model_given:
        ready = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        options = {"optimizers": (ready, None)}
    args = make_args(tmp_path)
    trainer = TramTrainer(model=model, args=args, train_dataset=TinyDataset(), **options)
    if not model_given:
        with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode ran at the .*model="):
            trainer.train()
        return
    trainer.train()
    micro_batches = args.max_steps * args.gradient_accumulation_steps
    assert int(model.norm.num_batches_tracked) == micro_batches
