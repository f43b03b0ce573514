"""Tests for the loss-side trust regions R3F, R4F, TRPO and MESA.

Each value is checked against its formula written here with ``torch.nn.functional`` (the noise
is added to the token embeddings by hand, the reference models are deep copies), and on a toy
problem training with the regularizer must lower the divergence it penalises.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram
from tram.regularizers import spectral_normalize

transformers = pytest.importorskip("transformers")

from tests.helpers import NoiseDraws, tiny_bert, tiny_gpt2  # noqa: E402


# ----------------------------------------------------------------------------- models and data
class Toy(nn.Module):
    """Embedding, mean over positions, a hidden layer, a head: forward takes a tensor."""

    def __init__(self, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 8)
        self.hidden = nn.Linear(8, 16)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(16, 3)

    def body(self, embedded: Tensor) -> Tensor:
        return self.classifier(self.drop(torch.tanh(self.hidden(embedded.mean(dim=1)))))

    def forward(self, ids: Tensor) -> Tensor:
        return self.body(self.embed(ids))


def toy_data(n: int = 64, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, 5), generator=g)
    return ids, ids[:, 0] % 3


def bert(seed: int = 0) -> nn.Module:
    return tiny_bert(seed=seed, initializer_range=0.2).train()


def gpt2(seed: int = 0) -> nn.Module:
    return tiny_gpt2(seed=seed, initializer_range=0.2).train()


def hf_batch(seed: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return {"input_ids": torch.randint(1, 100, (3, 6), generator=g), "attention_mask": mask}


# ----------------------------------------------------------------------------- formulas
def kl_rows(target: Tensor, current: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(current)) per position, summed over classes."""
    log_p = F.log_softmax(target.float(), dim=-1)
    log_q = F.log_softmax(current.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    return values.mean() if mask is None else values[mask.bool()].mean()


def symmetric_kl(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    return masked_mean(kl_rows(a, b) + kl_rows(b, a), mask)


def forward_kl(target: Tensor, current: Tensor, mask: Tensor | None = None) -> Tensor:
    return masked_mean(kl_rows(target, current), mask)


def draw(shape: tuple[int, ...], sigma: float, generator: torch.Generator, noise: str) -> Tensor:
    if noise == "gaussian":
        return torch.randn(shape, generator=generator) * sigma
    return (torch.rand(shape, generator=generator) * 2 - 1) * sigma


def toy_noised(model: Toy, ids: Tensor, z: Tensor) -> Tensor:
    return model.body(model.embed(ids) + z)


def hf_noised(model: nn.Module, inputs: dict[str, Tensor], z: Tensor) -> Tensor:
    embeds = model.get_input_embeddings()(inputs["input_ids"]) + z
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    return model(inputs_embeds=embeds, **rest).logits


# ============================================================================= R3F
@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_r3f_is_the_symmetric_kl_to_noised_embeddings_on_a_plain_module(noise: str) -> None:
    model = Toy()
    ids, _ = toy_data(8)
    r3f = tram.R3F(sigma=0.5, weight=0.3, noise=noise, seed=4)
    logits = model(ids)
    value = r3f(model, ids, logits)
    draws = NoiseDraws(4)
    expected = symmetric_kl(
        logits, toy_noised(model, ids, draw((8, 5, 8), 0.5, draws.next(), noise))
    )
    torch.testing.assert_close(value, 0.3 * expected, rtol=1e-6, atol=0)
    assert r3f.last_value == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > 1e-4
    # The next call is the stream's next draw.
    second = r3f(model, ids, logits)
    z2 = draw((8, 5, 8), 0.5, draws.next(), noise)
    torch.testing.assert_close(second, 0.3 * symmetric_kl(logits, toy_noised(model, ids, z2)))


def test_r3f_on_bert_matches_inputs_embeds_noise() -> None:
    model = bert()
    inputs = hf_batch()
    r3f = tram.R3F(sigma=0.1, weight=1.0, seed=0)
    logits = model(**inputs).logits
    value = r3f(model, inputs, logits)
    z = draw((3, 6, 32), 0.1, NoiseDraws(0).next(), "gaussian")
    expected = symmetric_kl(logits, hf_noised(model, inputs, z))
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)
    assert expected.item() > 1e-4


def test_r3f_on_a_causal_lm_counts_non_pad_tokens_only() -> None:
    model = gpt2()
    inputs = hf_batch()
    r3f = tram.R3F(sigma=0.5, weight=1.0, seed=0)
    logits = model(**inputs).logits
    value = r3f(model, inputs, logits)
    z = draw((3, 6, 32), 0.5, NoiseDraws(0).next(), "gaussian")
    noised = hf_noised(model, inputs, z)
    expected = symmetric_kl(logits, noised, inputs["attention_mask"])
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)
    unmasked = symmetric_kl(logits, noised)
    assert abs(unmasked.item() - expected.item()) > 0.01 * expected.item()


