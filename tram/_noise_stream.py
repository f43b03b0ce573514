r"""Seeded noise for TRAM-x, TRAM-Fisher and R3F: a fresh draw on every rank, exactly resumable.

Each noised forward (one call of the module that :func:`tram.noise.representation_noise` hooks,
with σ > 0: a TRAM-x reference forward, a forward of TRAM-Fisher's first pass, one R3F penalty)
is a *draw*, numbered from 0. Draw :math:`k` of the process of rank :math:`r` comes from a
generator seeded with

.. math::

    s_{k,r} = h\big(h(h(\mathrm{seed}) \oplus r) \oplus k\big),

where :math:`h` is the SplitMix64 finaliser (a bijection of 64-bit integers, Steele, Lea and
Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014) and :math:`r` is the rank in
the default ``torch.distributed`` process group (0 without one). Why seed every draw instead of
advancing one generator:

- **Every rank draws its own noise.** One generator seeded alike on every rank would add the same
  :math:`z` to every rank's shard: a data-parallel run would then have ``world_size`` times less
  noise diversity than one process on the global batch. Folding in the rank gives each shard an
  independent draw, as one process gives each example of its batch.
- **The noise does not depend on how a client groups its forwards.** A draw is one forward, so
  two micro-batches noised in one ``with`` block (``tram.accumulating_closure``) and in two
  (a Trainer's accumulation loop) draw the same noise.
- **A resume is exact on every rank from any one rank's checkpoint.** The whole state is the
  number of draws made, :math:`k`, the same on every rank (ranks draw in lockstep: each runs the
  same forwards of a step). A data-parallel checkpoint is written by rank 0 alone (Hugging Face's
  Trainer, Lightning, a hand loop's ``if rank == 0: torch.save``) and loaded on every rank; and
  ``torch.distributed.checkpoint`` keeps one copy of every replicated value, from whichever rank.
  A generator's state saved by one rank would give every rank that rank's stream after a resume;
  a count gives each rank back its own.

This assumes data parallelism (DDP, FSDP, HSDP): every process of the default group trains its
own examples. Ranks that share their inputs (tensor or pipeline parallelism) would need the same
noise, and get different draws. Under ``torch.distributed.algorithms.join.Join`` (uneven inputs)
a rank that has run out of batches draws nothing while the others go on, so its count falls
behind theirs; resumed from rank 0's checkpoint, it continues from rank 0's count: still its own
draws, unlike any other rank's, but not the ones the uninterrupted run would have drawn.

**The seed.** Given (``seed=``), it is that int. Left out, it is ``torch.initial_seed()`` when
the stream is built: the seed of ``torch.manual_seed`` (or, without one, the random seed torch
drew at start-up), read without drawing from the global generator. So runs seeded with
different ``torch.manual_seed`` draw different noise, as they draw different dropout masks and
batches, and a run seeded alike draws the same; a fixed default would give every seed of a
multi-seed study the same noise and shrink the spread between its runs. The checkpoint holds
the seed beside the count and a resume continues the checkpoint's stream, whatever this
stream's own seed (as ``load_state_dict`` restores an optimizer's hyperparameters). Ranks
seeded alike (Hugging Face's ``set_seed``, Lightning's ``seed_everything``) resume exactly from
rank 0's checkpoint; ranks seeded apart (``seed + rank``) all take rank 0's seed after a resume
and draw, each, its own noise but not the draws the uninterrupted run would have made. A
checkpoint from a tram that did not save the seed (its default was 0) is refused by a stream
whose seed was left out, and loads into one given ``seed=``.

The CPU generator (Mersenne Twister) keeps the low 32 bits of a seed (checked: seeds 5 and
2**32 + 5 draw alike), so among N draws about N**2 / 2**33 pairs share a seed: about one pair in
a run of 100,000 noised forwards over all ranks, two equal noise tensors among all of them,
which is harmless. CUDA's Philox generator takes the whole 64-bit seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["NoiseStream", "draw_seed"]

_MASK = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's output function of ``value`` (mod 2**64): a bijection that mixes every bit."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def draw_seed(seed: int, *, rank: int, draw: int) -> int:
    r"""The seed of draw ``draw`` on rank ``rank`` of a stream seeded with ``seed``:
    :math:`h(h(h(\mathrm{seed}) \oplus r) \oplus k)`, an integer in :math:`[0, 2^{64})`."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ rank) ^ draw)


