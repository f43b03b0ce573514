"""The run's objects, built from the config by ``hydra.utils.instantiate``.

Every object a run trains with is a config node with a ``_target_``: the base optimizer
(``optimizer.base``), the two-pass method around it (``optimizer.method``), the loss-side
regularizers (``optimizer.regularizers.<name>``) and the ``transformers.TrainingArguments``
(``trainer``). Point a ``_target_`` at your own class and the run uses it, without touching tram:

- ``optimizer.base``: any ``torch.optim.Optimizer`` class (or a callable with its signature);
  the Trainer calls it with its parameter groups (weight decay ``train.weight_decay`` on all but
  biases and norm weights) and the node's arguments.
- ``optimizer.method``: a :class:`tram.TwoPassOptimizer` subclass; it is called with the base
  optimizer instance, and with ``model=`` when its constructor has that parameter
  (:func:`tram.factory.wrap_optimizer`).
- ``optimizer.regularizers.<name>``: a callable ``regularizer(model, inputs, logits)`` class
  (:mod:`tram.regularizers`); it is called with ``model=`` when its constructor has that
  parameter.

These nodes are instantiated as partials (``_partial_: true``, added when missing): nothing is
built before the model exists, but every target is imported and every argument checked against
its signature when the config is validated, before any data or weights are loaded.

The optimizer group has a structured schema, :class:`OptimizerConfig`, registered in Hydra's
ConfigStore as ``optimizer/schema`` (``configs/optimizer/adamw.yaml`` starts from it), so a
misspelt key fails when the config is composed. The 0.1 form of the group (``method: sam`` with
``kwargs:``, ``regularizer: {name: r3f, ...}``) still works, with a ``FutureWarning`` that shows
the new form.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from tram import TwoPassOptimizer
from tram.experiments.tasks import ExperimentError

__all__ = [
    "LEGACY_REGULARIZERS",
    "OptimizerConfig",
    "OptimizerParts",
    "build_regularizers",
    "optimizer_parts",
    "training_arguments",
]

LEGACY_REGULARIZERS = {"r3f": "R3F", "r4f": "R4F", "trpo": "TRPO", "mesa": "MESA"}
"""The names of the 0.1 form ``regularizer: {name: ...}``, and the ``tram`` classes they mean."""


@dataclass
class OptimizerConfig:
    """The schema of the optimizer group (``configs/optimizer/*.yaml``).

    Attributes:
        name: how results and reports name this optimizer.
        base: the base optimizer, a ``_target_`` node (e.g. ``torch.optim.AdamW``).
        method: the two-pass method around the base optimizer, a ``_target_`` node
            (e.g. ``tram.SAM``), or None for the base optimizer alone.
        regularizers: loss-side trust regions by name, each a ``_target_`` node
            (e.g. ``r3f: {_target_: tram.R3F, ...}``); None entries are skipped.
        kwargs: deprecated (0.1): the arguments of a method given by name.
        regularizer: deprecated (0.1): ``{name: r3f | r4f | trpo | mesa, <its arguments>}``.
    """

    name: str = MISSING
    base: Any = MISSING
    method: Any = None
    regularizers: dict[str, Any] = field(default_factory=dict)
    kwargs: Any = None
    regularizer: Any = None


ConfigStore.instance().store(group="optimizer", name="schema", node=OptimizerConfig)


@dataclass(frozen=True)
class OptimizerParts:
    """The optimizer group, instantiated as partials that wait for the model."""

    base: functools.partial
    method: functools.partial | None
    regularizers: dict[str, functools.partial]

    @property
    def base_cls_and_kwargs(self) -> tuple[Any, dict[str, Any]]:
        """``(class, arguments)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; lists become
        tuples (torch optimizers take ``betas`` as one)."""
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.base.keywords.items()}
        return self.base.func, kwargs

    @property
    def method_class(self) -> type[TwoPassOptimizer] | None:
        """The method's class (checked to be a TwoPassOptimizer), None without a method."""
        return None if self.method is None else self.method.func  # type: ignore[return-value]

    @property
    def method_target(self) -> str | None:
        """The method's class as ``module.Name`` (None without a method), for results files."""
        if self.method is None:
            return None
        return _dotted(self.method.func)


def _dotted(obj: Any) -> str:
    import tram

    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    if getattr(tram, name, None) is obj:
        return f"tram.{name}"
    return f"{obj.__module__}.{name}"


def _partial(node: Any, where: str) -> functools.partial:
    """``instantiate(node)`` as a partial; ExperimentError naming ``where`` when it fails."""
    if not (OmegaConf.is_dict(node) or isinstance(node, Mapping)) or "_target_" not in node:
        raise ExperimentError(
            f"{where} must be a config node with a _target_ (a class path such as "
            f"torch.optim.AdamW or tram.SAM), but got {_show(node)}"
        )
    try:
        built = instantiate(node, _partial_=True, _convert_="all")
    except InstantiationException as error:
        raise ExperimentError(f"{where}: {error}") from error
    if not isinstance(built, functools.partial):  # pragma: no cover - _partial_ guarantees it
        raise ExperimentError(f"{where}: instantiate gave {type(built).__name__}, not a partial")
    return built


def _show(node: Any) -> str:
    return repr(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)


def _check_arguments(built: functools.partial, where: str, *, runtime: tuple[str, ...]) -> None:
    """The node's arguments against the target's signature (following ``**kwargs`` to the bases
    of a class), so a misspelt argument fails before the model exists."""
    func = built.func
    accepted: set[str] = set()
    takes_any = False
    for owner in func.__mro__ if isinstance(func, type) else (func,):
        try:
            parameters = inspect.signature(owner).parameters
        except (TypeError, ValueError):  # builtins without a signature: nothing to check
            return
        accepted |= {n for n, p in parameters.items() if p.kind is not p.VAR_POSITIONAL}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        if not takes_any:
            break
    if takes_any:
        return
    unknown = sorted(set(built.keywords) - accepted)
    if unknown:
        shown = ", ".join(sorted(accepted - set(runtime) - {"self"}))
        raise ExperimentError(
            f"{where} ({_dotted(func)}) got unexpected argument(s) {unknown}; it accepts: {shown}"
        )


def optimizer_parts(node: Any) -> OptimizerParts:
    """The optimizer group's base optimizer, method and regularizers, checked, as partials.

    Raises:
        ExperimentError: a node without ``_target_``, a target that cannot be imported, an
            argument the target does not take, a method that is not a TwoPassOptimizer, or
            invalid method values (tram's own checks, :func:`tram.factory.check_method_args`).
    """
    from tram.factory import check_method_args

    node = _upgrade_legacy(node)
    base = _partial(node.get("base"), "optimizer.base")
    _check_arguments(base, "optimizer.base", runtime=("params",))
    if "weight_decay" in base.keywords:
        raise ExperimentError(
            "optimizer.base.weight_decay would be replaced by the Trainer's parameter groups "
            "(weight decay on all but biases and norms); set train.weight_decay instead"
        )
    method = None
    if node.get("method") is not None:
        method = _partial(node.method, "optimizer.method")
        func = method.func
        if not (isinstance(func, type) and issubclass(func, TwoPassOptimizer)):
            raise ExperimentError(
                f"optimizer.method: {_dotted(func)} is not a tram.TwoPassOptimizer subclass; "
                "the method wraps the base optimizer instance (e.g. _target_: tram.SAM)"
            )
        try:
            check_method_args(func, method.keywords, validate_values=True)
        except (TypeError, ValueError) as error:
            raise ExperimentError(f"optimizer.method: {error}") from error
    regularizers = {}
    for name, spec in (node.get("regularizers") or {}).items():
        if spec is None:
            continue
        where = f"optimizer.regularizers.{name}"
        regularizers[name] = _partial(spec, where)
        _check_arguments(regularizers[name], where, runtime=("model",))
    return OptimizerParts(base=base, method=method, regularizers=regularizers)


def build_regularizers(parts: OptimizerParts, model: Any) -> list[Any]:
    """The regularizers, each called with ``model=`` when its constructor takes one."""
    built = []
    for partial in parts.regularizers.values():
        try:
            takes_model = "model" in inspect.signature(partial.func).parameters
        except (TypeError, ValueError):
            takes_model = False
        built.append(partial(model=model) if takes_model else partial())
    return built


def training_arguments(cfg: Any, output_dir: str | Path) -> Any:
    """``transformers.TrainingArguments`` from the ``trainer`` node (``_target_``), with the run
    directory filled in.

    Evaluation keeps per-example outputs for language modelling too (``prediction_loss_only``
    stays False): the runner reduces the logits to each block's token losses
    (``tram.experiments.run``), from which the loss is exact on any number of processes.
    """
    node = cfg.trainer
    if "_target_" not in node:
        raise ExperimentError(
            "the trainer node needs _target_: transformers.TrainingArguments (see "
            "configs/finetune.yaml)"
        )
    try:
        args = instantiate(
            node,
            output_dir=str(output_dir),
            _convert_="all",
        )
    except InstantiationException as error:
        raise ExperimentError(f"trainer config: {error}") from error
    return args


def _upgrade_legacy(node: Any) -> DictConfig:
    """The 0.1 optimizer group (``method`` by name, ``kwargs``, ``regularizer``) in the new form,
    with a FutureWarning; the new form passes through unchanged."""
    import tram
    from tram.factory import get_method

    method = node.get("method")
    kwargs = node.get("kwargs")
    regularizer = node.get("regularizer")
    if not isinstance(method, str) and kwargs is None and regularizer is None:
        return node
    plain = OmegaConf.to_container(node, resolve=True)
    assert isinstance(plain, dict)
    kwargs = plain.pop("kwargs", None) or {}
    regularizer = plain.pop("regularizer", None)
    new_method: dict[str, Any] | None = None
    if isinstance(method, str):
        try:
            cls = get_method(method)
        except (TypeError, ValueError) as error:
            raise ExperimentError(f"optimizer.method: {error}") from error
        new_method = {"_target_": _dotted(cls), "_partial_": True, **kwargs}
    elif kwargs:
        if method is None:
            raise ExperimentError("optimizer.kwargs given without optimizer.method")
        new_method = {**plain["method"], **kwargs}
    elif method is not None:
        new_method = plain["method"]
    plain["method"] = new_method
    regularizers = dict(plain.get("regularizers") or {})
    if regularizer:
        regularizer = dict(regularizer)
        name = str(regularizer.pop("name", "")).lower()
        if name not in LEGACY_REGULARIZERS:
            raise ExperimentError(
                f"unknown regularizer {name!r}; choose from {', '.join(LEGACY_REGULARIZERS)} or "
                "give optimizer.regularizers.<name> with a _target_"
            )
        target = f"tram.{LEGACY_REGULARIZERS[name]}"
        assert hasattr(tram, LEGACY_REGULARIZERS[name])
        regularizers[name] = {"_target_": target, "_partial_": True, **regularizer}
    plain["regularizers"] = regularizers
    new = {k: plain[k] for k in ("method", "regularizers") if plain.get(k)}
    warnings.warn(
        f"optimizer config {plain.get('name')!r} uses the 0.1 keys method (a name), kwargs and "
        "regularizer, which are deprecated and will be removed in 0.3; write the objects as "
        f"_target_ nodes instead: {new} (see configs/optimizer/)",
        FutureWarning,
        stacklevel=3,
    )
    return OmegaConf.create(plain)
