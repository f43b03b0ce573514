"""Activation checkpointing (``torch.utils.checkpoint``) under every wrapper: the specification.

A model whose blocks run through ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=False``
and ``True``), with dropout active, trains through every wrapper of ``tests/wrappers_table.py``
with ``step(closure)`` to the same weights, bit for bit, as the same model without
checkpointing. Checkpointing recomputes a block's forward in the backward, with the dropout
masks of its first run (checkpoint restores the RNG state); what tram adds around the forward
must hold under that recomputation:

- TRAM's reference forwards (``tram/_recording.py``, ``tram/targets.py``) run without
  gradients, so nothing of them is recomputed: exact with the embeddings (where the noise
  target's noise goes) inside a checkpointed block too.
- TRAM records each training forward of the first pass once. A model checkpointed as a whole in
  the closure is recomputed in the backward: under ``use_reentrant=False`` that recomputation
  is not recorded again (its d would count twice, the noise target would draw twice); under
  ``use_reentrant=True`` the first run had no gradients and the recomputation is the one
  recorded.
- Representation noise in a forward with gradients (R3F's noised forward, TRAM-Fisher's first
  pass, ``tram.noise.representation_noise``) cannot be recomputed: outside the ``with`` block
  the backward would rebuild the block without the noise, inside it with another draw. With
  the embeddings outside the checkpointed blocks (Hugging Face's layout) it is exact; a hooked
  module inside a checkpointed block raises ``RuntimeError`` naming the fix, before any weight
  moves.
- BatchNorm: with ``model=`` the second pass's recomputation updates no running statistics
  (they are frozen until ``restore()``, after the second backward); without ``model=`` the
  guard refuses a BatchNorm at θ+ε in a checkpointed block as outside one. (The first pass's
  recomputation updates them a second time, as torch's checkpoint does under any optimizer.)

``tram._checkpointing.checkpoint_phase`` reads checkpoint's forward and recomputation from the
installed torch; the last tests pin it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import tram
from tests.helpers import cross_entropy_closure
from tests.wrappers_table import WRAPPERS, WrapperCase
from tram._checkpointing import checkpoint_phase

MODES = ("non-reentrant", "reentrant")
DROPOUT = 0.2


def run_checkpointed(function: Callable[..., Tensor], mode: str | None, *args: Tensor) -> Tensor:
    if mode is None:
        return function(*args)
    reentrant = mode == "reentrant"
    if reentrant:
        # A reentrant block gives gradients to its weights only if an input requires grad
        # (what Hugging Face's enable_input_require_grads does for frozen embeddings).
        args = tuple(arg if arg.requires_grad else arg.detach().requires_grad_() for arg in args)
    return checkpoint(function, *args, use_reentrant=reentrant)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.dropout(F.gelu(self.linear(hidden)))


class Net(nn.Module):
    """Embeddings (a linear layer, where the noise goes), two residual blocks, a head. ``mode``
    checkpoints each block; ``embeddings_inside`` puts the embeddings in the first block."""

    def __init__(self, mode: str | None = None, *, embeddings_inside: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)
        self.mode = mode
        self.embeddings_inside = embeddings_inside

    def first_block(self, inputs: Tensor) -> Tensor:
        return self.blocks[0](self.embeddings(inputs))

    def forward(self, inputs: Tensor) -> Tensor:
        if self.embeddings_inside:
            hidden = run_checkpointed(self.first_block, self.mode, inputs)
        else:
            hidden = run_checkpointed(self.blocks[0], self.mode, self.embeddings(inputs))
        return self.head(run_checkpointed(self.blocks[1], self.mode, hidden))


def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=generator), torch.randint(0, 3, (6,), generator=generator)


def make_optimizer(case: WrapperCase | None, model: Net) -> torch.optim.Optimizer:
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if case is None:
        return base
    if case.noise:
        return case.make(base, model, embeddings=model.embeddings)
    return case.make(base, model)


def train(
    case: WrapperCase | None,
    model: Net,
    *,
    steps: int = 3,
    whole_model: str | None = None,
    r3f: bool = False,
) -> Tensor:
    """``steps`` of ``step(closure)``; ``whole_model`` checkpoints the model's call in the
    closure; ``r3f`` adds R3F's penalty (σ = 0.3, λ = 0.7) to the loss. The flat weights."""
    model.train()
    inputs, labels = batch()
    optimizer = make_optimizer(case, model)
    regularizer = (
        tram.regularizers.R3F(sigma=0.3, weight=0.7, embeddings=model.embeddings, seed=3)
        if r3f
        else None
    )
    torch.manual_seed(5)  # the dropout stream

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = run_checkpointed(model, whole_model, inputs)
        loss = F.cross_entropy(logits, labels)
        if regularizer is not None:
            loss = loss + regularizer(model, inputs, logits)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return flat(model)


def flat(model: nn.Module) -> Tensor:
    return torch.cat([param.detach().reshape(-1) for param in model.parameters()])


def assert_equal(got: Tensor, expected: Tensor) -> None:
    assert torch.equal(got, expected), f"max difference {(got - expected).abs().max().item():.3e}"


