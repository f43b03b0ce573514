"""The seeded noise stream of TRAM-x, TRAM-Fisher and R3F (``tram/_noise_stream.py``).

Draw k of rank r is seeded with h(h(h(seed) ^ r) ^ k), h the SplitMix64 finaliser; the state is
the count of draws. The reference loops of ``test_tram``, ``test_regularizers`` and
``test_tram_distributed`` check that the wrappers draw that stream, on one rank and on two; here
are the derivation itself, the count and its checkpoint, and what bad state gets.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import tram
from tests.helpers import NoiseDraws, cross_entropy_closure
from tram import _noise_stream
from tram._noise_stream import NoiseStream, draw_seed
from tram.targets import NoisedInputs


class Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


IDS = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))


def noised_embeddings(target: NoisedInputs) -> torch.Tensor:
    """The noise the target adds on its next reference forward."""
    seen: list[torch.Tensor] = []
    with target.noised():  # its hook first, so the one below sees the noised output
        hook = target.embeddings.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            target.model(IDS)
        finally:
            hook.remove()
    return (seen[0] - target.embeddings(IDS)).detach()


def bound_target(seed: int = 5) -> NoisedInputs:
    target = NoisedInputs(sigma=0.3, seed=seed)
    target.bind(Embedded())
    return target


# ----------------------------------------------------------------------------- the derivation
def test_the_mixing_function_is_splitmix64() -> None:
    # The first output of SplitMix64 seeded with 0 (Steele, Lea and Flood 2014; the value its
    # published implementations print).
    assert _noise_stream._splitmix64(0) == 0xE220A8397B1DCDAF


def test_draw_seeds_are_pinned() -> None:
    """The derivation is part of every run's reproducibility: a change must be deliberate."""
    assert draw_seed(0, rank=0, draw=0) == 0x238275BC38FCBE91
    assert draw_seed(0, rank=1, draw=0) == 0x44E5B98100C67FB0
    assert draw_seed(0, rank=0, draw=1) == 0x2F32A78496C67C60
    assert draw_seed(7, rank=3, draw=11) == 0x6FC9F6DC4FDD3C43
    assert draw_seed(-1, rank=0, draw=0) == draw_seed(2**64 - 1, rank=0, draw=0)


def test_draw_seeds_differ_across_ranks_draws_and_seeds_even_in_their_low_32_bits() -> None:
    """The CPU generator keeps a seed's low 32 bits: those too are distinct here."""
    seeds = [draw_seed(s, rank=r, draw=k) for s in (0, 1, 42) for r in range(8) for k in range(64)]
    assert len(set(seeds)) == len(seeds)
    assert len({s & 0xFFFFFFFF for s in seeds}) == len(seeds)
    assert all(0 <= s < 2**64 for s in seeds)


# ----------------------------------------------------------------------------- the stream
def test_each_draw_is_its_own_seeded_generator_and_is_counted() -> None:
    stream = NoiseStream(9)
    draws = NoiseDraws(9)
    for k in range(3):
        assert torch.equal(
            torch.randn(5, generator=stream.next_generator("cpu")),
            torch.randn(5, generator=draws.next()),
        )
        assert stream.draws == k + 1


def test_a_draw_is_a_forward_however_the_forwards_are_grouped_in_blocks() -> None:
    """Two forwards in one ``with`` block (tram.accumulating_closure's first pass) and in two
    (a Trainer's accumulation loop) draw the same noise: draws 0 and 1 of the stream."""
    model = Embedded()
    seen: list[torch.Tensor] = []

    def run(blocks: list[int]) -> list[torch.Tensor]:
        stream = NoiseStream(3)
        seen.clear()
        for forwards in blocks:
            with tram.noise.representation_noise(model, sigma=0.2, generator=stream):
                hook = model.embed.register_forward_hook(lambda m, a, out: seen.append(out))
                try:
                    for _ in range(forwards):
                        model(IDS)
                finally:
                    hook.remove()
        assert stream.draws == sum(blocks)
        return [(out - model.embed(IDS)).detach() for out in seen]

    together, apart = run([2]), run([1, 1])
    draws = NoiseDraws(3)
    for one, other in zip(together, apart, strict=True):
        expected = torch.randn(one.shape, generator=draws.next()) * 0.2
        torch.testing.assert_close(one, expected, rtol=0, atol=1e-6)
        assert torch.equal(one, other)
    assert not torch.allclose(together[0], together[1])


def test_sigma_zero_draws_nothing() -> None:
    model, stream = Embedded(), NoiseStream(3)
    with tram.noise.representation_noise(model, sigma=0.0, generator=stream) as handle:
        model(IDS)
    assert handle.calls == 1
    assert stream.draws == 0


