"""Tests for tram.divergence: references, invariants, masks, precision, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tram.divergence import (
    DIVERGENCES,
    forward_kl_rows,
    get_divergence,
    js_divergence,
    kl_divergence,
    l2_distance,
    mmd,
    token_mask,
)

SHAPES = [(4, 5), (2, 3, 7)]  # classification [B, C] and language model [B, T, V]
ALL = [get_divergence(name) for name in DIVERGENCES]
SYMMETRIC = ["symmetric_kl", "js", "l2", "mmd"]
LOG2 = math.log(2.0)


def _pair(shape: tuple[int, ...], seed: int = 0, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(shape, generator=g),
        scale * torch.randn(shape, generator=g),
    )


def _reference_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) per position with torch's kl_div, then the mean over positions."""
    per_element = F.kl_div(
        F.log_softmax(q_logits.double(), dim=-1),
        F.log_softmax(p_logits.double(), dim=-1),
        reduction="none",
        log_target=True,
    )
    return per_element.sum(-1).mean()


def _mmd_one_hot(x: list[int], y: list[int], num_classes: int = 3) -> tuple[Tensor, Tensor]:
    """Logits whose softmax is exactly the one-hot vector of each listed class."""
    big = 1e4
    return (
        F.one_hot(torch.tensor(x), num_classes).float() * 2 * big - big,
        F.one_hot(torch.tensor(y), num_classes).float() * 2 * big - big,
    )


# ----------------------------------------------------------------------------- KL references


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_kl_matches_torch_kl_div(shape: tuple[int, ...]) -> None:
    target, current = _pair(shape)
    expected = _reference_kl(target, current)
    got = kl_divergence(target, current)
    assert got.shape == ()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # The default direction is forward, and the registry agrees.
    torch.testing.assert_close(get_divergence("forward_kl")(target, current), got)


@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_and_symmetric_kl_match_torch_kl_div(shape: tuple[int, ...]) -> None:
    target, current = _pair(shape, seed=1)
    forward = _reference_kl(target, current)
    reverse = _reference_kl(current, target)
    got_reverse = kl_divergence(target, current, direction="reverse")
    got_symmetric = kl_divergence(target, current, direction="symmetric")
    torch.testing.assert_close(got_reverse.double(), reverse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_symmetric.double(), forward + reverse, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(forward, reverse)  # the directions really differ on this input
    torch.testing.assert_close(get_divergence("reverse_kl")(target, current), got_reverse)
    torch.testing.assert_close(get_divergence("symmetric_kl")(target, current), got_symmetric)


def test_kl_is_a_per_example_mean_not_a_sum() -> None:
    target, current = _pair((3, 4), seed=2)
    single = kl_divergence(target[:1], current[:1])
    repeated = kl_divergence(target[:1].expand(5, 4), current[:1].expand(5, 4))
    torch.testing.assert_close(repeated, single)


def test_js_and_l2_match_hand_computation() -> None:
    target, current = _pair((2, 3, 6), seed=3)
    p, q = target.double().softmax(-1), current.double().softmax(-1)
    m = 0.5 * (p + q)
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(js_divergence(target, current).double(), js.mean())
    l2 = (p - q).pow(2).sum(-1).sqrt().mean()
    torch.testing.assert_close(l2_distance(target, current).double(), l2)


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_for_identical_logits(fn, shape: tuple[int, ...]) -> None:
    target, _ = _pair(shape, seed=4)
    assert abs(fn(target, target.clone()).item()) < 1e-7


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
@pytest.mark.parametrize("seed", range(5))
def test_non_negative_and_positive_on_random_inputs(fn, seed: int) -> None:
    target, current = _pair((3, 4, 5), seed=seed)
    assert fn(target, current).item() > 1e-4


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_under_swapping(name: str) -> None:
    fn = get_divergence(name)
    target, current = _pair((3, 4, 5), seed=5)
    torch.testing.assert_close(fn(target, current), fn(current, target))


def test_forward_and_reverse_swap_into_each_other() -> None:
    target, current = _pair((4, 6), seed=6)
    torch.testing.assert_close(
        kl_divergence(target, current, direction="forward"),
        kl_divergence(current, target, direction="reverse"),
    )


def test_invariant_to_a_constant_shift_of_logits() -> None:
    target, current = _pair((2, 3, 5), seed=7)
    for fn in ALL:
        torch.testing.assert_close(fn(target, current), fn(target + 3.0, current - 7.0))


def test_js_bounded_by_log2_and_finite_with_extreme_logits() -> None:
    # Disjoint one-hot distributions reach the bound; probabilities underflow to exactly 0.
    target = torch.tensor([[1e4, -1e4, -1e4], [-1e4, 1e4, -1e4]])
    current = torch.tensor([[-1e4, 1e4, -1e4], [-1e4, -1e4, 1e4]])
    value = js_divergence(target, current)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, torch.tensor(LOG2))
    for seed in range(5):
        a, b = _pair((3, 4, 8), seed=seed, scale=1e4)
        assert 0.0 <= js_divergence(a, b).item() <= LOG2 + 1e-6


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_extreme_logits_give_finite_values_and_gradients(fn) -> None:
    a, b = _pair((3, 4, 8), seed=8, scale=1e4)
    a.requires_grad_(True)
    b.requires_grad_(True)
    value = fn(a, b)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(a.grad).all()
    assert torch.isfinite(b.grad).all()