def _number(value: Any) -> Any:
    """A checkpointed number as a Python number: torch.distributed.checkpoint may give back a
    one-element tensor. Anything else is returned as it is, for the caller to check."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def data_parallel_rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class NoiseStream:
    """A seeded stream of noise draws: give it as ``generator=`` to
    :func:`tram.noise.representation_noise`, and each hooked forward draws from
    :meth:`next_generator` (see the module docstring).

    Args:
        seed: the stream's seed (any Python int); by default ``torch.initial_seed()`` (see the
            module docstring).
        device: where the draws are made; by default on the hooked module's output device.
    """

    def __init__(
        self, seed: int | None = None, *, device: torch.device | str | None = None
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, but got {type(seed).__name__}")
        # Whether the seed was chosen by the caller, or by a checkpoint: only then can a
        # checkpoint without a seed be continued (see load_state_dict).
        self.seed_given = seed is not None
        self.seed = torch.initial_seed() if seed is None else seed
        self.device = None if device is None else torch.device(device)
        self.draws = 0
        self._generator: torch.Generator | None = None

    # Outside any compiled graph: dynamo would trace the count and recompile when it changes.
    # The lazy form of torch.compiler.disable, which imports dynamo at the first call, not at
    # `import tram` (as in tram/batchnorm.py).
    @torch._disable_dynamo
    def next_generator(self, device: torch.device | str) -> torch.Generator:
        """A generator seeded for the next draw (:func:`draw_seed` of this rank), on this
        stream's device, else on ``device``; counts the draw. One generator object is reseeded
        for every draw."""
        where = self.device if self.device is not None else torch.device(device)
        if self._generator is None or self._generator.device != where:
            self._generator = torch.Generator(device=where)
        seed = draw_seed(self.seed, rank=data_parallel_rank(), draw=self.draws)
        self._generator.manual_seed(seed)
        self.draws += 1
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        """``{"noise_draws": k, "noise_seed": seed}``: all a resume needs; the count is the same
        on every rank."""
        return {"noise_draws": self.draws, "noise_seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream of a :meth:`state_dict`: its seed and its count. Refused: a state
        that holds a generator's state and no count (saved by an earlier tram, which advanced
        one generator), and a state without a seed (saved before the seed was checkpointed)
        when this stream's seed was left out. Nothing changes when a state is refused."""
        if "noise_draws" not in state:
            raise ValueError(
                "Invalid state_dict: it holds no 'noise_draws'. "
                + (
                    "It was saved by a tram version that advanced one noise generator (its "
                    "'generator' entry), a stream this version does not continue. Resume from "
                    "a checkpoint saved by this version, or add 'noise_draws': 0 beside "
                    "'generator' to start this version's stream from its first draw"
                    if "generator" in state
                    else f"Its keys are {sorted(state)}"
                )
            )
        draws = _number(state["noise_draws"])
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"Invalid state_dict: noise_draws must be an int >= 0, got {draws!r}")
        if "noise_seed" in state:
            seed = _number(state["noise_seed"])
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"Invalid state_dict: noise_seed must be an int, got {seed!r}")
        elif self.seed_given:
            seed = self.seed
        else:
            raise ValueError(
                "Invalid state_dict: it holds no 'noise_seed' (it was saved by a tram version "
                "that did not checkpoint the noise seed, whose default was 0), and this "
                f"stream's seed was left out (it is torch.initial_seed() = {self.seed}), so "
                "the checkpoint's noise cannot be continued. Pass the seed the checkpointed run "
                "was built with: seed=0 if it gave none"
            )
        self.draws = draws
        self.seed = seed
        self.seed_given = True

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not pickle; the next draw makes a fresh one.
        return {**self.__dict__, "_generator": None}

    def __repr__(self) -> str:
        return f"NoiseStream(seed={self.seed}, draws={self.draws})"