def test_r3f_gradients_flow_through_both_logits() -> None:
    model = Toy()
    ids, _ = toy_data(8)
    r3f = tram.R3F(sigma=0.5, weight=1.0, seed=0)
    logits = model(ids)
    value = r3f(model, ids, logits)
    (grad_clean,) = torch.autograd.grad(value, logits, retain_graph=True)
    assert grad_clean.abs().max() > 1e-4
    # With the clean logits detached, the gradient comes through the noised forward alone.
    model.zero_grad()
    r3f(model, ids, model(ids).detach()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name


def test_r3f_global_rng_without_a_seed() -> None:
    model = Toy()
    ids, _ = toy_data(8)
    r3f = tram.R3F(sigma=0.5)
    logits = model(ids)
    torch.manual_seed(21)
    value = r3f(model, ids, logits)
    torch.manual_seed(21)
    z = torch.randn(8, 5, 8) * 0.5
    torch.testing.assert_close(value, 0.1 * symmetric_kl(logits, toy_noised(model, ids, z)))


def test_r3f_state_dict_round_trip() -> None:
    model = Toy()
    ids, _ = toy_data(8)
    logits = model(ids).detach()
    r3f = tram.R3F(sigma=0.5, seed=3)
    r3f(model, ids, logits)
    buffer = io.BytesIO()
    torch.save(r3f.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == {"noise_draws": 1, "noise_seed": 3}
    resumed = tram.R3F(sigma=0.5, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(model, ids, logits), r3f(model, ids, logits))
    fresh = tram.R3F(sigma=0.5, seed=3)
    assert not torch.equal(fresh(model, ids, logits), resumed(model, ids, logits))
    assert tram.R3F(sigma=0.5).state_dict() == {}


def test_r3f_on_a_compiled_model_noises_its_second_forward() -> None:
    """torch.compile's graph ignores hooks added after compilation: R3F runs its noised
    forward on the uncompiled module, so a compiled model gets the penalty the eager one does
    (it was 0, silently, before)."""
    ids, _ = toy_data(8)
    model = Toy()
    compiled = torch.compile(model, backend="aot_eager")
    logits = compiled(ids)
    on_compiled = tram.R3F(sigma=0.3, weight=1.0, seed=5)(compiled, ids, logits)
    on_eager = tram.R3F(sigma=0.3, weight=1.0, seed=5)(model, ids, model(ids))
    assert float(on_compiled.detach()) > 1e-4
    torch.testing.assert_close(on_compiled, on_eager, rtol=1e-5, atol=1e-9)


class Holder(nn.Module):
    """A module that calls another, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, ids: Tensor) -> Tensor:
        return self.module(ids)


@pytest.mark.parametrize(
    "how", ["Module.compile()", "forward = torch.compile(forward)", "held torch.compile(model)"]
)
def test_r3f_on_a_model_compiled_in_place_noises_its_second_forward(how: str) -> None:
    """``model.compile()`` (torch's in-place form), a compiled ``forward``, and a compiled model
    inside another module (``DDP(torch.compile(model))``) leave no outer ``OptimizedModule`` to
    unwrap; their graphs ignore the noise hook too. R3F runs its noised forward eagerly all the
    same (it raised that nothing was noised)."""
    ids, _ = toy_data(8)
    model: nn.Module = Toy()
    eager = Toy()
    eager.load_state_dict(model.state_dict())
    if how == "Module.compile()":
        model.compile(backend="aot_eager")
        compiled_call = lambda: model._compiled_call_impl  # noqa: E731
    elif how == "forward = torch.compile(forward)":
        model.forward = torch.compile(model.forward, backend="aot_eager")  # type: ignore[method-assign]
        compiled_call = lambda: vars(model)["forward"]  # noqa: E731
    else:
        model = Holder(torch.compile(model, backend="aot_eager"))
        compiled_call = lambda: vars(model.module)["forward"]  # noqa: E731
    before = compiled_call()
    logits = model(ids)
    on_compiled = tram.R3F(sigma=0.3, weight=1.0, seed=5)(model, ids, logits)
    on_eager = tram.R3F(sigma=0.3, weight=1.0, seed=5)(eager, ids, eager(ids))
    assert float(on_compiled.detach()) > 1e-4
    torch.testing.assert_close(on_compiled, on_eager, rtol=1e-5, atol=1e-9)
    assert compiled_call() is before  # the compiled forward is back in place


def test_r3f_with_inputs_embeds_says_the_token_embeddings_were_skipped() -> None:
    """An HF model given inputs_embeds never calls its token embeddings, so nothing is noised:
    the error names inputs_embeds (it spoke of torch.compile only)."""
    model = bert()
    ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(3))
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids).detach()}
    logits = model(**inputs).logits
    with pytest.raises(RuntimeError, match=r"inputs_embeds=\) skip the token embeddings"):
        tram.R3F(sigma=0.3, seed=9)(model, inputs, logits)


# ============================================================================= R4F
def test_r4f_spectrally_normalises_the_head() -> None:
    model = bert()
    assert torch.linalg.matrix_norm(model.classifier.weight.detach(), ord=2) > 1.2
    r4f = tram.R4F(model, sigma=0.1, seed=0)
    assert r4f.head is model.classifier
    assert torch.nn.utils.parametrize.is_parametrized(model.classifier, "weight")
    # σmax is estimated by power iteration (15 at registration, one per training forward).
    sigma_max = torch.linalg.matrix_norm(model.classifier.weight.detach(), ord=2)
    assert float(sigma_max) == pytest.approx(1.0, abs=0.05)
    # Training keeps it normalised (one power iteration per training-mode forward).
    inputs, labels = hf_batch(), torch.tensor([0, 1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        out = model(**inputs, labels=labels)
        (out.loss + r4f(model, inputs, out.logits)).backward()
        optimizer.step()
    sigma_max = torch.linalg.matrix_norm(model.classifier.weight.detach(), ord=2)
    assert float(sigma_max) == pytest.approx(1.0, abs=2e-2)
    assert r4f.last_value > 0
    # R4F's penalty is R3F's.
    logits = model(**inputs).logits
    z = draw((3, 6, 32), 0.1, NoiseDraws(0).next(), "gaussian")
    fresh = tram.R4F.__new__(tram.R4F)
    tram.R3F.__init__(fresh, sigma=0.1, seed=0)
    torch.testing.assert_close(
        fresh(model, inputs, logits), 0.1 * symmetric_kl(logits, hf_noised(model, inputs, z))
    )


def test_the_r4f_noised_forward_leaves_the_spectral_norm_to_the_clean_forward() -> None:
    """The noised forward writes no state: the head's power-iteration vectors after a penalty
    are those one training forward left (one iteration per step, in the clean forward), and
    its backward still runs through the noised logits."""
    model = bert()
    r4f = tram.R4F(model, sigma=0.1, seed=0)
    twin = copy.deepcopy(model)
    inputs = hf_batch()
    logits = model(**inputs).logits
    with torch.no_grad():
        twin(**inputs)
    penalty = r4f(model, inputs, logits)
    penalty.backward()
    assert penalty.item() > 0
    for (name, got), want in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(got, want), name
    assert model.classifier.parametrizations.weight.original.grad is not None


def test_r4f_head_by_name_and_errors() -> None:
    model = Toy()
    del model.classifier
    model.head = nn.Linear(16, 3)
    with pytest.raises(
        ValueError,
        match=r"cannot find the classification head of Toy \(no \.classifier or \.score\); "
        r"pass head=",
    ):
        tram.R4F(model)
    r4f = tram.R4F(model, head="head")
    assert r4f.head is model.head
    assert torch.nn.utils.parametrize.is_parametrized(model.head, "weight")
    with pytest.raises(ValueError, match=r"Tanh has no nn\.Linear to spectrally normalise"):
        spectral_normalize(nn.Tanh())
    # Idempotent: a head normalised twice has one parametrization.
    spectral_normalize(model.head)
    assert len(model.head.parametrizations.weight) == 1


# ============================================================================= TRPO
def test_trpo_is_the_forward_kl_from_the_previous_step_in_eval_mode() -> None:
    model = Toy(dropout=0.3)
    ids, y = toy_data(16)
    trpo = tram.TRPO(model, weight=2.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = []
    for step in range(3):
        snapshots.append(copy.deepcopy(model))  # the weights of this step, before its update
        optimizer.zero_grad()
        logits = model(ids)  # training mode: dropout on
        value = trpo(model, ids, logits)
        target_model = snapshots[max(step - 1, 0)].eval()
        with torch.no_grad():
            target = target_model(ids)
        expected = forward_kl(target, logits)
        torch.testing.assert_close(value, 2.0 * expected, rtol=1e-6, atol=1e-9)
        assert trpo.last_value == pytest.approx(expected.item(), rel=1e-6)
        assert model.training  # the reference forward ran in eval mode and put it back
        (F.cross_entropy(logits, y) + value).backward()
        optimizer.step()
        trpo.after_step(model)
    assert trpo.last_value > 1e-3
    # Gradients flow through the current logits only; the target is a constant.
    logits = model(ids)
    (grad,) = torch.autograd.grad(trpo(model, ids, logits), logits)
    assert grad.abs().max() > 0


def test_trpo_gradient_accumulation_and_sam_use_one_target_per_step() -> None:
    """All calls of a step compare with θt−1, and the next target is θt (not θt + ε)."""
    model = Toy()
    ids, y = toy_data(16)
    micro = [(ids[:8], y[:8]), (ids[8:], y[8:])]
    trpo = tram.TRPO(model, weight=1.0)
    base = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer = tram.SAM(base, rho=0.5)
    before: list[nn.Module] = []
    values: list[list[float]] = []
    for _ in range(3):
        before.append(copy.deepcopy(model))
        values.append([])

        def closure() -> Tensor:
            optimizer.zero_grad()
            total = torch.zeros(())
            for x, t in micro:
                logits = model(x)
                penalty = trpo(model, x, logits)
                values[-1].append(trpo.last_value)
                loss = (F.cross_entropy(logits, t) + penalty) / 2
                loss.backward()
                total = total + loss.detach()
            return total

        optimizer.step(closure)
        trpo.after_step(model)
    # Step 3 (index 2): θt−1 is the weights before step 2; both micro-batches, both passes.
    target = before[1].eval()
    with torch.no_grad():
        expected_first_pass = [float(forward_kl(target(x), before[2](x))) for x, _ in micro]
    assert values[2][:2] == pytest.approx(expected_first_pass, rel=1e-5)
    assert len(values[2]) == 4  # two micro-batches at θ and two at θ + ε
    assert values[2][2:] != pytest.approx(values[2][:2], rel=1e-3)  # θ + ε is elsewhere
    # The target for the next step is θ of step 3, not its θ + ε.
    for name, tensor in trpo.reference.tensors.items():
        assert torch.equal(tensor, dict(before[2].named_parameters())[name]), name


def test_trpo_first_step_and_after_step_without_a_call() -> None:
    model = Toy()
    ids, _ = toy_data(8)
    trpo = tram.TRPO(model)
    assert trpo(model, ids, model(ids)).item() == 0.0  # θt−1 = θ0 = θ at the first step
    trpo.after_step(model)
    with torch.no_grad():
        model.classifier.bias[0] += 1.0
    trpo.after_step(model)  # a step without a penalty call keeps the target
    assert trpo(model, ids, model(ids)) > 0


@pytest.mark.parametrize("make", [tram.MESA, tram.TRPO])
def test_the_reference_forward_inside_parametrize_cached_uses_the_reference_weights(
    make: Callable[..., Any],
) -> None:
    """Inside ``parametrize.cached()`` around the loss, the reference forward (the same modules
    with the reference weights) used to reuse the live parametrized weight: the penalty was
    0.011 instead of 0.065 after a step. Each penalty and the weights equal the uncached run."""

    class Scaled(nn.Module):
        def forward(self, weight: Tensor) -> Tensor:
            return 1.5 * weight

    runs = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        torch.nn.utils.parametrize.register_parametrization(model[2], "weight", Scaled())
        regularizer = make(model, weight=1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        inputs, labels = torch.randn(16, 4), torch.randint(0, 3, (16,))
        penalties = []
        for _ in range(3):
            optimizer.zero_grad()
            with torch.nn.utils.parametrize.cached() if cached else contextlib.nullcontext():
                logits = model(inputs)
                penalty = regularizer(model, inputs, logits)
                (F.cross_entropy(logits, labels) + penalty).backward()
            optimizer.step()
            regularizer.after_step(model)
            penalties.append(penalty.item())
        runs.append((penalties, [p.detach().clone() for p in model.parameters()]))
    (uncached_penalties, uncached_weights), (cached_penalties, cached_weights) = runs
    assert uncached_penalties[1] > 0.03
    assert cached_penalties == uncached_penalties
    for cached_weight, uncached_weight in zip(cached_weights, uncached_weights, strict=True):
        assert torch.equal(cached_weight, uncached_weight)


def test_trpo_and_mesa_state_dict_round_trip() -> None:
    ids, _ = toy_data(8)
    for make in (lambda m: tram.TRPO(m), lambda m: tram.MESA(m, decay=0.5)):
        model = Toy()
        regularizer = make(model)
        regularizer(model, ids, model(ids))
        with torch.no_grad():
            model.classifier.weight.add_(0.3)
        regularizer.after_step(model)
        buffer = io.BytesIO()
        torch.save(regularizer.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        other_model = Toy(seed=5)
        resumed = make(other_model)
        resumed.load_state_dict(state)
        other_model.load_state_dict(model.state_dict())
        for name, tensor in regularizer.reference.tensors.items():
            assert torch.equal(resumed.reference.tensors[name], tensor)
        logits = model(ids)
        assert torch.equal(resumed(other_model, ids, logits), regularizer(model, ids, logits))


@pytest.mark.parametrize("replace", ["new head", "load_state_dict(assign=True)"])
@pytest.mark.parametrize("make", [tram.TRPO, tram.MESA], ids=["TRPO", "MESA"])
def test_a_reference_whose_parameters_were_replaced_is_refused(make, replace: str) -> None:
    """A module replaced after the regularizer was built (a new head, PEFT's LoRA layers): the
    reference holds copies of parameters the model no longer has under those names. A new head
    of the same shape took the old head's copy, silently; PEFT failed inside functional_call
    with "property 'weight' of 'Linear' object has no setter"."""
    model = Toy()
    ids, _ = toy_data(8)
    regularizer = make(model, weight=0.7)
    regularizer(model, ids, model(ids))
    if replace == "new head":
        model.classifier = nn.Linear(16, 3)
    else:  # new parameter objects: the reference would be refreshed from the old ones
        model.load_state_dict(Toy(seed=4).state_dict(), assign=True)
    with pytest.raises(RuntimeError, match=r"(classifier|embed)\.weight.*after it was built"):
        regularizer(model, ids, model(ids))


@pytest.mark.parametrize("make", [tram.TRPO, tram.MESA], ids=["TRPO", "MESA"])
def test_a_regularizer_built_before_peft_wrapped_the_model_is_refused(make) -> None:
    peft = pytest.importorskip("peft")
    model = Toy()
    ids, _ = toy_data(8)
    regularizer = make(model, weight=0.7)
    config = peft.LoraConfig(r=2, target_modules=["hidden"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    with pytest.raises(RuntimeError, match=r"hidden\.weight.*after it was built"):
        regularizer(wrapped, ids, wrapped(ids))
    # Built after get_peft_model, it works.
    make(wrapped, weight=0.7)(wrapped, ids, wrapped(ids))


# ============================================================================= MESA
def test_mesa_is_tau_squared_kl_from_the_ema_with_temperature() -> None:
    model = Toy(dropout=0.3)
    ids, y = toy_data(16)
    mesa = tram.MESA(model, weight=0.7, decay=0.6, temperature=2.0)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        logits = model(ids)
        value = mesa(model, ids, logits)
        with torch.no_grad():
            target = ema.eval()(ids)
        expected = 4.0 * forward_kl(target / 2.0, logits / 2.0)
        torch.testing.assert_close(value, 0.7 * expected, rtol=1e-5, atol=1e-9)
        assert mesa.last_value == pytest.approx(expected.item(), rel=1e-5)
        (F.cross_entropy(logits, y) + value).backward()
        optimizer.step()
        mesa.after_step(model)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.6).add_(p, alpha=0.4)
    for name, e in ema.named_parameters():
        torch.testing.assert_close(mesa.reference.tensors[name], e)
    assert mesa.last_value > 1e-3


def test_bad_regularizer_arguments() -> None:
    model = Toy()
    with pytest.raises(ValueError, match=r"Invalid weight: -1"):
        tram.R3F(weight=-1.0)
    with pytest.raises(ValueError, match=r"Invalid sigma: -0\.1"):
        tram.R3F(sigma=-0.1)
    with pytest.raises(ValueError, match=r"Invalid temperature: 0"):
        tram.MESA(model, temperature=0.0)
    with pytest.raises(ValueError, match=r"Invalid decay: 2"):
        tram.MESA(model, decay=2.0)
    with pytest.raises(ValueError, match=r"Unknown divergence: 'kl'"):
        tram.TRPO(model, divergence="kl")


# ============================================================================= after_step
# TRPO's θt−1 and MESA's average advance once per optimizer step; the caller's after_step()
# calls are checked against the steps torch optimizers take.
REFERENCE_REGULARIZERS = {
    "trpo": lambda model: tram.TRPO(model, weight=0.7),
    "mesa": lambda model: tram.MESA(model, weight=0.7, decay=0.6),
}


def train_with_calls(make: Callable[[nn.Module], Any], calls_per_step: int) -> Any:
    """Three SGD steps with the penalty, ``after_step`` called ``calls_per_step`` times after
    each (as a hook run once per micro-batch would)."""
    model = Toy()
    ids, y = toy_data(16)
    regularizer = make(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        logits = model(ids)
        (F.cross_entropy(logits, y) + regularizer(model, ids, logits)).backward()
        optimizer.step()
        for _ in range(calls_per_step):
            regularizer.after_step(model)
    return regularizer


@pytest.mark.parametrize("name", sorted(REFERENCE_REGULARIZERS))
def test_after_step_advances_once_per_optimizer_step(name: str) -> None:
    make = REFERENCE_REGULARIZERS[name]
    once, thrice = train_with_calls(make, 1), train_with_calls(make, 3)
    for key, tensor in once.reference.tensors.items():
        assert torch.equal(thrice.reference.tensors[key], tensor), key
    assert thrice.last_value == once.last_value > 1e-4


@pytest.mark.parametrize("name", sorted(REFERENCE_REGULARIZERS))
def test_after_step_without_a_step_changes_nothing(name: str) -> None:
    """A step that was not taken (a GradScaler skip, a wrapper's non-finite skip) does not move
    the reference, even though the weights differ from it."""
    regularizer = train_with_calls(REFERENCE_REGULARIZERS[name], 1)
    before = {key: tensor.clone() for key, tensor in regularizer.reference.tensors.items()}
    model = regularizer.reference.model
    assert not torch.equal(model.hidden.weight, before["hidden.weight"])
    regularizer.after_step(model)
    for key, tensor in regularizer.reference.tensors.items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("name", sorted(REFERENCE_REGULARIZERS))
def test_a_forgotten_after_step_is_refused(name: str) -> None:
    model = Toy()
    ids, y = toy_data(16)
    regularizer = REFERENCE_REGULARIZERS[name](model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    logits = model(ids)
    (F.cross_entropy(logits, y) + regularizer(model, ids, logits)).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"since the last .*after_step\(model\).* stale"):
        regularizer(model, ids, model(ids))
    regularizer.after_step(model)
    regularizer(model, ids, model(ids))


def test_steps_that_are_not_this_models_are_not_its_steps() -> None:
    """Another model's optimizer, a tram wrapper whose base step was skipped (non-finite loss
    at θ+ε) and the zero-gradient lr-0 step with which torch.distributed.checkpoint creates an
    optimizer's state move none of this model's weights: the penalty goes on without
    after_step."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, other = Toy(), Toy(seed=3)
    ids, y = toy_data(16)
    mesa = tram.MESA(model, weight=0.7, decay=0.6)
    foreign = torch.optim.SGD(other.parameters(), lr=0.5)
    F.cross_entropy(other(ids), y).backward()
    foreign.step()
    mesa(model, ids, model(ids))

    sam = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.3)

    def closure() -> Tensor:
        sam.zero_grad()
        logits = model(ids)
        loss = F.cross_entropy(logits, y) + mesa(model, ids, logits)
        (loss * (torch.inf if sam.is_perturbed else 1.0)).backward()
        return loss

    with pytest.warns(RuntimeWarning, match="skipped the base step"):
        sam.step(closure)
    assert sam.skipped_steps == 1
    mesa(model, ids, model(ids))

    donor = Toy(seed=4)
    saved = get_optimizer_state_dict(donor, torch.optim.AdamW(donor.parameters(), lr=0.01))
    model.zero_grad(set_to_none=True)  # a resumed process: no gradients, no optimizer state
    resumed = torch.optim.AdamW(model.parameters(), lr=0.01)
    set_optimizer_state_dict(model, resumed, saved)
    assert resumed.state  # created by its zero-gradient, lr-0 step
    mesa(model, ids, model(ids))


def test_a_copied_regularizer_watches_its_own_model() -> None:
    model = Toy()
    ids, y = toy_data(16)
    copied_model, copied = copy.deepcopy((model, tram.MESA(model, weight=0.7, decay=0.6)))
    optimizer = torch.optim.SGD(copied_model.parameters(), lr=0.5)
    F.cross_entropy(copied_model(ids), y).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="stale"):
        copied(copied_model, ids, copied_model(ids))


# ============================================================================= with SAM
def test_r3f_inside_a_sam_closure_equals_sam_by_hand() -> None:
    ids, y = toy_data(16)
    model = Toy()
    r3f = tram.R3F(sigma=0.5, weight=1.0, seed=2)
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.5)

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = model(ids)
        loss = F.cross_entropy(logits, y) + r3f(model, ids, logits)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)

    reference = Toy()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.5)
    draws = NoiseDraws(2)

    def loss_by_hand() -> Tensor:
        logits = reference(ids)
        noised = toy_noised(reference, ids, draw((16, 5, 8), 0.5, draws.next(), "gaussian"))
        return F.cross_entropy(logits, y) + symmetric_kl(logits, noised)

    for _ in range(2):
        sgd.zero_grad()
        loss_by_hand().backward()
        params = list(reference.parameters())
        grads = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(0.5 * g / (norm + 1e-12))
        sgd.zero_grad()
        loss_by_hand().backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert r3f.last_value > 1e-3


