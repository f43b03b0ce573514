"""The private transformers and accelerate APIs that ``tram.integrations.hf`` relies on.

Each is listed in that module's docstring with the reason; these tests fail loudly when a release
renames one, changes its signature or stops doing what the integration relies on.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from transformers import Trainer  # noqa: E402


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("_save_optimizer_and_scheduler", ["self", "output_dir"]),
        ("_load_optimizer_and_scheduler", ["self", "checkpoint"]),
        ("_remove_unused_columns", ["self", "dataset", "description"]),
        ("_get_collator_with_removed_columns", ["self", "data_collator", "description"]),
        ("_prepare_inputs", ["self", "inputs"]),
    ],
)
def test_trainer_private_methods_keep_their_signature(name: str, parameters: list[str]) -> None:
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone"
    assert list(inspect.signature(method).parameters)[: len(parameters)] == parameters


def test_tram_trainer_overrides_the_checkpoint_methods_it_extends() -> None:
    from tram.integrations.hf import TramTrainer

    for name in ("_save_optimizer_and_scheduler", "_load_optimizer_and_scheduler"):
        assert getattr(TramTrainer, name) is not getattr(Trainer, name)


def test_accelerated_optimizer_overflow_flag_skips_the_step_report() -> None:
    """``optimizer_step_was_skipped`` reads ``_is_overflow``: setting it reports a skipped step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 2)
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
        assert isinstance(optimizer, AcceleratedOptimizer)
        assert optimizer._is_overflow is False
        assert accelerator.optimizer_step_was_skipped is False
        optimizer._is_overflow = True
        assert accelerator.optimizer_step_was_skipped is True
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