def test_the_rank_of_the_default_process_group_picks_the_stream(monkeypatch: Any) -> None:
    """Here without a process group (rank 0), then as rank 2 would draw; the two-rank runs of
    ``test_tram_distributed`` check it under a real gloo group."""
    target = bound_target()
    rank0 = noised_embeddings(target)
    monkeypatch.setattr(_noise_stream, "data_parallel_rank", lambda: 2)
    rank2 = noised_embeddings(target)
    expected0 = torch.randn(rank0.shape, generator=NoiseDraws(5, rank=0).next()) * 0.3
    rank2_draws = NoiseDraws(5, rank=2)
    rank2_draws.next()  # the second draw of the stream
    expected2 = torch.randn(rank2.shape, generator=rank2_draws.next()) * 0.3
    torch.testing.assert_close(rank0, expected0, rtol=0, atol=1e-6)
    torch.testing.assert_close(rank2, expected2, rtol=0, atol=1e-6)


def test_a_resume_from_the_count_draws_what_the_uninterrupted_stream_draws() -> None:
    straight = bound_target()
    drawn = [noised_embeddings(straight) for _ in range(4)]
    first = bound_target()
    for _ in range(2):
        noised_embeddings(first)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == {"noise_draws": 2, "noise_seed": 5}
    resumed = bound_target()
    resumed.load_state_dict(state)
    for expected in drawn[2:]:
        assert torch.equal(noised_embeddings(resumed), expected)
    # A fresh stream draws the first noise again, not the third.
    assert not torch.allclose(noised_embeddings(bound_target()), drawn[2])


@pytest.mark.parametrize("built", ["with another seed", "with the seed left out"])
def test_a_resume_continues_the_checkpoints_seed(built: str) -> None:
    """The checkpoint's seed wins over the resumed stream's own, as a loaded optimizer state
    dict's hyperparameters do: a resumed run whose seed was left out, in a process seeded
    otherwise (or not at all), still continues the checkpointed noise."""
    straight = bound_target(seed=5)
    drawn = [noised_embeddings(straight) for _ in range(3)]
    first = bound_target(seed=5)
    noised_embeddings(first)
    state = first.state_dict()
    torch.manual_seed(1913)
    resumed = NoisedInputs(sigma=0.3, seed=8 if built == "with another seed" else None)
    resumed.bind(Embedded())
    assert resumed.seed == (8 if built == "with another seed" else 1913)
    resumed.load_state_dict(state)
    assert resumed.seed == 5
    for expected in drawn[1:]:
        assert torch.equal(noised_embeddings(resumed), expected)


# ----------------------------------------------------------------------------- the default seed
def defaulted_target(manual_seed: int) -> tuple[NoisedInputs, torch.Tensor]:
    """A target built with its seed left out after ``torch.manual_seed(manual_seed)``, and the
    global generator's next draw after it was built."""
    torch.manual_seed(manual_seed)
    target = NoisedInputs(sigma=0.3)
    after = torch.rand(3)
    target.bind(Embedded())
    return target, after


def test_the_default_seed_follows_torch_manual_seed_without_drawing_from_it() -> None:
    """Left out, the seed is torch.initial_seed(). Before, it was 0: a multi-seed study that did
    not pass seed= gave every run the same noise, and its runs spread less than they should."""
    target, after = defaulted_target(2027)
    alike, _ = defaulted_target(2027)
    other, _ = defaulted_target(31)
    torch.manual_seed(2027)
    assert torch.equal(after, torch.rand(3))  # building it drew nothing
    assert (target.seed, other.seed) == (2027, 31)
    noise = noised_embeddings(target)
    expected = torch.randn(noise.shape, generator=NoiseDraws(2027).next()) * 0.3
    torch.testing.assert_close(noise, expected, rtol=0, atol=1e-6)
    assert torch.equal(noised_embeddings(alike), noise)
    assert not torch.allclose(noised_embeddings(other), noise)