def test_minus_inf_logits_in_both_are_harmless() -> None:
    target, current = _pair((3, 5), seed=9)
    target[:, 0] = float("-inf")
    current[:, 0] = float("-inf")
    current.requires_grad_(True)
    for fn in ALL:
        value = fn(target, current)
        value.backward()
        assert torch.isfinite(value)
        assert torch.isfinite(current.grad).all()
        current.grad = None
    expected = _reference_kl(target[:, 1:], current.detach()[:, 1:])
    torch.testing.assert_close(kl_divergence(target, current).double(), expected)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_padding_garbage_does_not_change_the_value(fn) -> None:
    target, current = _pair((3, 6, 5), seed=10)
    lengths = [6, 4, 2]
    mask = torch.arange(6).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    clean = fn(target, current, mask=mask)

    garbage_target, garbage_current = target.clone(), current.clone()
    garbage_target[~mask] = float("inf")
    garbage_current[~mask] = float("nan")
    garbage_target.requires_grad_(True)
    garbage_current.requires_grad_(True)
    dirty = fn(garbage_target, garbage_current, mask=mask)
    torch.testing.assert_close(dirty, clean)
    dirty.backward()
    for grad in (garbage_target.grad, garbage_current.grad):
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()

    # ...and equals the value on the unpadded subset alone.
    subset = fn(target[mask], current[mask])
    torch.testing.assert_close(clean, subset)


def test_mask_is_a_mean_over_tokens_not_over_sequences() -> None:
    target, current = _pair((2, 4, 5), seed=11)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    per_token = F.kl_div(
        F.log_softmax(current, -1), F.log_softmax(target, -1), reduction="none", log_target=True
    ).sum(-1)
    expected = per_token[mask].sum() / 5  # 5 counted tokens, not a mean of the 2 sequence means
    torch.testing.assert_close(kl_divergence(target, current, mask=mask), expected)


