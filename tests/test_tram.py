"""TRAM against a plain implementation of the paper's Algorithm 1, and its contract.

The reference (:func:`reference_tram`) is written here from the paper (Sherborne et al., ICLR
2024, Algorithm 1 with Eq. 4, 5 and 7; Algorithm 2 for TRAM-Fisher) with ``torch.nn.functional``
and deep copies of the model: it shares no maths with the library. It follows the choices that
``tram/_tram.py`` documents where the paper is silent: d is the mean forward KL(target || current)
per example (per non-padding token for language models); the noise is added to the output of the
token embedding and drawn from a ``torch.Generator`` seeded like TRAM's draw (``NoiseDraws``),
one draw per noised forward; θt−1 is a snapshot of the weights taken before the base update; the
EMA is updated after it; TRAM-Fisher's first pass runs on noised embeddings and its ascent is
Fisher SAM's.

Dropout is off wherever two runs are compared, so that the comparisons are deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tram

transformers = pytest.importorskip("transformers")

from tests.helpers import NoiseDraws, tiny_bert, tiny_gpt2  # noqa: E402

VOCAB = 100
HIDDEN = 32
# Values that are not fixed points of likely mistakes: sigma**2 != sigma, 1 - decay != decay,
# and TRAM-Fisher's radius and Fisher eta differ (a mix-up of the two changes the step).
SIGMA = 0.3
EMA_DECAY = 0.8
RHO = 0.05
FISHER_ETA = 0.5
STEPS = 3
VARIANTS = ["noise", "pretrained", "previous", "ema", "fisher"]
# float32 round-off between two orders of summation, over three AdamW steps (measured <= 2e-6);
# the ascent itself moves the weights by more than 1e-2 over the same steps.
TIGHT = {"rtol": 1e-5, "atol": 5e-6}


# ----------------------------------------------------------------------------- models
def bert(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    model = tiny_bert(seed=seed, dropout=dropout, vocab_size=VOCAB, initializer_range=0.2).train()
    # Softmax is shift invariant: the key bias has a zero gradient in exact arithmetic, and AdamW
    # would turn its round-off (~1e-7) into steps of about ±lr. Frozen, it is also a frozen
    # parameter that the reference weights must share with the live model.
    for layer in model.bert.encoder.layer:
        layer.attention.self.key.bias.requires_grad_(False)
    return model


def gpt2(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    model = tiny_gpt2(seed=seed, dropout=dropout, vocab_size=VOCAB, initializer_range=0.2).train()
    # The key third of c_attn.bias has a zero gradient in exact arithmetic (see bert()).
    for block in model.transformer.h:
        block.attn.c_attn.bias.requires_grad_(False)
    return model


class Plain(nn.Module):
    """Embedding, mean over positions, linear: a plain module whose forward takes a tensor."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, 4)
        nn.init.normal_(self.head.weight, std=1.0)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids).mean(dim=1))