# ============================================================================= toy problems
Measure = Callable[[nn.Module, nn.Module, Any], float]


def train(
    regularizer_of: Callable[[nn.Module], Any],
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    *,
    steps: int,
    measure: Measure | None = None,
) -> tuple[nn.Module, list[float]]:
    """Full-batch training on the toy task with ``loss + regularizer``.

    ``measure(weights before the step, model, regularizer)`` is recorded after every step. The
    runs without regularization use the same regularizer with weight 0, so that both runs take
    the same code path (and the same noise draws).
    """
    model = Toy()
    ids, y = toy_data()
    regularizer = regularizer_of(model)
    optimizer = make_optimizer(model.parameters())
    measured = []
    for _ in range(steps):
        before = copy.deepcopy(model)
        optimizer.zero_grad()
        logits = model(ids)
        (F.cross_entropy(logits, y) + regularizer(model, ids, logits)).backward()
        optimizer.step()
        regularizer.after_step(model)
        if measure is not None:
            measured.append(measure(before, model, regularizer))
    return model, measured


def noise_sensitivity(model: nn.Module) -> float:
    """Mean symmetric KL between the clean and the noised outputs, over fixed draws (σ = 1)."""
    ids, _ = toy_data()
    generator = torch.Generator().manual_seed(77)
    with torch.no_grad():
        clean = model(ids)
        values = [
            symmetric_kl(clean, toy_noised(model, ids, torch.randn(64, 5, 8, generator=generator)))
            for _ in range(4)
        ]
    return float(sum(values) / len(values))