def test_integer_attention_mask_is_accepted_as_mask() -> None:
    target, current = _pair((2, 4, 5), seed=12)
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(
        kl_divergence(target, current, mask=attention),
        kl_divergence(target, current, mask=attention.bool()),
    )


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_empty_mask_returns_zero_with_a_graph(fn) -> None:
    target, current = _pair((2, 3, 4), seed=13)
    current.requires_grad_(True)
    value = fn(target, current, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert value.dtype == torch.float32
    assert value.item() == 0.0
    value.backward()
    assert (current.grad == 0).all()


def test_token_mask_from_labels_and_attention_mask() -> None:
    labels = torch.tensor([[5, -100, 7, 8], [9, 3, -100, -100]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    expected = torch.tensor([[True, False, True, False], [True, True, False, False]])
    assert torch.equal(token_mask(labels=labels, attention_mask=attention), expected)
    assert torch.equal(token_mask(labels=labels), labels != -100)
    assert torch.equal(token_mask(attention_mask=attention), attention.bool())
    assert torch.equal(token_mask(labels=labels, ignore_index=7), labels != 7)
    assert token_mask() is None
    assert token_mask(labels=labels).dtype == torch.bool


def test_token_mask_shift_aligns_with_next_token_logits() -> None:
    # Row 0: right padding, prompt token masked with -100. Row 1: left padding.
    labels = torch.tensor([[-100, 11, 12, 13, -100], [-100, -100, 21, 22, 23]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    mask = token_mask(labels=labels, attention_mask=attention, shift=True)
    # logits[:, t] predicts token t + 1. Row 0: t=0..2 predict 11, 12, 13; t=3 predicts padding.
    # Row 1: t=1 is padding "predicting" 21, so it does not count; t=2, 3 predict 22, 23.
    expected = torch.tensor(
        [[True, True, True, False, False], [False, False, True, True, False]],
    )
    assert torch.equal(mask, expected)
    # Labels alone: only the labels of the next token matter.
    expected_labels_only = torch.tensor(
        [[True, True, True, False, False], [False, True, True, True, False]],
    )
    assert torch.equal(token_mask(labels=labels, shift=True), expected_labels_only)


def test_shifted_mask_on_full_logits_equals_shifted_slices() -> None:
    target, current = _pair((2, 5, 6), seed=14)
    labels = torch.tensor([[-100, 11, 12, 13, -100], [-100, -100, 21, 22, 23]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    mask = token_mask(labels=labels, attention_mask=attention, shift=True)
    # What a hand-written causal-LM loss counts: shifted logits against shifted labels,
    # from real positions only.
    sliced_mask = (labels[:, 1:] != -100) & (attention[:, 1:] != 0) & (attention[:, :-1] != 0)
    torch.testing.assert_close(
        kl_divergence(target, current, mask=mask),
        kl_divergence(target[:, :-1], current[:, :-1], mask=sliced_mask),
    )


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_half_precision_inputs_are_computed_in_fp32(dtype: torch.dtype, fn) -> None:
    target, current = _pair((3, 4, 32), seed=15)
    low_target, low_current = target.to(dtype), current.to(dtype)
    got = fn(low_target, low_current)
    assert got.dtype == torch.float32
    expected = fn(low_target.float(), low_current.float())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_autocast_does_not_lower_the_precision(fn) -> None:
    target, current = _pair((3, 4, 16), seed=16)
    expected = fn(target, current)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(target, current)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_float64_inputs_are_computed_in_fp32_too() -> None:
    target, current = _pair((4, 5), seed=17)
    assert kl_divergence(target.double(), current.double()).dtype == torch.float32


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_gradients_flow_to_both_arguments(fn) -> None:
    target, current = _pair((2, 3, 5), seed=18)
    target.requires_grad_(True)
    current.requires_grad_(True)
    fn(target, current).backward()
    for grad in (target.grad, current.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_symmetric_kl_gradient_matches_finite_differences() -> None:
    target, current = _pair((2, 4), seed=19)
    target = target.double().requires_grad_(True)
    current = current.double().requires_grad_(True)
    (g_target, g_current) = torch.autograd.grad(
        kl_divergence(target, current, direction="symmetric"), (target, current)
    )
    # The function computes in float32; a coarse central difference is enough to pin the sign
    # and scale of the gradient for each argument.
    h = 1e-2
    for arg, grad, other_first in ((target, g_target, True), (current, g_current, False)):
        e = torch.zeros_like(arg)
        e[0, 1] = h
        with torch.no_grad():
            if other_first:
                up = kl_divergence(target + e, current, direction="symmetric")
                down = kl_divergence(target - e, current, direction="symmetric")
            else:
                up = kl_divergence(target, current + e, direction="symmetric")
                down = kl_divergence(target, current - e, direction="symmetric")
        numeric = (up - down).double() / (2 * h)
        torch.testing.assert_close(grad[0, 1], numeric, rtol=1e-2, atol=1e-4)


def test_gradient_at_identical_inputs_is_finite() -> None:
    target, _ = _pair((3, 5), seed=20)
    for fn in ALL:
        current = target.clone().requires_grad_(True)
        fn(target, current).backward()
        assert torch.isfinite(current.grad).all()


# ----------------------------------------------------------------------------- MMD


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_zero_for_identical_sets_and_positive_otherwise(kernel: str) -> None:
    target, current = _pair((6, 5), seed=21)
    assert mmd(target, target.clone(), kernel=kernel).item() == 0.0
    assert mmd(target, current, kernel=kernel).item() > 1e-4
    # A permutation of the same set is the same set.
    assert abs(mmd(target, target[torch.randperm(6)], kernel=kernel).item()) < 1e-6


@pytest.mark.parametrize(
    ("kernel", "k"),
    [("imq", lambda c, d: c / (c + d)), ("rbf", lambda c, d: math.exp(-d / (2 * c)))],
)
def test_mmd_known_values_on_one_hot_sets(kernel: str, k) -> None:
    # X = {e0, e0}, Y = {e1, e1}: MMD^2 = sum_c 2 - 2 k_c(2).
    x, y = _mmd_one_hot([0, 0], [1, 1])
    bandwidths = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
    expected = sum(2 - 2 * k(c, 2.0) for c in bandwidths)
    torch.testing.assert_close(mmd(x, y, kernel=kernel), torch.tensor(expected))
    # X = {e0, e1}, Y = {e0, e0}: the mean embeddings differ by (phi(e1) - phi(e0)) / 2,
    # so MMD^2 = (1 - k(2)) / 2 for a single bandwidth.
    x, y = _mmd_one_hot([0, 1], [0, 0])
    torch.testing.assert_close(
        mmd(x, y, kernel=kernel, bandwidths=(1.0,)), torch.tensor((1 - k(1.0, 2.0)) / 2)
    )


def _float64_mmd(target: Tensor, current: Tensor, kernel: str) -> float:
    """The V-statistic in float64, from direct differences (no expanded squared distance)."""
    x, y = F.softmax(target.double(), dim=-1), F.softmax(current.double(), dim=-1)

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        squared = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
        values = [
            c / (c + squared) if kernel == "imq" else torch.exp(-squared / (2 * c))
            for c in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
        ]
        return sum(values).mean()

    return (kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)).item()


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_of_near_sets_keeps_float32_rounding_out_of_the_difference(kernel: str) -> None:
    """Each kernel mean is near 7 (the number of bandwidths) and the squared MMD of two near
    sets is about 0.002: subtracting the float32 means would leave their rounding (about 1e-6)
    in a result that small, up to 1e-3 of it. Combined pair by pair before averaging, the
    float32 value stays within 2e-4 of the float64 one on every draw (5e-5 at worst here)."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(50):
        target = 1.7 * torch.randn(32, 10, generator=generator)
        current = target + 0.1 * torch.randn(32, 10, generator=generator)
        exact = _float64_mmd(target, current, kernel)
        assert mmd(target, current, kernel=kernel).item() == pytest.approx(exact, rel=2e-4)


def test_mmd_default_kernel_is_imq() -> None:
    x, y = _mmd_one_hot([0, 1], [2, 2])
    torch.testing.assert_close(mmd(x, y), mmd(x, y, kernel="imq"))
    assert not torch.isclose(mmd(x, y), mmd(x, y, kernel="rbf"))


def test_mmd_is_set_level_not_per_position() -> None:
    # The same two sets paired differently: a per-position divergence changes, MMD does not.
    x, y = _mmd_one_hot([0, 1], [0, 1])
    y_swapped = y.flip(0)
    assert abs(mmd(x, y_swapped).item()) < 1e-6
    assert l2_distance(x, y_swapped).item() > 1.0


def test_mmd_flattens_positions_and_respects_the_mask() -> None:
    target, current = _pair((2, 3, 4), seed=22)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    torch.testing.assert_close(mmd(target, current, mask=mask), mmd(target[mask], current[mask]))
    torch.testing.assert_close(
        mmd(target, current), mmd(target.reshape(6, 4), current.reshape(6, 4))
    )


# ----------------------------------------------------------------------------- registry and errors


def test_registry_names() -> None:
    assert DIVERGENCES == ("forward_kl", "reverse_kl", "symmetric_kl", "js", "l2", "mmd")
    assert get_divergence("js") is js_divergence
    assert get_divergence("l2") is l2_distance
    assert get_divergence("mmd") is mmd


def test_unknown_divergence_lists_the_names() -> None:
    match = (
        r"^Unknown divergence: 'kl'\. Expected one of: 'forward_kl', 'reverse_kl', "
        r"'symmetric_kl', 'js', 'l2', 'mmd'$"
    )
    with pytest.raises(ValueError, match=match):
        get_divergence("kl")


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_shape_mismatch_is_rejected(fn) -> None:
    match = r"^target_logits and logits must have the same shape, but got \(2, 3\) and \(2, 4\)$"
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_one_dimensional_logits_are_rejected(fn) -> None:
    with pytest.raises(ValueError, match=r"at least 2 dimensions .*but got shape \(5,\)$"):
        fn(torch.zeros(5), torch.zeros(5))


@pytest.mark.parametrize("fn", ALL, ids=DIVERGENCES)
def test_mask_of_the_wrong_shape_is_rejected(fn) -> None:
    match = r"^mask must have shape logits.shape\[:-1\] = \(2, 3\), but got \(2, 3, 4\)$"
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.ones(2, 3, 4, dtype=torch.bool))


def test_invalid_direction_is_rejected() -> None:
    match = r"^Invalid direction: 'x'\. Expected 'forward', 'reverse' or 'symmetric'$"
    with pytest.raises(ValueError, match=match):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), direction="x")  # type: ignore[arg-type]


def test_invalid_kernel_and_bandwidths_are_rejected() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^Invalid kernel: 'gauss'\. Expected 'imq' or 'rbf'$"):
        mmd(x, x, kernel="gauss")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^Invalid bandwidths: \(1\.0, 0\.0\)\. Expected positive"
    ):
        mmd(x, x, bandwidths=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"^Invalid bandwidths: \(\)\. Expected positive"):
        mmd(x, x, bandwidths=())


def test_token_mask_errors() -> None:
    match = r"^labels and attention_mask must have the same shape, but got \(2, 3\) and \(2, 4\)$"
    with pytest.raises(ValueError, match=match):
        token_mask(labels=torch.zeros(2, 3), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"^shift=True needs a sequence dimension"):
        token_mask(labels=torch.tensor(3), shift=True)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_refuse_a_single_class(name: str) -> None:
    """One logit per row (a reward or regression head): the softmax is 1 for any logit, so every
    divergence (all compare softmax distributions) would be 0 for any weights; refused, naming
    the methods that measure none."""
    target, logits = torch.zeros(3, 1), torch.full((3, 1), 2.3)
    with pytest.raises(
        ValueError, match=r"at least 2 classes .*shape \(3, 1\).*trust_region='fisher'"
    ):
        get_divergence(name)(target, logits)
    with pytest.raises(ValueError, match="at least 2 classes"):
        forward_kl_rows(target, logits)
    two = torch.cat([target, logits], dim=-1)
    assert float(get_divergence(name)(two, two.flip(-1))) > 0