def classification_batches(steps: int, seed: int = 1) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 6), generator=g)
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[1, 4:] = 0
        labels = torch.randint(0, 3, (4,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def lm_batches(steps: int, seed: int = 2, pad_id: int = 0) -> list[dict[str, Tensor]]:
    """Right-padded causal-LM batches: rows of 7, 4 and 6 tokens; labels -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (3, 7), generator=g)
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[1, 4:] = 0
        mask[2, 6:] = 0
        ids = ids.masked_fill(mask == 0, pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def plain_batches(steps: int, seed: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (8, 5), generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(steps)
    ]


@dataclasses.dataclass
class Task:
    """A model and its batches: the loss of the user's closure, and the reference's forward."""

    name: str
    make_model: Callable[..., nn.Module]
    batches: Callable[[int], list[Any]]
    lr: float

    @property
    def hf(self) -> bool:
        return self.name != "plain"

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """What the user's closure computes: the same closure as for SAM."""
        if self.hf:
            return model(**batch).loss
        ids, y = batch
        return F.cross_entropy(model(ids), y)

    def embedding_shape(self, batch: Any) -> tuple[int, ...]:
        ids = batch["input_ids"] if self.hf else batch[0]
        return (*ids.shape, HIDDEN if self.hf else 16)

    def forward(
        self, model: nn.Module, batch: Any, z: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(logits, loss) with ``z`` added to the token embeddings, written without hooks."""
        if self.hf:
            if z is None:
                out = model(**batch)
            else:
                embeds = model.get_input_embeddings()(batch["input_ids"]) + z
                rest = {k: v for k, v in batch.items() if k != "input_ids"}
                out = model(inputs_embeds=embeds, **rest)
            return out.logits, out.loss
        ids, y = batch
        h = model.embed(ids)
        if z is not None:
            h = h + z
        logits = model.head(h.mean(dim=1))
        return logits, F.cross_entropy(logits, y)

    @staticmethod
    def mask(batch: Any, logits: Tensor) -> Tensor | None:
        return batch["attention_mask"].bool() if logits.dim() == 3 else None


TASKS = {
    "bert": Task("bert", bert, classification_batches, lr=1e-2),
    "gpt2": Task("gpt2", gpt2, lm_batches, lr=1e-2),
    "plain": Task("plain", Plain, plain_batches, lr=0.1),
}


# ----------------------------------------------------------------------------- the reference
def adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """The base optimizer of every run here.

    eps = 1e-3: on its first steps AdamW moves an element by lr · g / (|g| + eps), so with the
    default 1e-8 an element whose gradient is ~1e-6 amplifies the round-off between two correct
    implementations by lr / eps into a difference far above any tight tolerance.
    """
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, eps=1e-3)


def mean_forward_kl(target: Tensor, current: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over positions of KL(softmax(target) || softmax(current)), summed over classes."""
    log_p = F.log_softmax(target.float(), dim=-1)
    log_q = F.log_softmax(current.float(), dim=-1)
    per_position = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return per_position.mean() if mask is None else per_position[mask].mean()


def _probabilities(target: Tensor, current: Tensor, mask: Tensor | None):
    p = F.softmax(target.double(), dim=-1)
    q = F.softmax(current.double(), dim=-1)
    if mask is not None:
        p, q = p[mask], q[mask]
    return p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) per row, summed over classes."""
    return (p * (p.log() - q.log())).sum(-1)


def hand_reverse_kl(target: Tensor, current: Tensor, mask: Tensor | None = None) -> Tensor:
    p, q = _probabilities(target, current, mask)
    return _kl(q, p).mean()


def hand_symmetric_kl(target: Tensor, current: Tensor, mask: Tensor | None = None) -> Tensor:
    p, q = _probabilities(target, current, mask)
    return (_kl(p, q) + _kl(q, p)).mean()


def hand_js(target: Tensor, current: Tensor, mask: Tensor | None = None) -> Tensor:
    p, q = _probabilities(target, current, mask)
    m = (p + q) / 2
    return (0.5 * _kl(p, m) + 0.5 * _kl(q, m)).mean()


def hand_l2(target: Tensor, current: Tensor, mask: Tensor | None = None) -> Tensor:
    """The Euclidean distance between the probability vectors (tram/divergence.py's choice)."""
    p, q = _probabilities(target, current, mask)
    return (p - q).pow(2).sum(-1).sqrt().mean()


def hand_mmd(target: Tensor, current: Tensor, mask: Tensor | None = None) -> Tensor:
    """Biased squared MMD between the sets of probability vectors, with the inverse
    multiquadratic kernel c / (c + |x - y|^2) summed over tram/divergence.py's bandwidths."""
    p, q = _probabilities(target, current, mask)
    bandwidths = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

    def kernel_mean(x: Tensor, y: Tensor) -> Tensor:
        squared = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
        return sum(c / (c + squared) for c in bandwidths).mean()

    return kernel_mean(p, p) + kernel_mean(q, q) - 2 * kernel_mean(p, q)


HAND_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": mean_forward_kl,
    "reverse_kl": hand_reverse_kl,
    "symmetric_kl": hand_symmetric_kl,
    "js": hand_js,
    "l2": hand_l2,
    "mmd": hand_mmd,
}


def draw_noise(
    shape: tuple[int, ...], generator: torch.Generator, sigma: float, noise: str = "gaussian"
) -> Tensor:
    """N(0, sigma^2) or U(-sigma, sigma) from ``generator``: one draw of the noise TRAM adds."""
    if noise == "gaussian":
        return torch.randn(shape, generator=generator) * sigma
    return (torch.rand(shape, generator=generator) * 2 - 1) * sigma


@dataclasses.dataclass
class Run:
    model: nn.Module
    radii: list[float]
    optimizer: Any = None


def reference_tram(
    task: Task,
    trust_region: str,
    steps: int = STEPS,
    *,
    sigma: float = SIGMA,
    noise: str = "gaussian",
    divergence: str = "forward_kl",
    adaptive: bool = True,
    eta: float = 0.0,
    rho: float = RHO,
    fisher_eta: float = FISHER_ETA,
    ema_decay: float = EMA_DECAY,
    max_radius: float | None = None,
    seed: int = 0,
) -> Run:
    """Algorithm 1 (Algorithm 2 for "fisher") by hand, with AdamW as the base optimizer."""
    model = task.make_model()
    base = adamw(model, task.lr)
    draws = NoiseDraws(seed)
    target_model = copy.deepcopy(model)  # θ0, θt−1 or the EMA
    radii: list[float] = []

    def draw(batch: Any) -> Tensor:
        return draw_noise(task.embedding_shape(batch), draws.next(), sigma, noise)

    for batch in task.batches(steps):
        # (2) The predictive distribution and the gradient at θt (on x + z for TRAM-Fisher).
        base.zero_grad()
        logits, loss = task.forward(model, batch, draw(batch) if trust_region == "fisher" else None)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad.detach().clone() for p in params]
        with torch.no_grad():
            if trust_region == "fisher":
                # ε = ρ F⁻¹ g / sqrt(gᵀ F⁻¹ g) with the diagonal F = 1 + η g² (FSAM, γ = ρ).
                fisher = [1 + fisher_eta * g * g for g in grads]
                norm = torch.sqrt(sum((g * g / f).sum() for g, f in zip(grads, fisher)))
                epsilon = [rho * (g / f) / (norm + 1e-12) for g, f in zip(grads, fisher)]
            else:
                # (3) The trust-region distance: Eq. 5 (noise) or Eq. 4 (reference weights).
                if trust_region == "noise":
                    target_logits, _ = task.forward(model, batch, draw(batch))
                else:
                    target_logits, _ = task.forward(target_model, batch)
                d = HAND_DIVERGENCES[divergence](
                    target_logits, logits, task.mask(batch, logits)
                ).item()
                if max_radius is not None:
                    d = min(d, max_radius)
                radii.append(d)
                # (4) Eq. 7: ε = d T² g / ‖T g‖ with T = |θ| + η (ASAM form) or T = 1 (SAM form).
                scales = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
                norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
                epsilon = [d * t * t * g / (norm + 1e-12) for t, g in zip(scales, grads)]
            # (5) The ascent.
            saved = [p.detach().clone() for p in params]
            for p, e in zip(params, epsilon):
                p.add_(e)
        # (6) The gradient at θ + ε, on the clean batch.
        base.zero_grad()
        task.forward(model, batch)[1].backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
            if trust_region == "previous":
                target_model.load_state_dict(model.state_dict())  # θt, before the update
        # (7) The descent, by the base optimizer, from θ.
        base.step()
        if trust_region == "ema":
            with torch.no_grad():
                for t, p in zip(target_model.parameters(), model.parameters()):
                    t.mul_(ema_decay).add_(p, alpha=1 - ema_decay)
    return Run(model, radii)


# ----------------------------------------------------------------------------- the library
def make_tram(task: Task, model: nn.Module, trust_region: str, **kwargs: Any) -> tram.TRAM:
    # Each trust region takes its own options only (others raise TypeError). The noise seed is
    # the reference loop's (the default follows torch.manual_seed: test_noise_stream).
    defaults = {
        "noise": {"sigma": SIGMA, "seed": 0},
        "fisher": {"sigma": SIGMA, "rho": RHO, "fisher_eta": FISHER_ETA, "seed": 0},
        "ema": {"ema_decay": EMA_DECAY},
    }
    options = {**defaults.get(trust_region, {}), **kwargs}
    return tram.TRAM(adamw(model, task.lr), model, trust_region=trust_region, **options)


def closure_for(task: Task, optimizer: Any, model: nn.Module, batch: Any) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        return loss

    return closure


def library_tram(
    task: Task,
    trust_region: str,
    steps: int = STEPS,
    *,
    explicit: bool = False,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> Run:
    model = task.make_model() if model is None else model
    optimizer = make_tram(task, model, trust_region, **kwargs)
    for batch in task.batches(steps):
        closure = closure_for(task, optimizer, model, batch)
        if explicit:
            with optimizer.first_pass():
                closure()
            if optimizer.first_step():
                closure()
            optimizer.second_step()
        else:
            optimizer.step(closure)
        assert not optimizer.is_perturbed
    return Run(model, list(optimizer.radius_history), optimizer)


def plain_adamw(task: Task, steps: int = STEPS) -> nn.Module:
    model = task.make_model()
    base = adamw(model, task.lr)
    for batch in task.batches(steps):
        base.step(closure_for(task, base, model, batch))
    return model


def max_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)


def assert_same_params(a: nn.Module, b: nn.Module, *, exact: bool = False) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, **TIGHT, msg=lambda m, n=name: f"{n}: {m}")