def test_r3f_lowers_the_sensitivity_to_embedding_noise() -> None:
    sensitivity = {}
    for weight in (0.0, 5.0):
        model, _ = train(
            lambda m, w=weight: tram.R3F(sigma=1.0, weight=w, seed=0),
            lambda params: torch.optim.SGD(params, lr=1.0),
            steps=40,
        )
        sensitivity[weight] = noise_sensitivity(model)
    assert sensitivity[0.0] > 0.1  # measured 0.91 and 0.005
    assert sensitivity[5.0] < 0.2 * sensitivity[0.0]


def test_trpo_lowers_the_kl_between_consecutive_steps() -> None:
    def step_kl(before: nn.Module, model: nn.Module, _: Any) -> float:
        ids, _ = toy_data()
        with torch.no_grad():
            return float(forward_kl(before(ids), model(ids)))

    total = {}
    for weight in (0.0, 10.0):
        _, measured = train(
            lambda m, w=weight: tram.TRPO(m, weight=w),
            lambda params: torch.optim.Adam(params, lr=0.05),
            steps=30,
            measure=step_kl,
        )
        total[weight] = sum(measured)
    assert total[0.0] > 0.05  # measured 0.26 and 0.11
    assert total[10.0] < 0.6 * total[0.0]


def test_mesa_lowers_the_kl_to_the_moving_average() -> None:
    def ema_kl(before: nn.Module, model: nn.Module, mesa: Any) -> float:
        ids, _ = toy_data()
        with torch.no_grad():
            return float(forward_kl(mesa.reference.forward(ids), model(ids)))

    total = {}
    for weight in (0.0, 3.0):
        _, measured = train(
            lambda m, w=weight: tram.MESA(m, weight=w, decay=0.9),
            lambda params: torch.optim.SGD(params, lr=0.5),
            steps=30,
            measure=ema_kl,
        )
        total[weight] = sum(measured)
    assert total[0.0] > 0.1  # measured 0.48 and 0.13
    assert total[3.0] < 0.5 * total[0.0]
