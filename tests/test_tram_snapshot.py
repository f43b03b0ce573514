"""TRAM-θt−1's snapshot takes the weight backups' storage instead of copying θt.

After an ascent, ``restore()`` copies the backups into the weights, so at the base step the
backups hold θt bit for bit: ``Previous.before_base_step`` swaps their storage into the
reference (``tram/_tram.py``, ``ReferenceWeights.copy_from_model``). The oracle is the copy it
replaces (``_can_take_storage`` patched to refuse every tensor): the reference, the weights and
d must be the same bits, on every path, swapped or not.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram
from tram import targets as targets_module


class Net(nn.Module):
    """Embedding, linear head, and a trainable layer the forward never uses (no gradient, so
    no backup: its snapshot is always a copy)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 12)
        self.head = nn.Linear(12, 5)
        self.unused = nn.Linear(3, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(ids)).mean(dim=1))


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randint(0, 50, (6, 4), generator=g), torch.randint(0, 5, (6,), generator=g))
        for _ in range(steps)
    ]


def make(model: nn.Module, **options: Any) -> tram.TRAM:
    base = torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-3)
    return tram.TRAM(base, model, trust_region="previous", **options)


def step(
    optimizer: tram.TRAM, model: nn.Module, batch: tuple[Tensor, Tensor], poison: str = ""
) -> None:
    """One ``step(closure)``; ``poison`` makes the first or second pass's loss NaN."""
    ids, y = batch
    calls: list[int] = []

    def closure() -> Tensor:
        calls.append(1)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(ids), y)
        if (poison == "first" and len(calls) == 1) or (poison == "second" and len(calls) == 2):
            loss = loss * math.nan
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip warnings
        optimizer.step(closure)


def train(
    *, swap: bool, steps: int = 6, poison: dict[int, str] | None = None, **options: Any
) -> tuple[nn.Module, tram.TRAM, list[dict[str, Tensor]]]:
    """Train Net; return it, its optimizer and the reference after every step (cloned)."""
    model = Net()
    optimizer = make(model, **options)
    snapshots = []
    with pytest.MonkeyPatch.context() as patch:
        if not swap:
            patch.setattr(targets_module, "_can_take_storage", lambda *_: False)
        for index, batch in enumerate(batches(steps)):
            step(optimizer, model, batch, (poison or {}).get(index, ""))
            snapshots.append({k: t.clone() for k, t in optimizer.reference.tensors.items()})
    return model, optimizer, snapshots


def assert_bitwise(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert a[name].dtype == b[name].dtype, name


@pytest.fixture
def swaps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of tensors swapped in each copy_from_model."""
    counts: list[int] = []
    swap_tensors = torch.utils.swap_tensors
    copy_from_model = targets_module.ReferenceWeights.copy_from_model

    def counting(self: Any) -> None:
        counts.append(0)

        def counted(a: Tensor, b: Tensor) -> None:
            counts[-1] += 1
            swap_tensors(a, b)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.utils, "swap_tensors", counted)
            copy_from_model(self)

    monkeypatch.setattr(targets_module.ReferenceWeights, "copy_from_model", counting)
    return counts


SCENARIOS: dict[str, dict[str, Any]] = {
    "every step": {},
    "ascent_every=2": {"ascent_every": 2},
    "radius_every=2": {"radius_every": 2},
    "non-finite second pass": {"poison": {2: "second"}},
    "non-finite first pass": {"poison": {1: "first", 3: "first"}},
    "bf16 reference": {"reference_dtype": torch.bfloat16},
}
# Tensors swapped per base step: the embedding and the head's weight and bias after an ascent;
# none on a step without one or with a reference of another dtype (skipped steps take no base
# step, so they have no snapshot).
SWAPPED = {
    "every step": [3] * 6,
    "ascent_every=2": [3, 0, 3, 0, 3, 0],
    "radius_every=2": [3] * 6,
    "non-finite second pass": [3, 3, 3, 3, 3],
    "non-finite first pass": [3, 3, 3, 3],
    "bf16 reference": [0] * 6,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_snapshot_is_the_copy_bit_for_bit(scenario: str, swaps: list[int]) -> None:
    model, optimizer, references = train(swap=True, **SCENARIOS[scenario])
    swapped = list(swaps)
    copied_model, copied, copied_references = train(swap=False, **SCENARIOS[scenario])
    assert swapped == SWAPPED[scenario]
    assert swaps[len(swapped) :] == [0] * len(swapped)  # the oracle copied everything
    for mine, theirs in zip(references, copied_references, strict=True):
        assert_bitwise(mine, theirs)
    assert_bitwise(dict(model.named_parameters()), dict(copied_model.named_parameters()))
    assert optimizer.radius_history == copied.radius_history
    assert optimizer.skipped_steps == copied.skipped_steps
    assert len(optimizer.radius_history) >= 2
    assert max(optimizer.radius_history) > 0


def test_a_weight_written_after_the_restore_is_copied(swaps: list[int]) -> None:
    """The explicit form lets the caller touch the weights between restore() and the base step:
    the backup is then no longer θt, and the snapshot must be the weights as they are."""
    model = Net()
    optimizer = make(model)
    ids, y = batches(1)[0]
    with optimizer.first_pass():
        F.cross_entropy(model(ids), y).backward()
    assert optimizer.first_step()
    optimizer.zero_grad()
    F.cross_entropy(model(ids), y).backward()
    optimizer.restore()
    with torch.no_grad():
        model.head.bias.mul_(1.5)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.second_step()
    assert swaps == [2]  # the embedding and the head's weight; the bias is copied
    assert_bitwise(optimizer.reference.state_dict(), expected)


def test_resume_is_bit_exact() -> None:
    model, optimizer, references = train(swap=True, steps=6)
    first = Net()
    first_optimizer = make(first)
    data = batches(6)
    for batch in data[:3]:
        step(first_optimizer, first, batch)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Net()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = make(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for batch in data[3:]:
        step(resumed_optimizer, resumed, batch)
    assert_bitwise(resumed_optimizer.reference.state_dict(), references[-1])
    assert_bitwise(dict(resumed.named_parameters()), dict(model.named_parameters()))
    assert resumed_optimizer.radius_history == optimizer.radius_history[3:]


def test_the_reference_tensors_keep_their_identity() -> None:
    """A state dict taken before a step holds the same tensor objects after it, as with the
    copy: the swap moves storage, not objects."""
    model = Net()
    optimizer = make(model)
    before = optimizer.reference.state_dict()
    backups_before = dict(optimizer._backups)
    for batch in batches(2):
        step(optimizer, model, batch)
    after = optimizer.reference.state_dict()
    assert all(after[name] is before[name] for name in before)
    assert all(optimizer._backups[p] is b for p, b in backups_before.items())
    live = dict(model.named_parameters())
    ptrs = {t.data_ptr() for t in after.values()}
    assert not ptrs & {p.data_ptr() for p in live.values()}