def hook_count(model: nn.Module) -> int:
    """Every module hook of ``model`` and every global module hook."""
    count = 0
    for module in model.modules():
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            count += len(getattr(module, name, {}))
    globals_ = torch.nn.modules.module
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        count += len(getattr(globals_, name, {}))
    return count


# ============================================================================= Algorithm 1
@pytest.mark.parametrize("trust_region", VARIANTS)
@pytest.mark.parametrize("task_name", list(TASKS))
def test_equals_algorithm_1(task_name: str, trust_region: str) -> None:
    task = TASKS[task_name]
    reference = reference_tram(task, trust_region)
    library = library_tram(task, trust_region)
    assert_same_params(library.model, reference.model)
    if trust_region == "fisher":
        assert library.radii == []  # no d: the radius is rho
    else:
        assert len(library.radii) == STEPS
        torch.testing.assert_close(library.radii, reference.radii, rtol=1e-5, atol=0)
        # A trust region that is there: d is not negligible (θt−1 and θ0 equal θ at step 1).
        assert min(library.radii[1:]) > 1e-3
        if trust_region in ("pretrained", "previous"):
            assert library.radii[0] == 0.0
    # The ascent matters: without it the weights are far from TRAM's (the test can fail).
    assert max_diff(library.model, plain_adamw(task)) > 100 * TIGHT["atol"]


@pytest.mark.parametrize("trust_region", ["noise", "pretrained"])
@pytest.mark.parametrize("options", [{"adaptive": False}, {"eta": 0.05}], ids=["sam", "eta"])
def test_sam_form_and_eta_equal_algorithm_1(trust_region: str, options: dict[str, Any]) -> None:
    task = TASKS["bert"]
    reference = reference_tram(task, trust_region, **options)
    library = library_tram(task, trust_region, **options)
    assert_same_params(library.model, reference.model)
    torch.testing.assert_close(library.radii, reference.radii, rtol=1e-5, atol=0)
    default = reference_tram(task, trust_region)
    assert max_diff(library.model, default.model) > 100 * TIGHT["atol"]


@pytest.mark.parametrize(
    ("task_name", "divergence"),
    [("plain", name) for name in HAND_DIVERGENCES if name != "forward_kl"]
    + [("gpt2", "mmd"), ("gpt2", "js")],
)
def test_divergence_argument_equals_algorithm_1(task_name: str, divergence: str) -> None:
    """d is the named divergence (written by hand above), on the recorded logits; MMD is
    set-level, so on padded LM batches it must see the counted positions only."""
    task = TASKS[task_name]
    reference = reference_tram(task, "pretrained", divergence=divergence)
    library = library_tram(task, "pretrained", divergence=divergence)
    torch.testing.assert_close(library.radii, reference.radii, rtol=1e-5, atol=1e-7)
    assert_same_params(library.model, reference.model)
    # The forward KL gives other radii (1000 times the tolerance apart): the test can fail.
    # Reverse and forward KL agree to second order for close distributions, hence 1%.
    forward_kl = reference_tram(task, "pretrained")
    assert max(reference.radii) > 1e-3
    gap = max(abs(a - b) for a, b in zip(reference.radii, forward_kl.radii))
    assert gap > 0.01 * max(reference.radii)


@pytest.mark.parametrize("trust_region", ["noise", "fisher"])
@pytest.mark.parametrize("task_name", ["plain", "bert"])
def test_uniform_noise_equals_algorithm_1(task_name: str, trust_region: str) -> None:
    """noise="uniform" draws z ~ U(-sigma, sigma) (sigma the half-width), for d and for
    TRAM-Fisher's noised first pass."""
    task = TASKS[task_name]
    reference = reference_tram(task, trust_region, noise="uniform")
    library = library_tram(task, trust_region, noise="uniform")
    assert_same_params(library.model, reference.model)
    torch.testing.assert_close(library.radii, reference.radii, rtol=1e-5, atol=0)
    gaussian = reference_tram(task, trust_region)
    assert max_diff(library.model, gaussian.model) > 100 * TIGHT["atol"]
    if trust_region == "noise":
        assert min(abs(a - b) / b for a, b in zip(library.radii, gaussian.radii)) > 0.05


def test_a_radius_below_zero_from_round_off_is_zero(monkeypatch) -> None:
    """KL ≥ 0, but its float32 sum with the target at the model can come out just below 0 (seen
    at -1.6e-8 under bf16 autocast); a negative radius would turn the ascent into a descent."""
    import tram._recording

    exact = tram._recording.chunked_mean_divergence
    monkeypatch.setattr(
        tram._recording, "chunked_mean_divergence", lambda *a, **k: exact(*a, **k) - 1e-8
    )
    run = library_tram(TASKS["plain"], "pretrained", steps=2)
    assert run.radii[0] == 0.0  # θ = θ0: d = -1e-8 after the shift
    assert run.radii[1] > 0


def test_max_radius_clips_d() -> None:
    task = TASKS["plain"]
    unclipped = reference_tram(task, "noise").radii
    limit = 0.0432
    assert max(unclipped) > limit > min(unclipped)
    reference = reference_tram(task, "noise", max_radius=limit)
    library = library_tram(task, "noise", max_radius=limit)
    assert library.radii == pytest.approx(reference.radii, rel=1e-5)
    assert library.radii[:2] == [limit, limit]
    assert library.radii[2] < limit
    assert_same_params(library.model, reference.model)
    assert max_diff(library.model, reference_tram(task, "noise").model) > 100 * TIGHT["atol"]


