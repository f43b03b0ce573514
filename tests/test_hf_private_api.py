"""What ``tram.integrations.hf`` relies on in transformers and accelerate.

The one private API it uses is listed in that module's docstring with the reason; these tests
fail loudly when a release renames it or stops doing what the integration relies on. They also
pin the public extension points ``TramTrainer`` overrides or listens to (their names and
parameters), and that it overrides no private ``Trainer`` method.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

# --------------------------------------------------------------------------- private


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield Accelerator(cpu=True)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_accelerated_optimizer_overflow_flag_reports_a_skipped_step(accelerator) -> None:
    """``optimizer_step_was_skipped`` (what the Trainer reads before stepping the scheduler)
    reads ``_is_overflow`` through ``step_was_skipped``: setting it reports a skipped step."""
    model = torch.nn.Linear(2, 2)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(optimizer, AcceleratedOptimizer)
    assert optimizer.scaler is None  # no GradScaler: accelerate never sets the flag itself
    assert optimizer._is_overflow is False
    assert accelerator.optimizer_step_was_skipped is False
    optimizer._is_overflow = True
    assert optimizer.step_was_skipped is True
    assert accelerator.optimizer_step_was_skipped is True
    optimizer._is_overflow = False
    assert accelerator.optimizer_step_was_skipped is False


def test_accelerated_optimizer_step_without_a_scaler_leaves_the_flag_alone(accelerator) -> None:
    """The flag, once reset by the callback, stays False through a plain step (nothing else
    writes it), so ``optimizer_step_was_skipped`` then means a GradScaler's skip only."""
    model = torch.nn.Linear(2, 2)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.ones(1, 2)).sum().backward()
    optimizer._is_overflow = False
    optimizer.step()
    assert optimizer._is_overflow is False
    assert accelerator.optimizer_step_was_skipped is False


# --------------------------------------------------------------------------- public


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("create_optimizer", ["self", "model"]),
        ("training_step", ["self", "model", "inputs", "num_items_in_batch"]),
        ("compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
        ("log", ["self", "logs"]),
        ("train", ["self", "resume_from_checkpoint"]),
    ],
)
def test_trainer_extension_points_keep_their_parameters(name: str, parameters: list[str]) -> None:
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone"
    assert list(inspect.signature(method).parameters)[: len(parameters)] == parameters


@pytest.mark.parametrize(
    "event", ["on_train_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_save"]
)
def test_trainer_callback_events_exist(event: str) -> None:
    assert callable(getattr(TrainerCallback, event, None)), f"TrainerCallback.{event} is gone"


def test_checkpoint_folders_keep_their_name() -> None:
    """``on_save`` finds the folder the Trainer just wrote as ``checkpoint-<global_step>``."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    assert PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert list(inspect.signature(get_last_checkpoint).parameters)[:1] == ["folder"]


def test_tram_trainer_overrides_public_extension_points_only() -> None:
    from tram.integrations.hf import TramTrainer

    overridden = {
        name
        for name in vars(TramTrainer)
        if hasattr(Trainer, name) and not (name.startswith("__") and name.endswith("__"))
    }
    assert overridden == {"create_optimizer", "training_step", "compute_loss", "log", "train"}
