"""A wrapper's per-step state, and the checks that keep a step from going silently wrong.

:class:`_StepState` holds everything a step mutates, in one object shared by copies of the
wrapper's ``__dict__``; :class:`_SharedField` exposes its counters as wrapper attributes.
:class:`MissingAscentWarning` and :func:`refuse_foreign_state_dict` are two of the refusals
listed in the README's "Guarantees"; the others live where the step is taken
(:mod:`tram._wrapper`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from tram._wrapper import _Bucket

__all__ = ["MissingAscentWarning", "refuse_foreign_state_dict"]

_V = TypeVar("_V")


class MissingAscentWarning(UserWarning):
    """A two-pass optimizer was stepped without its ascent: the step was a plain base step.

    Issued once per wrapper, when ``step()`` is called with no closure on a step that was due an
    ascent and ``first_step()`` was not called: a caller that only knows the plain optimizer
    protocol (``transformers.Trainer`` or TRL given a tram optimizer, Lightning's ``"16-mixed"``
    precision, ``GradScaler.step``) drives it. Turn it into an error with
    ``warnings.simplefilter("error", tram.MissingAscentWarning)``.
    """


class _StepState:
    """Everything a step of a wrapper mutates, in one object that is never replaced.

    Framework proxies copy an optimizer's ``__dict__`` and call its methods with the proxy as
    ``self`` (Lightning's ``LightningOptimizer`` does). An attribute that a method reassigns would
    then change on the proxy only, and the wrapper would lose track of perturbed weights. Both
    objects share this one, so the state stays in one place whichever object calls.
    """

    __slots__ = (
        "ascent_attempted",
        "ascent_params",
        "frozen_batchnorms",
        "gradient_not_finite",
        "last_ascent_norm",
        "perturbed_buckets",
        "skipped_ascents",
        "skipped_steps",
        "steps",
        "warned_lightning_logging",
        "warned_missing_ascent",
    )

    def __init__(self) -> None:
        self.steps = 0
        self.skipped_ascents = 0
        self.skipped_steps = 0
        self.last_ascent_norm: float | None = None
        # first_step() was called since the last base step (the explicit form is in progress).
        self.ascent_attempted = False
        # The weights that were perturbed since the last base step: the base step must then use
        # a gradient from the second pass, which is checked before stepping.
        self.ascent_params: list[Tensor] = []
        self.gradient_not_finite = False
        self.perturbed_buckets: list[_Bucket] = []
        self.frozen_batchnorms: list[_BatchNorm] = []
        self.warned_missing_ascent = False
        self.warned_lightning_logging = False

    def abandon(self) -> None:
        """Forget a step that raised or was refused: the next step starts afresh."""
        self.ascent_attempted = False
        self.ascent_params = []

    def for_copy(self) -> _StepState:
        """A copy for pickling: counters kept, references to live tensors dropped."""
        copy = _StepState()
        copy.steps = self.steps
        copy.skipped_ascents = self.skipped_ascents
        copy.skipped_steps = self.skipped_steps
        copy.last_ascent_norm = self.last_ascent_norm
        copy.warned_missing_ascent = self.warned_missing_ascent
        copy.warned_lightning_logging = self.warned_lightning_logging
        return copy


class _SharedField(Generic[_V]):
    """A wrapper attribute stored in its :class:`_StepState`, read and written through it."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _SharedField[_V]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _V: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance._step_state, self.name)  # type: ignore[attr-defined]

    def __set__(self, instance: object, value: _V) -> None:
        setattr(instance._step_state, self.name, value)  # type: ignore[attr-defined]


def refuse_foreign_state_dict(state_dict: Any) -> None:
    """Raise a clear ``ValueError`` for state dicts that torch would fail on obscurely."""
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        raise ValueError(
            "Invalid state_dict: expected the dict returned by optimizer.state_dict() (with "
            f"'state' and 'param_groups'), but got {type(state_dict).__name__}"
            + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
        )
    per_param = state_dict["state"]
    values = per_param.values() if isinstance(per_param, dict) else []
    if any(isinstance(value, dict) and "old_p" in value for value in values):
        raise ValueError(
            "Invalid state_dict: it holds per-parameter 'old_p' tensors, the weight backups of "
            "the SAM implementation in davda54/sam (and its copies). Those state dicts do not "
            "contain the base optimizer's state (its moments were never saved), so there is "
            "nothing to resume from: load your base optimizer's own state dict, if you saved "
            "it, with optimizer.base_optimizer.load_state_dict(...), or start the optimizer "
            "afresh. tram's state_dict() saves the base optimizer's state with its own."
        )