@pytest.mark.parametrize(
    ("task_name", "trust_region"),
    [(name, variant) for variant in VARIANTS for name in ("plain",)] + [("bert", "noise")],
)
def test_explicit_form_equals_step_closure(task_name: str, trust_region: str) -> None:
    task = TASKS[task_name]
    closure_run = library_tram(task, trust_region)
    explicit_run = library_tram(task, trust_region, explicit=True)
    assert_same_params(explicit_run.model, closure_run.model, exact=True)
    assert explicit_run.radii == closure_run.radii


def test_first_step_without_first_pass_raises() -> None:
    task = TASKS["plain"]
    model = task.make_model()
    optimizer = make_tram(task, model, "noise")
    closure_for(task, optimizer, model, task.batches(1)[0])()
    with pytest.raises(RuntimeError, match=r"no recorded forward pass.*first_pass\(\)"):
        optimizer.first_step()
    assert not optimizer.is_perturbed


# ============================================================================= causal LM padding
def test_lm_radius_is_the_mean_over_non_pad_tokens() -> None:
    """d with right padding equals d over the real tokens only, run row by row unpadded."""
    model = gpt2()
    optimizer = make_tram(TASKS["gpt2"], model, "pretrained")
    pretrained = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # frozen parameters are shared with the reference
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    current = copy.deepcopy(model)
    batch = lm_batches(1)[0]
    optimizer.step(closure_for(TASKS["gpt2"], optimizer, model, batch))

    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in range(3):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row : row + 1, :length]
            kl = mean_forward_kl(pretrained(ids).logits, current(ids).logits)
            total += float(kl) * length
            tokens += length
        padded = mean_forward_kl(pretrained(**batch).logits, current(**batch).logits)
    assert tokens == 17
    assert optimizer.last_radius == pytest.approx(total / tokens, rel=1e-5)
    # Averaging over every position (padding included) would give another number.
    assert abs(float(padded) - total / tokens) > 0.01 * total / tokens


class _PositionalLM(nn.Module):
    """A user's module around a causal LM: ``forward(input_ids, attention_mask)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("sharded", [False, True], ids=["during-forward", "in-first-step"])
def test_lm_radius_finds_a_padding_mask_passed_positionally(monkeypatch, sharded: bool) -> None:
    """``model(ids, mask)`` measures d over the real tokens, as ``model(input_ids=ids,
    attention_mask=mask)`` does (also when d is measured in ``first_step``, as for sharded
    parameters)."""
    if sharded:
        monkeypatch.setattr(tram._recording, "parameters_are_sharded", lambda model, module: True)
    batch = lm_batches(1)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = batch["labels"][:, 1:].reshape(-1)
    radii = []
    for positional in (False, True):
        model = _PositionalLM(gpt2())
        optimizer = tram.TRAM(adamw(model, 1e-2), model, trust_region="pretrained")

        def closure(model=model, optimizer=optimizer, positional=positional) -> Tensor:
            optimizer.zero_grad()
            logits = model(ids, mask) if positional else model(input_ids=ids, attention_mask=mask)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        optimizer.step(closure)  # the second step's d is positive
        radii.append(optimizer.radius_history)
    assert radii[0][1] > 0
    assert radii[1] == radii[0]


def test_lm_radius_ignores_what_padding_holds() -> None:
    radii = []
    for pad_id in (0, 57):
        model = gpt2()
        optimizer = make_tram(TASKS["gpt2"], model, "noise")
        batch = lm_batches(1, pad_id=pad_id)[0]
        optimizer.step(closure_for(TASKS["gpt2"], optimizer, model, batch))
        radii.append(optimizer.last_radius)
    assert radii[0] == pytest.approx(radii[1], rel=1e-6)


def test_lm_labels_mask_when_there_is_no_attention_mask() -> None:
    """Without attention_mask, the positions whose label is -100 are left out of d."""
    task = TASKS["gpt2"]
    model = gpt2()
    optimizer = make_tram(task, model, "noise")
    batch = lm_batches(1)[0]
    no_mask = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    reference_model = copy.deepcopy(model)
    optimizer.step(closure_for(task, optimizer, model, no_mask))
    generator = NoiseDraws(0).next()
    with torch.no_grad():
        clean = reference_model(**no_mask).logits
        z = torch.randn(task.embedding_shape(batch), generator=generator) * SIGMA
        embeds = reference_model.get_input_embeddings()(batch["input_ids"]) + z
        noised = reference_model(inputs_embeds=embeds, labels=batch["labels"]).logits
    expected = mean_forward_kl(noised, clean, batch["labels"] != -100)
    assert optimizer.last_radius == pytest.approx(float(expected), rel=1e-5)


# ============================================================================= dropout
@pytest.mark.parametrize("make_model", [bert, gpt2], ids=["bert", "gpt2"])
def test_sigma_zero_gives_exactly_zero_radius_with_dropout(make_model: Callable) -> None:
    task = TASKS["bert" if make_model is bert else "gpt2"]
    model = make_model(dropout=0.1)
    run = library_tram(task, "noise", model=model, sigma=0.0)
    assert run.radii == [0.0] * STEPS


def test_previous_at_the_first_step_is_exactly_zero_with_dropout() -> None:
    run = library_tram(TASKS["bert"], "previous", model=bert(dropout=0.1))
    assert run.radii[0] == 0.0
    assert min(run.radii[1:]) > 0.0


def test_without_replay_dropout_counts_in_d() -> None:
    """replay_dropout=False is the paper's behaviour: fresh masks, so d > 0 even for σ = 0."""
    run = library_tram(
        TASKS["bert"], "noise", model=bert(dropout=0.1), sigma=0.0, replay_dropout=False
    )
    assert min(run.radii) > 1e-4