@pytest.mark.parametrize("writer", ["torch.save", "torch.distributed.checkpoint"])
def test_a_64_bit_default_seed_survives_the_checkpoint(writer: str, tmp_path: Any) -> None:
    """An unseeded process's torch.initial_seed() is a random 64-bit integer, half the time
    above int64's range; it goes through a weights-only torch.load and through
    torch.distributed.checkpoint's save and load unchanged."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(2**64 - 59)
    saved = NoiseStream()
    saved.draws = 3
    state = {"stream": saved.state_dict()}
    if writer == "torch.save":
        torch.save(state, tmp_path / "stream.pt")
        loaded = torch.load(tmp_path / "stream.pt", weights_only=True)
    else:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=tmp_path)
            loaded = {"stream": NoiseStream(1).state_dict()}
            dcp.load(loaded, checkpoint_id=tmp_path)
    resumed = NoiseStream(1)
    resumed.load_state_dict(loaded["stream"])
    assert (resumed.seed, resumed.draws) == (2**64 - 59, 3)


@pytest.mark.parametrize("trust_region", ["noise", "fisher"])
def test_tram_x_and_tram_fisher_take_the_default_seed(trust_region: str) -> None:
    model = Embedded()
    torch.manual_seed(4099)
    optimizer = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, trust_region=trust_region
    )
    optimizer.step(cross_entropy_closure(optimizer, model, IDS, torch.tensor([0, 1, 2, 0])))
    assert optimizer.state_dict()["param_groups"][0]["tram"]["noise_seed"] == 4099


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda t: pickle.loads(pickle.dumps(t))])
def test_a_copy_continues_the_stream(copier: Any) -> None:
    target = bound_target()
    noised_embeddings(target)
    duplicate = copier(target)
    assert duplicate.stream.draws == 1
    assert torch.equal(noised_embeddings(duplicate), noised_embeddings(target))


@pytest.mark.parametrize("trust_region", ["noise", "fisher"])
def test_tram_x_and_tram_fisher_checkpoints_carry_the_count(trust_region: str) -> None:
    model = Embedded()
    optimizer = tram.TRAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, trust_region=trust_region
    )
    closure = cross_entropy_closure(optimizer, model, IDS, torch.tensor([0, 1, 2, 0]))
    for _ in range(3):
        optimizer.step(closure)
    assert optimizer.state_dict()["param_groups"][0]["tram"]["noise_draws"] == 3


# ----------------------------------------------------------------------------- bad input
def test_a_generator_state_from_an_earlier_version_is_refused_with_the_fix() -> None:
    target = bound_target()
    legacy = {"generator": torch.Generator().manual_seed(5).get_state()}
    with pytest.raises(ValueError, match=r"no 'noise_draws'.*advanced one noise generator"):
        target.load_state_dict(legacy)
    target.load_state_dict({**legacy, "noise_draws": 0})  # the fix the message gives
    assert target.stream.draws == 0
    assert target.seed == 5  # the state held no seed; the one given stays
    with pytest.raises(ValueError, match=r"no 'noise_draws'\. Its keys are \['draws'\]"):
        target.load_state_dict({"draws": 3})


def test_a_state_without_a_seed_needs_the_seed_given() -> None:
    """A checkpoint saved before the seed was checkpointed holds the count alone; its run's seed
    was the one given, else 0 (the default then). A stream whose seed was left out cannot tell
    which, and refuses it, unchanged; one given its seed continues it."""
    legacy = {"noise_draws": 2}
    torch.manual_seed(2027)
    stream = NoiseStream()
    with pytest.raises(ValueError, match=r"no 'noise_seed'.*seed=0 if it gave none"):
        stream.load_state_dict(legacy)
    assert (stream.seed, stream.draws) == (2027, 0)
    given = bound_target(seed=0)
    given.load_state_dict(legacy)
    straight = bound_target(seed=0)
    drawn = [noised_embeddings(straight) for _ in range(3)]
    assert torch.equal(noised_embeddings(given), drawn[2])


def test_a_tram_checkpoint_without_a_seed_continues_in_a_tram_given_one() -> None:
    labels = torch.tensor([0, 1, 2, 0])

    def build() -> tuple[nn.Module, tram.TwoPassOptimizer]:
        model = Embedded()
        return model, tram.TRAM(torch.optim.SGD(model.parameters(), lr=0.1), model, seed=0)

    model, straight = build()
    radii = []
    for _ in range(3):
        straight.step(cross_entropy_closure(straight, model, IDS, labels))
        radii.append(straight.last_radius)
    model, saved = build()
    saved.step(cross_entropy_closure(saved, model, IDS, labels))
    checkpoint = saved.state_dict()
    del checkpoint["param_groups"][0]["tram"]["noise_seed"]
    weights = copy.deepcopy(model.state_dict())
    model, resumed = build()
    model.load_state_dict(weights)
    resumed.load_state_dict(checkpoint)
    for expected in radii[1:]:
        resumed.step(cross_entropy_closure(resumed, model, IDS, labels))
        assert resumed.last_radius == expected


@pytest.mark.parametrize("seed", [1.5, "3", True, None, torch.tensor([6, 7])])
def test_an_invalid_checkpointed_seed_is_refused(seed: Any) -> None:
    stream = NoiseStream(6)
    with pytest.raises(ValueError, match=r"noise_seed must be an int, got"):
        stream.load_state_dict({"noise_draws": 1, "noise_seed": seed})
    assert (stream.seed, stream.draws) == (6, 0)
    stream.load_state_dict({"noise_draws": 1, "noise_seed": torch.tensor(9)})
    assert (stream.seed, stream.draws) == (9, 1)


@pytest.mark.parametrize("draws", [-1, 1.5, True, "3", torch.tensor([4, 5]), torch.tensor(2.5)])
def test_an_invalid_count_is_refused(draws: Any) -> None:
    with pytest.raises(ValueError, match=r"noise_draws must be an int >= 0, got"):
        NoiseStream(0).load_state_dict({"noise_draws": draws})


def test_a_count_given_as_a_tensor_loads() -> None:
    stream = NoiseStream(0)
    stream.load_state_dict({"noise_draws": torch.tensor(4)})
    assert stream.draws == 4


@pytest.mark.parametrize("seed", [1.0, "0", True])
def test_a_seed_that_is_not_an_int_is_refused(seed: Any) -> None:
    with pytest.raises(TypeError, match=r"seed must be an int or None, but got"):
        NoiseStream(seed)
    with pytest.raises(TypeError, match=r"seed must be an int or None, but got"):
        NoisedInputs(seed=seed)