TRAINED_WITHOUT_NOISE = [case for case in WRAPPERS if case.name != "TRAM-fisher"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", WRAPPERS, ids=str)
def test_every_wrapper_steps_as_without_checkpointing(case, mode):
    assert_equal(train(case, Net(mode)), train(case, Net()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TRAINED_WITHOUT_NOISE, ids=str)
def test_embeddings_inside_a_checkpointed_block(case, mode):
    """Exact where only a reference forward (no gradients, nothing recomputed) is noised."""
    expected = train(case, Net(embeddings_inside=True))
    assert_equal(train(case, Net(mode, embeddings_inside=True)), expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [case for case in TRAINED_WITHOUT_NOISE if case.is_tram], ids=str)
def test_the_whole_model_checkpointed_in_the_closure(case, mode):
    """TRAM records the model's forward once per call: the noise target, whose noise and d a
    second recording would change, is the one that tells."""
    assert_equal(train(case, Net(), whole_model=mode), train(case, Net()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [None, WRAPPERS[0]], ids=["SGD", "SAM"])
def test_r3f_with_the_embeddings_outside_the_checkpointed_blocks(case, mode):
    assert_equal(train(case, Net(mode), r3f=True), train(case, Net(), r3f=True))


NOISED_TRAINING_FORWARDS = {
    "R3F": (WRAPPERS[0], True),
    "TRAM-Fisher": (next(case for case in WRAPPERS if case.name == "TRAM-fisher"), False),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("noised", NOISED_TRAINING_FORWARDS)
def test_noise_in_a_checkpointed_block_raises_before_any_step(noised, mode):
    case, r3f = NOISED_TRAINING_FORWARDS[noised]
    model = Net(mode, embeddings_inside=True)
    before = flat(model)
    with pytest.raises(RuntimeError, match=rf"use_reentrant={mode == 'reentrant'}.*embeddings="):
        train(case, model, steps=1, r3f=r3f)
    assert_equal(flat(model), before)


@pytest.mark.parametrize("mode", MODES)
def test_noise_without_gradients_or_zero_sigma_runs_in_a_checkpointed_block(mode):
    model = Net(mode, embeddings_inside=True).train()
    inputs, _ = batch()
    generator = torch.Generator().manual_seed(2)
    with (
        torch.no_grad(),
        tram.noise.representation_noise(
            model, sigma=0.3, module=model.embeddings, generator=generator
        ) as handle,
    ):
        model(inputs)
    with tram.noise.representation_noise(model, sigma=0.0, module=model.embeddings):
        model(inputs).sum().backward()
    assert handle.calls == 1


# ----------------------------------------------------------------------------- BatchNorm
class NormNet(nn.Module):
    """A checkpointed block ending in a BatchNorm, with (``affine``) or without its weights."""

    def __init__(self, mode: str | None, *, affine: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 8)
        self.norm = nn.BatchNorm1d(8, affine=affine, momentum=0.3)
        self.head = nn.Linear(8, 3)
        self.mode = mode

    def block(self, inputs: Tensor) -> Tensor:
        return self.norm(F.gelu(self.linear(inputs)))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(run_checkpointed(self.block, self.mode, inputs))


def batchnorm_steps(model: NormNet, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    closure = cross_entropy_closure(optimizer, model, *batch())
    for _ in range(steps):
        optimizer.step(closure)


@pytest.mark.parametrize("mode", MODES)
def test_the_second_pass_recomputation_updates_no_running_statistics(mode):
    """With ``model=``, SAM updates the statistics as often as its base optimizer does under
    the same checkpointing (the first pass and its recomputation): none from the second pass."""
    counts = []
    for wrap in (False, True):
        model = NormNet(mode, affine=True).train()
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer = tram.SAM(base, rho=0.05, model=model) if wrap else base
        batchnorm_steps(model, optimizer)
        counts.append(int(model.norm.num_batches_tracked))
    assert counts[1] == counts[0] == 4  # 2 steps x (forward + recomputation)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("mode", MODES)
def test_the_batchnorm_guard_refuses_in_a_checkpointed_block(mode, affine):
    model = NormNet(mode, affine=affine).train()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    with pytest.raises(RuntimeError, match="ran at the perturbed weights"):
        batchnorm_steps(model, optimizer, steps=1)


# ----------------------------------------------------------------------------- the reading
@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_phase_reads_the_forward_and_the_recomputation(mode):
    seen: list[Any] = []
    layer = nn.Linear(3, 3)
    layer.register_forward_hook(lambda module, args, output: seen.append(checkpoint_phase()))
    block = nn.Sequential(layer, nn.GELU(), nn.Linear(3, 3))
    inputs = torch.randn(2, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(inputs)
        run_checkpointed(block, mode, inputs).sum().backward()
    reentrant = mode == "reentrant"
    assert seen == [None, ("forward", reentrant), ("recomputation", reentrant)]
    assert checkpoint_phase() is None


def test_checkpoint_phase_is_none_while_torch_compile_traces():
    """A compiled forward that runs the noise hook or TRAM's recorder asks too: under tracing
    the answer is None, with no graph break on torch's untraceable private lookups."""

    def noised(inputs: Tensor) -> Tensor:
        return inputs * 2 if checkpoint_phase() is None else inputs

    torch._dynamo.reset()
    compiled = torch.compile(noised, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))