@pytest.mark.parametrize("sigma", [0.0, SIGMA])
def test_reference_forward_leaves_the_training_rng_stream_alone(sigma: float) -> None:
    """A TRAM step draws from the global RNG exactly what a SAM step with the same closure does.

    Both run the closure twice; the reference forward of TRAM replays the first pass's dropout
    under a forked RNG and draws its noise from its own generator, so the global stream after
    the step (and with it every later dropout mask) is the same as SAM's.
    """
    task = TASKS["bert"]
    batch = classification_batches(1)[0]
    states = {}
    for name in ("sam", "tram", "tram_no_replay"):
        model = bert(dropout=0.1)
        base = adamw(model, task.lr)
        if name == "sam":
            optimizer: Any = tram.SAM(base, rho=0.05)
        else:
            replay = name == "tram"
            optimizer = tram.TRAM(base, model, sigma=sigma, replay_dropout=replay)
        torch.manual_seed(1234)
        optimizer.step(closure_for(task, optimizer, model, batch))
        states[name] = torch.get_rng_state()
    assert torch.equal(states["tram"], states["sam"])
    assert not torch.equal(states["tram_no_replay"], states["sam"])


def test_sigma_zero_with_dropout_is_sam_with_zero_radius_bit_for_bit() -> None:
    """d = 0 exactly and the second pass sees SAM's dropout masks: the same weights, bitwise."""
    task = TASKS["bert"]
    models = {}
    for name in ("sam", "tram"):
        model = bert(dropout=0.1)
        base = adamw(model, task.lr)
        if name == "sam":
            optimizer: Any = tram.SAM(base, rho=0.0)
        else:
            optimizer = tram.TRAM(base, model, sigma=0.0)
        torch.manual_seed(99)
        for batch in task.batches(STEPS):
            optimizer.step(closure_for(task, optimizer, model, batch))
        models[name] = model
    assert_same_params(models["tram"], models["sam"], exact=True)


# ============================================================================= batch and hooks
@pytest.mark.parametrize(
    ("task_name", "trust_region"),
    [("bert", "noise"), ("bert", "pretrained"), ("bert", "fisher"), ("gpt2", "noise")],
)
def test_caller_batch_is_unchanged(task_name: str, trust_region: str) -> None:
    task = TASKS[task_name]
    model = task.make_model()
    optimizer = make_tram(task, model, trust_region)
    batch = task.batches(1)[0]
    keys = list(batch)
    tensors = {k: v for k, v in batch.items()}
    values = {k: v.clone() for k, v in batch.items()}
    optimizer.step(closure_for(task, optimizer, model, batch))
    assert list(batch) == keys
    for key in keys:
        assert batch[key] is tensors[key]
        assert torch.equal(batch[key], values[key])
        assert not batch[key].requires_grad


@pytest.mark.parametrize("trust_region", VARIANTS)
def test_no_hooks_remain_after_a_step(trust_region: str) -> None:
    for task in (TASKS["plain"], TASKS["bert"]):
        model = task.make_model()
        before = hook_count(model)
        run = library_tram(task, trust_region, steps=1, model=model)
        assert hook_count(run.model) == before


class RaisesWithoutGrad(Plain):
    """Fails in any forward run without gradients: TRAM's reference forward."""

    def forward(self, ids: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            raise RuntimeError("reference forward failed")
        return super().forward(ids)


@pytest.mark.parametrize(
    ("trust_region", "where"),
    [
        (trust_region, where)
        for trust_region in VARIANTS
        for where in ("pass 1", "pass 2", "first_step")
        if not (trust_region == "fisher" and where == "first_step")  # no reference forward
    ],
)
def test_no_hooks_remain_after_an_exception(trust_region: str, where: str) -> None:
    task = TASKS["plain"]
    model = RaisesWithoutGrad() if where == "first_step" else task.make_model()
    before_hooks = hook_count(model)
    optimizer = make_tram(task, model, trust_region)
    ids, y = task.batches(1)[0]
    weights = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        optimizer.zero_grad()
        logits = model(ids)
        if (where == "pass 1" and len(calls) == 1) or (where == "pass 2" and len(calls) == 2):
            raise RuntimeError(f"failed in {where}")
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="failed"):
        optimizer.step(closure)
    assert hook_count(model) == before_hooks
    assert not optimizer.is_perturbed
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)


class FailsOnce(Plain):
    """Its next forward without gradients (TRAM's reference forward) raises, once."""

    fail_reference = False

    def forward(self, ids: Tensor) -> Tensor:
        if self.fail_reference and not torch.is_grad_enabled():
            self.fail_reference = False
            raise RuntimeError("reference forward failed")
        return super().forward(ids)


@pytest.mark.parametrize("trust_region", ["noise", "pretrained"])
@pytest.mark.parametrize("where", ["pass 1", "first_step"])
def test_a_failed_step_leaves_nothing_behind_for_the_next(trust_region: str, where: str) -> None:
    """After a step that raised, the next step measures d on its own batch only."""
    task = TASKS["plain"]
    batches = task.batches(2)
    radii = []
    for fail in (False, True):
        model = FailsOnce()
        optimizer = make_tram(task, model, trust_region)
        with torch.no_grad():  # so that θ0 differs from θ
            model.head.weight.mul_(1.5)
        if fail:
            ids, y = batches[1]

            def failing(optimizer=optimizer, model=model, ids=ids, y=y) -> Tensor:
                optimizer.zero_grad()
                logits = model(ids)
                if where == "pass 1":
                    raise RuntimeError("failed after the forward")
                loss = F.cross_entropy(logits, y)
                loss.backward()
                return loss

            model.fail_reference = where == "first_step"
            with pytest.raises(RuntimeError, match="failed"):
                optimizer.step(failing)
        optimizer.step(closure_for(task, optimizer, model, batches[0]))
        radii.append(optimizer.last_radius)
    assert radii[1] == radii[0]


