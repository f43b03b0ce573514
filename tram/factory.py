"""Build a tram optimizer from a method name and its arguments.

Frameworks and configuration files name an optimizer with a string and a mapping of arguments;
this registry turns that *spec* into a wrapper around an existing base optimizer instance::

    base = torch.optim.AdamW(model.parameters(), lr=2e-5)
    optimizer = tram.factory.wrap_optimizer("asam", base, rho=0.5, eta=0.01)

The Hugging Face integration (``tram.integrations.hf.TramTrainer``) and the experiment configs
go through :func:`wrap_optimizer`, so a new method is available everywhere after one line::

    register("my_sam", MySAM)                  # a TwoPassOptimizer subclass
    register("tram", "tram._tram:TRAM")        # or lazily, as "module:attribute"

Names are case-insensitive and ``-`` equals ``_`` (``"Fisher-SAM"`` is ``"fisher_sam"``).
Methods whose constructor takes a ``model`` parameter receive the ``model`` given to
:func:`wrap_optimizer` (TRAM needs it; SAM uses it to freeze BatchNorm statistics during the
perturbed pass); a method that requires it raises ``ValueError`` when none is given.

Bad specs fail early, before any training: an unknown name raises ``ValueError`` listing the
known ones, and an argument the method does not take raises ``TypeError`` naming the argument,
the method and the arguments it accepts (:func:`check_method_args` does both without an
optimizer).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from tram._fisher import FisherSAM
from tram._sam import ASAM, SAM
from tram._tram import TRAM
from tram._wrapper import TwoPassOptimizer

__all__ = [
    "check_method_args",
    "get_method",
    "list_methods",
    "register",
    "wrap_optimizer",
]

_MethodRef = type[TwoPassOptimizer] | str
_REGISTRY: dict[str, _MethodRef] = {}

# Constructor parameters the factory fills in itself; never taken from a spec's arguments.
_BASE_PARAMETER = "base_optimizer"
_MODEL_PARAMETER = "model"


def _normalise(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"method name must be a string, but got {type(name).__name__}")
    return name.strip().lower().replace("-", "_")


def register(name: str, method: _MethodRef, *, overwrite: bool = False) -> None:
    """Register a two-pass optimizer class under ``name``.

    Args:
        name: the method name used in specs (case-insensitive; ``-`` and ``_`` are equal).
        method: a :class:`~tram.TwoPassOptimizer` subclass whose first parameter is the base
            optimizer instance, or a lazy reference ``"package.module:ClassName"`` that is
            imported on first use.
        overwrite: replace an existing registration instead of raising ``ValueError``.
    """
    key = _normalise(name)
    if not key:
        raise ValueError("method name must not be empty")
    if isinstance(method, str):
        if ":" not in method:
            raise ValueError(
                f"a lazy method reference must look like 'package.module:ClassName', got {method!r}"
            )
    elif not (isinstance(method, type) and issubclass(method, TwoPassOptimizer)):
        raise TypeError(
            f"method must be a TwoPassOptimizer subclass or a 'module:Class' string, got {method!r}"
        )
    existing = _REGISTRY.get(key)
    if existing is not None and existing != method and not overwrite:
        raise ValueError(
            f"optimizer method {key!r} is already registered ({_describe(existing)}); "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[key] = method


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(method: str | type[TwoPassOptimizer]) -> type[TwoPassOptimizer]:
    """The class registered under ``method`` (a class is returned as it is).

    Raises:
        ValueError: ``method`` is not registered; the message lists the known names.
    """
    if isinstance(method, type):
        if not issubclass(method, TwoPassOptimizer):
            raise TypeError(f"{method.__name__} is not a TwoPassOptimizer subclass")
        return method
    key = _normalise(method)
    ref = _REGISTRY.get(key)
    if ref is None:
        raise ValueError(
            f"Unknown optimizer method {method!r}; known methods: {', '.join(list_methods())}"
        )
    if isinstance(ref, str):
        module_name, _, attribute = ref.partition(":")
        cls = getattr(importlib.import_module(module_name), attribute)
        if not (isinstance(cls, type) and issubclass(cls, TwoPassOptimizer)):
            raise TypeError(f"{ref} (registered as {key!r}) is not a TwoPassOptimizer subclass")
        _REGISTRY[key] = cls
        return cls
    return ref


def _describe(ref: _MethodRef) -> str:
    return ref if isinstance(ref, str) else f"{ref.__module__}.{ref.__qualname__}"


def _method_name(method: str | type[TwoPassOptimizer]) -> str:
    return method if isinstance(method, str) else method.__name__


def _parameters(cls: type[TwoPassOptimizer]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


def _accepted(parameters: Mapping[str, inspect.Parameter]) -> list[str]:
    return [
        name
        for name, parameter in parameters.items()
        if name not in ("self", _BASE_PARAMETER, _MODEL_PARAMETER)
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _requires_model(parameters: Mapping[str, inspect.Parameter]) -> bool:
    parameter = parameters.get(_MODEL_PARAMETER)
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_method_args(
    method: str | type[TwoPassOptimizer],
    kwargs: Mapping[str, Any] | None = None,
    *,
    has_model: bool = True,
    validate_values: bool = False,
) -> type[TwoPassOptimizer]:
    """Check a spec without building anything, and return the method's class.

    Args:
        method: a registered name, or a :class:`~tram.TwoPassOptimizer` subclass.
        kwargs: the method's arguments (without the base optimizer and the model).
        has_model: whether a model will be supplied; methods that require one raise otherwise.
        validate_values: also check the argument values by building the method around a
            throwaway one-parameter optimizer (skipped for methods that require a model, whose
            constructors may inspect it).

    Raises:
        ValueError: unknown method name; a method that needs ``model`` and none is given; with
            ``validate_values``, a value the method rejects (a negative ``rho``).
        TypeError: an argument the method does not take (named together with the method and
            the arguments it accepts), or a ``base_optimizer``/``model`` passed in ``kwargs``.
    """
    cls = get_method(method)
    name = _method_name(method)
    kwargs = dict(kwargs or {})
    parameters = _parameters(cls)
    for reserved in (_BASE_PARAMETER, _MODEL_PARAMETER):
        if reserved in kwargs:
            raise TypeError(
                f"optimizer method {name!r}: {reserved!r} is supplied by the factory; "
                "do not put it in the method's arguments"
            )
    takes_var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_var_keyword:
        accepted = _accepted(parameters)
        unknown = [key for key in kwargs if key not in accepted]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise TypeError(
                f"optimizer method {name!r} ({cls.__name__}) got unexpected argument{plural} "
                f"{', '.join(repr(key) for key in unknown)}; it accepts: "
                f"{', '.join(accepted) or '(none)'}"
            )
    if not has_model and _requires_model(parameters):
        raise ValueError(
            f"optimizer method {name!r} ({cls.__name__}) needs the model: pass model=..."
        )
    if validate_values and not _requires_model(parameters):
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        try:
            cls(probe, **kwargs)
        except (TypeError, ValueError) as error:
            raise type(error)(f"optimizer method {name!r} ({cls.__name__}): {error}") from error
    return cls


def wrap_optimizer(
    method: str | type[TwoPassOptimizer],
    base: Optimizer,
    *,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> TwoPassOptimizer:
    """Wrap the optimizer instance ``base`` in the two-pass method named ``method``.

    Args:
        method: a registered name (see :func:`list_methods`) or a TwoPassOptimizer subclass.
        base: the optimizer instance to wrap (its param groups and state are shared).
        model: handed to methods whose constructor takes ``model`` (TRAM needs it; pass the
            unwrapped module, not a DDP/accelerate wrapper). Ignored by methods without one.
        **kwargs: the method's own arguments, e.g. ``rho=0.05``.

    Returns:
        The wrapper.

    Raises:
        ValueError, TypeError: see :func:`check_method_args`; invalid values (a negative
            ``rho``) raise from the method's constructor.
    """
    cls = check_method_args(method, kwargs, has_model=model is not None)
    if model is not None and _MODEL_PARAMETER in _parameters(cls):
        kwargs[_MODEL_PARAMETER] = model
    return cls(base, **kwargs)


register("sam", SAM)
register("asam", ASAM)
register("fisher_sam", FisherSAM)
register("tram", TRAM)