# ============================================================================= resume
def _checkpoint(model: nn.Module, optimizer: tram.TRAM) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("trust_region", VARIANTS)
def test_resume_is_bit_exact(trust_region: str) -> None:
    task = TASKS["bert"]
    batches = task.batches(6)
    straight = library_tram(task, trust_region, steps=6)

    first = library_tram(task, trust_region, steps=3)
    checkpoint = _checkpoint(first.model, first.optimizer)
    # A fresh model and optimizer, built from other weights: θ0 must come from the checkpoint.
    model = bert(seed=7)
    optimizer = make_tram(task, model, trust_region)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert optimizer.steps == 3
    for batch in batches[3:]:
        optimizer.step(closure_for(task, optimizer, model, batch))

    assert_same_params(model, straight.model, exact=True)
    assert optimizer.radius_history == straight.radii[3:]
    for p, q in zip(model.parameters(), straight.model.parameters()):
        assert set(optimizer.state[p]) == set(straight.optimizer.state[q])
        for key, value in straight.optimizer.state[q].items():
            assert torch.equal(torch.as_tensor(optimizer.state[p][key]), torch.as_tensor(value))
    resumed_target = optimizer.state_dict()["param_groups"][0]["tram"]
    straight_target = straight.optimizer.state_dict()["param_groups"][0]["tram"]
    if "noise_draws" in straight_target:  # the noise targets
        assert resumed_target["noise_draws"] == straight_target["noise_draws"] == len(batches)
    if optimizer.reference is not None:
        for name, tensor in straight.optimizer.reference.tensors.items():
            assert torch.equal(optimizer.reference.tensors[name], tensor), name


def _gradually_unfrozen(
    trust_region: str, *, built_trainable: bool, unfrozen_at: int, steps: int
) -> Run:
    """TRAM on the BERT task, its classifier frozen until step ``unfrozen_at``; TRAM is built
    with the classifier trainable or frozen."""
    task = TASKS["bert"]
    model = task.make_model()
    model.classifier.requires_grad_(built_trainable)
    optimizer = make_tram(task, model, trust_region)
    model.classifier.requires_grad_(False)
    for step, batch in enumerate(task.batches(steps)):
        if step == unfrozen_at:
            model.classifier.requires_grad_(True)
        optimizer.step(closure_for(task, optimizer, model, batch))
    return Run(model, list(optimizer.radius_history), optimizer)


@pytest.mark.parametrize("trust_region", ["pretrained", "previous", "ema"])
@pytest.mark.parametrize("unfrozen_at", [0, 2])
def test_a_parameter_unfrozen_later_is_part_of_the_reference(
    trust_region: str, unfrozen_at: int
) -> None:
    """Gradual unfreezing: a parameter frozen when TRAM was built is copied into the reference
    before its first update, so the run equals one whose TRAM was built with it trainable (a
    frozen parameter never moves, so that copy held the same value all along)."""
    expected = _gradually_unfrozen(
        trust_region, built_trainable=True, unfrozen_at=unfrozen_at, steps=5
    )
    run = _gradually_unfrozen(trust_region, built_trainable=False, unfrozen_at=unfrozen_at, steps=5)
    assert_same_params(run.model, expected.model, exact=True)
    assert run.optimizer.radius_history == expected.optimizer.radius_history
    assert run.optimizer.reference is not None
    assert "classifier.weight" in run.optimizer.reference.tensors


@pytest.mark.parametrize("trust_region", ["pretrained", "previous", "ema"])
def test_a_checkpoint_after_unfreezing_resumes_into_a_tram_built_before(trust_region: str) -> None:
    """A resumed script that builds TRAM with the classifier frozen, as the run started, then
    loads a checkpoint taken after the classifier was unfrozen: the checkpoint's copy of it is
    taken, and the resumed run equals the uninterrupted one."""
    task = TASKS["bert"]
    straight = _gradually_unfrozen(trust_region, built_trainable=False, unfrozen_at=1, steps=5)
    first = _gradually_unfrozen(trust_region, built_trainable=False, unfrozen_at=1, steps=3)
    checkpoint = _checkpoint(first.model, first.optimizer)
    model = bert(seed=7)
    model.classifier.requires_grad_(False)
    optimizer = make_tram(task, model, trust_region)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    model.classifier.requires_grad_(True)
    for batch in task.batches(5)[3:]:
        optimizer.step(closure_for(task, optimizer, model, batch))
    assert_same_params(model, straight.model, exact=True)
    assert optimizer.radius_history == straight.optimizer.radius_history[3:]


@pytest.mark.parametrize("trust_region", VARIANTS)
@pytest.mark.parametrize("regularizer", ["r3f", "trpo"])
def test_a_regularizer_inside_the_first_pass_is_not_the_training_forward(
    trust_region: str, regularizer: str
) -> None:
    """R3F's noised forward and TRPO's reference forward run the model again. Called inside
    ``first_pass()`` (as in a ``step(closure)`` whose closure adds the penalty), they are
    neither recorded for d nor noised by TRAM-Fisher: the run equals the one that calls the
    regularizer after leaving ``first_pass()``."""
    task = TASKS["bert"]

    def run(inside: bool) -> Run:
        model = task.make_model()
        optimizer = make_tram(task, model, trust_region)
        penalty = (
            tram.R3F(sigma=0.2, weight=0.3, seed=5)
            if regularizer == "r3f"
            else tram.TRPO(model, weight=0.3)
        )
        for batch in task.batches(3):
            optimizer.zero_grad()
            with optimizer.first_pass():
                output = model(**batch)
                loss = output.loss + (penalty(model, batch, output.logits) if inside else 0.0)
            if not inside:
                loss = loss + penalty(model, batch, output.logits)
            loss.backward()
            if optimizer.first_step():
                output = model(**batch)
                (output.loss + penalty(model, batch, output.logits)).backward()
            optimizer.second_step()
            penalty.after_step(model)
        return Run(model, list(optimizer.radius_history), optimizer)

    inside, outside = run(inside=True), run(inside=False)
    assert_same_params(inside.model, outside.model, exact=True)
    assert inside.radii == outside.radii


def test_checkpoint_holds_the_count_of_noise_draws_and_the_reference_weights() -> None:
    task = TASKS["plain"]
    noise = library_tram(task, "noise", steps=3).optimizer.state_dict()["param_groups"][0]["tram"]
    assert set(noise) == {
        "steps",
        "skipped_ascents",
        "skipped_steps",
        "target",
        "noise_draws",
        "noise_seed",
        "base_steps",  # the base optimizer's step count, which tells a stale entry
    }
    assert noise["base_steps"] == 3
    assert noise["target"] == "noise"
    assert noise["noise_draws"] == 3  # one reference forward a step
    previous = library_tram(task, "previous", steps=2)
    state = previous.optimizer.state_dict()["param_groups"][0]["tram"]
    assert set(state["reference"]) == {"embed.weight", "head.weight", "head.bias"}
    # θt−1 is saved, not θt.
    assert not torch.equal(state["reference"]["head.weight"], previous.model.head.weight)


# ============================================================================= options
class NanWithoutGrad(Plain):
    """Returns NaN only in forwards without gradients, i.e. in TRAM's reference forward."""

    def forward(self, ids: Tensor) -> Tensor:
        out = super().forward(ids)
        return out if torch.is_grad_enabled() else out * math.nan


@pytest.mark.parametrize("how", ["logits_fn", "model"])
def test_non_finite_radius_skips_the_ascent(how: str) -> None:
    task = TASKS["plain"]
    if how == "logits_fn":
        model = task.make_model()

        def logits_fn(output: Tensor) -> Tensor:
            return output if torch.is_grad_enabled() else output * math.nan

        optimizer = make_tram(task, model, "noise", logits_fn=logits_fn)
    else:
        model = NanWithoutGrad()
        optimizer = make_tram(task, model, "pretrained")
    plain = task.make_model()
    plain.load_state_dict(model.state_dict())
    base = adamw(plain, task.lr)
    batch = task.batches(1)[0]
    calls = []
    closure = closure_for(task, optimizer, model, batch)

    def counted() -> Tensor:
        calls.append(1)
        return closure()

    with pytest.warns(RuntimeWarning, match="radius is not finite"):
        optimizer.step(counted)
    assert calls == [1]
    assert optimizer.skipped_ascents == 1
    assert optimizer.radius_history == []
    assert optimizer.state_dict()["param_groups"][0]["tram"]["skipped_ascents"] == 1
    # The step was a plain base step with the first pass's gradient.
    base.step(closure_for(task, base, plain, batch))
    assert_same_params(model, plain, exact=True)


def test_reference_dtype_bfloat16_halves_the_memory_and_keeps_d() -> None:
    task = TASKS["bert"]
    model = bert()
    radii, optimizers = {}, {}
    g = torch.Generator().manual_seed(3)
    shift = [torch.randn(p.shape, generator=g) * 0.1 * p.requires_grad for p in model.parameters()]
    for dtype in (None, torch.bfloat16):
        copy_ = copy.deepcopy(model)
        optimizer = make_tram(task, copy_, "pretrained", reference_dtype=dtype)
        with torch.no_grad():
            for p, s in zip(copy_.parameters(), shift):
                p.add_(s)
        optimizer.step(closure_for(task, optimizer, copy_, task.batches(1)[0]))
        radii[dtype], optimizers[dtype] = optimizer.last_radius, optimizer
    assert radii[None] > 0.02
    assert radii[torch.bfloat16] == pytest.approx(radii[None], rel=5e-2)
    full, half = optimizers[None].reference.tensors, optimizers[torch.bfloat16].reference.tensors
    assert all(t.dtype == torch.bfloat16 and t.element_size() == 2 for t in half.values())
    assert 2 * sum(t.nbytes for t in half.values()) == sum(t.nbytes for t in full.values())


def test_gradient_accumulation_radius_is_the_mean_over_micro_batches() -> None:
    """Two classification micro-batches of the same size: d is the mean of theirs."""
    task = TASKS["bert"]
    model = bert()
    reference_model = copy.deepcopy(model)
    optimizer = make_tram(task, model, "noise")
    micro = classification_batches(2, seed=11)
    closure = tram.accumulating_closure(optimizer, micro, lambda b: model(**b).loss, model=model)
    optimizer.step(closure)

    draws = NoiseDraws(0)
    per_micro = []
    with torch.no_grad():
        for batch in micro:  # one draw per recorded forward, in order
            clean, _ = task.forward(reference_model, batch)
            z = torch.randn(task.embedding_shape(batch), generator=draws.next()) * SIGMA
            noised, _ = task.forward(reference_model, batch, z)
            per_micro.append(float(mean_forward_kl(noised, clean)))
    assert optimizer.radius_history == pytest.approx([sum(per_micro) / 2], rel=1e-5)
    assert abs(per_micro[0] - per_micro[1]) > 1e-3  # the mean is not either of them


def test_gradient_accumulation_measures_the_d_of_the_whole_batch() -> None:
    """Micro-batches of one row (7 tokens) and two rows (4 + 6 tokens): d over the window is the
    mean over its 17 tokens, the d of the one batch they make, not the mean of the two
    micro-batches' d (which would weigh a token of the first three times as much)."""
    task = TASKS["gpt2"]
    batch = lm_batches(1)[0]
    micro = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]

    def radius(batches: list[dict[str, Tensor]]) -> float:
        model = gpt2()
        optimizer = make_tram(task, model, "pretrained")
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # away from θ0, so that d > 0 at the first step
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        loss = lambda b: model(**b).loss  # noqa: E731
        optimizer.step(tram.accumulating_closure(optimizer, batches, loss, model=model))
        return optimizer.last_radius

    whole, window = radius([batch]), radius(micro)
    parts = [radius([m]) for m in micro]
    assert window == pytest.approx(whole, rel=1e-5)
    assert abs(sum(parts) / 2 - whole) > 0.01 * whole


def test_ascent_every_skips_recording_and_the_second_pass() -> None:
    task = TASKS["plain"]
    model = task.make_model()
    optimizer = make_tram(task, model, "noise", ascent_every=2)
    forwards: list[bool] = []
    model.head.register_forward_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
    hooks_at_rest = hook_count(model)
    calls, hooks_seen = [], []
    for step, batch in enumerate(task.batches(4)):
        closure = closure_for(task, optimizer, model, batch)

        def counted(step: int = step, closure: Callable = closure) -> Tensor:
            calls.append(step)
            hooks_seen.append(hook_count(model) - hooks_at_rest)
            return closure()

        optimizer.step(counted)
    assert calls == [0, 0, 1, 2, 2, 3]
    # Recording hooks during the first pass of ascent steps only (none at θ+ε, none off-step).
    assert [seen > 0 for seen in hooks_seen] == [True, False, False, True, False, False]
    # Ascent steps: 2 forwards with gradient and 1 reference forward without, which runs at the
    # start of the recorded forward (its target logits exist only until d is measured at the end
    # of that forward); off-steps: 1.
    assert forwards == [False, True, True, True, False, True, True, True]
    assert len(optimizer.radius_history) == 2


# ============================================================================= bad input
def test_bad_arguments_are_rejected() -> None:
    model = Plain()

    def base() -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.1)

    with pytest.raises(
        ValueError, match=r"Invalid trust_region: 'prior'\. Expected one of: 'noise'"
    ):
        tram.TRAM(base(), model, trust_region="prior")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid sigma: -0\.1"):
        tram.TRAM(base(), model, sigma=-0.1)
    with pytest.raises(
        ValueError, match=r"Invalid noise: 'laplace'\. Expected 'gaussian' or 'uniform'"
    ):
        tram.TRAM(base(), model, noise="laplace")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, but got dict"):
        tram.TRAM(base(), {"weights": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Unknown divergence: 'kl'\. Expected one of"):
        tram.TRAM(base(), model, divergence="kl")
    with pytest.raises(ValueError, match=r"Invalid ema_decay: 1\.5"):
        tram.TRAM(base(), model, trust_region="ema", ema_decay=1.5)
    with pytest.raises(ValueError, match=r"Invalid max_radius: -1"):
        tram.TRAM(base(), model, max_radius=-1.0)


class TwoEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(VOCAB, 8)
        self.positions = nn.Embedding(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head((self.tokens(ids) + self.positions.weight[: ids.shape[1]]).mean(1))


def test_embeddings_that_cannot_be_found_must_be_named() -> None:
    model = TwoEmbeddings()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"Cannot find the input embeddings of TwoEmbeddings.*module="
    ):
        tram.TRAM(base, model, trust_region="noise")
    # Targets without noise need no embeddings.
    tram.TRAM(base, model, trust_region="pretrained")
    optimizer = tram.TRAM(base, model, trust_region="noise", embeddings="tokens")
    assert optimizer.embeddings is model.tokens
    ids, y = torch.randint(0, VOCAB, (4, 5)), torch.randint(0, 3, (4,))

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(ids), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.last_radius > 0


class DictOutput(Plain):
    def forward(self, ids: Tensor) -> Any:  # type: ignore[override]
        return {"scores": super().forward(ids)}


class TupleOutput(Plain):
    def forward(self, ids: Tensor) -> Any:  # type: ignore[override]
        return (super().forward(ids),)


@pytest.mark.parametrize("model_cls", [DictOutput, TupleOutput])
def test_output_without_logits_needs_logits_fn(model_cls: type[nn.Module]) -> None:
    model = model_cls()
    before = hook_count(model)
    ids, y = plain_batches(1)[0]

    def scores(output: Any) -> Tensor:
        return output["scores"] if isinstance(output, dict) else output[0]

    def run(optimizer: tram.TRAM) -> None:
        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(scores(model(ids)), y)
            loss.backward()
            return loss

        optimizer.step(closure)

    with pytest.raises(
        TypeError, match=r"cannot find logits in a model output of type .*logits_fn="
    ):
        run(make_tram(TASKS["plain"], model, "noise"))
    assert hook_count(model) == before
    optimizer = make_tram(TASKS["plain"], model, "noise", logits_fn=scores)
    run(optimizer)
    assert optimizer.last_radius > 0


def test_reference_logits_of_another_shape_are_rejected() -> None:
    def logits_fn(output: Tensor) -> Tensor:
        return output if torch.is_grad_enabled() else output[:, :2]

    task = TASKS["plain"]
    model = task.make_model()
    optimizer = make_tram(task, model, "pretrained", logits_fn=logits_fn)
    message = (
        r"the reference logits and the recorded logits must have the same shape, "
        r"but got \(8, 2\) and \(8, 4\)"
    )
    with pytest.raises(ValueError, match=message):
        optimizer.step(closure_for(task, optimizer, model, task.batches(1)[0]))
    assert not optimizer.is_perturbed


# ============================================================================= chunked divergence


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "symmetric_kl", "js", "l2"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_the_divergence_in_chunks_equals_the_whole(monkeypatch, name: str, masked: bool) -> None:
    from tram import _recording

    generator = torch.Generator().manual_seed(0)
    target = torch.randn(3, 7, 11, generator=generator)
    logits = torch.randn(3, 7, 11, generator=generator)
    mask = torch.rand(3, 7, generator=generator) > 0.4 if masked else None
    divergence = tram.get_divergence(name)
    whole = divergence(target, logits, mask=mask)
    monkeypatch.setattr(_recording, "_CHUNK_ELEMENTS", 11 * 4)  # 4 positions per chunk, 6 chunks
    chunked = _recording.chunked_mean_divergence(divergence, target, logits, mask)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    assert chunked.dtype == torch.float32


@pytest.mark.parametrize("chunk_positions", [4, 1000], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_in_place_forward_kl_equals_the_divergence(
    monkeypatch, chunk_positions: int, masked: bool, dtype: torch.dtype
) -> None:
    """TRAM's no-grad path for its default d gives kl_divergence's value, NaN padding ignored."""
    from tram import _recording

    generator = torch.Generator().manual_seed(3)
    target = (3 * torch.randn(3, 7, 11, generator=generator)).to(dtype)
    logits = (3 * torch.randn(3, 7, 11, generator=generator)).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(3, 7, generator=generator) > 0.4
        target[~mask] = float("nan")  # garbage in padding must not reach d
    whole = tram.get_divergence("forward_kl")(target, logits, mask=mask)
    monkeypatch.setattr(_recording, "_CHUNK_ELEMENTS", 11 * chunk_positions)
    with torch.no_grad():
        fast = _recording.chunked_mean_divergence(
            tram.get_divergence("forward_kl"), target, logits, mask, forward_kl=True
        )
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, whole, rtol=1e-6, atol=1e-7)


def test_forward_kl_rows_is_the_per_row_kl() -> None:
    from tram.divergence import forward_kl_rows

    generator = torch.Generator().manual_seed(4)
    target = torch.randn(5, 9, generator=generator)
    logits = torch.randn(5, 9, generator=generator, requires_grad=True)
    rows = forward_kl_rows(target, logits)
    p = target.double().softmax(-1)
    expected = (p * (p.log() - logits.detach().double().log_softmax(-1))).sum(-1)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-7)
    assert not rows.requires_grad  # no graph: it is only used where no gradient is needed
    same = forward_kl_rows(target, target)
    torch.testing.assert_close(same, torch.zeros(5), rtol=0, atol=1e-6)
