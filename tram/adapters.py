"""TRAM-θ0 for PEFT LoRA models without a copy of any weight: the adapter-off forward.

For a LoRA model whose adapters are at their initialisation (``lora_B = 0``, PEFT's default
``init_lora_weights=True``), the pre-trained model θ0 *is* the model with the adapters switched
off: ``W x + B A x · s = W x`` when ``B = 0``. :class:`AdapterOffReference` runs the reference
forward of TRAM's ``"pretrained"`` trust region as ``with model.disable_adapter(): model(...)``
(PEFT's public API), so the reference holds no tensor at all, where
:class:`tram.targets.ReferenceWeights` copies every trainable parameter (for LoRA: the adapter
weights and any ``modules_to_save`` head).

It computes the same function as the copied reference, exactly:

- with ``B = 0`` the LoRA term adds an exact zero, so the adapter-on forward at θ0 and the
  adapter-off forward give the same logits bit for bit;
- a ``modules_to_save`` head (PEFT's ``task_type="SEQ_CLS"``) is swapped back to its original,
  frozen module, which holds the head's θ0 (the trainable copy starts equal to it);
- **dropout replay**: the adapter-on forward draws the LoRA dropout mask of every LoRA layer
  (``lora_dropout > 0``); with the adapters off PEFT skips those draws, which would shift every
  later dropout mask of the model and make TRAM's replayed masks differ (d would then measure
  dropout, not the trust region). The reference draws and discards the same LoRA dropout masks,
  in the same order, so the random stream advances exactly as in the recorded forward.

It refuses what is not θ0 or not exact: at construction, merged adapters, DoRA (its magnitude
rescaling is not an exact identity at initialisation) and LoRA layer types whose dropout replay is
not implemented; at the first reference forward, adapters whose ``lora_B`` was not zero when the
reference was built (a loaded adapter, PiSSA/OLoRA/… initialisations, which also change the base
weights), unless a checkpoint of the reference was loaded since (resuming a run that used it: its
adapters trained, its base weights are still θ0). Use ``ReferenceWeights`` for those.

``trust_region="previous"`` and ``"ema"`` need weights that move: they raise here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tram.targets import unwrap_model

__all__ = ["AdapterOffReference"]


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _replayable_dropout_types() -> tuple[type, ...]:
    """LoRA layer types whose adapter-on forward draws ``lora_dropout[adapter](x)`` once per
    active adapter on the layer's input (``peft/tuners/lora/layer.py``: ``Linear`` and the
    convolutions)."""
    from peft.tuners.lora import layer

    return (layer.Linear, layer._ConvNd)


class AdapterOffReference:
    """The pre-trained model θ0 of a PEFT LoRA model, as its adapter-off forward.

    It has the interface of :class:`tram.targets.ReferenceWeights` that TRAM's ``"pretrained"``
    trust region uses: :meth:`call` runs the reference forward, :meth:`state_dict` and
    :meth:`load_state_dict` checkpoint it (there is nothing to save).

    Args:
        model: the ``peft.PeftModel`` being trained (the model TRAM records), with LoRA adapters
            at their initialisation. A ``DistributedDataParallel`` wrapper is unwrapped.

    Raises:
        TypeError: ``model`` is not a PEFT model with LoRA adapters.
        ValueError: merged adapters, DoRA, or a LoRA layer type with dropout that cannot be
            replayed; from :meth:`call`: ``lora_B`` was not zero at construction.
    """

    def __init__(self, model: nn.Module) -> None:
        model = unwrap_model(model)
        if not callable(getattr(model, "disable_adapter", None)) or not hasattr(
            model, "peft_config"
        ):
            raise TypeError(
                "AdapterOffReference needs a peft.PeftModel (with disable_adapter()), but got "
                f"{type(model).__name__}"
            )
        layers = _lora_layers(model)
        if not layers:
            raise TypeError(
                f"{type(model).__name__} has no LoRA layers; AdapterOffReference supports LoRA "
                "adapters only (use tram.targets.ReferenceWeights for other PEFT methods)"
            )
        replayable = _replayable_dropout_types()
        self.model: Any = model  # a peft.PeftModel (peft is imported lazily, untyped here)
        self._dropout_layers: list[Any] = []
        # Why the adapter-off model may not be θ0; cleared by loading a checkpoint of this
        # reference (a resumed run: the adapters trained, the base weights are still θ0).
        self._not_initial: str | None = None
        for layer in layers:
            self._check_layer(layer, replayable)

    def _check_layer(self, layer: Any, replayable: tuple[type, ...]) -> None:
        name = type(layer).__name__
        if layer.merged:
            raise ValueError(
                f"a LoRA {name} layer has merged adapters: the adapter-off model is not the "
                "pre-trained model; unmerge them (model.unmerge_adapter()) first"
            )
        draws_dropout = False
        for adapter in layer.active_adapters:
            if layer.use_dora.get(adapter, False):
                raise ValueError(
                    f"adapter {adapter!r} uses DoRA, whose magnitude rescaling is not an exact "
                    "identity at initialisation; use tram.targets.ReferenceWeights"
                )
            for factors in (layer.lora_B, layer.lora_embedding_B):
                if adapter not in factors:
                    continue
                factor = factors[adapter]
                weight = cast(Tensor, factor.weight if isinstance(factor, nn.Module) else factor)
                if self._not_initial is None and torch.count_nonzero(weight.detach()).item():
                    self._not_initial = (
                        f"adapter {adapter!r} has a non-zero lora_B in a {name} layer: with it "
                        "switched off the model is not the model at the start of training "
                        "(a loaded or trained adapter, or an initialisation such as PiSSA "
                        "that also changes the base weights); use "
                        "tram.targets.ReferenceWeights, which copies θ0. (Resuming a run that "
                        "used this reference is fine: load the optimizer's state dict first.)"
                    )
            # (nn.ModuleDict has no get())
            dropout = layer.lora_dropout[adapter] if adapter in layer.lora_dropout else None  # noqa: SIM401
            if adapter in layer.lora_A and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                if not isinstance(layer, replayable):
                    raise ValueError(
                        f"LoRA dropout (p={dropout.p}) on a {name} layer cannot be replayed by "
                        "the adapter-off reference; set lora_dropout=0 for it or use "
                        "tram.targets.ReferenceWeights"
                    )
                draws_dropout = True
        if draws_dropout:
            self._dropout_layers.append(layer)

    @contextlib.contextmanager
    def _lora_dropout_draws(self) -> Iterator[None]:
        """Draw (and discard) each LoRA layer's dropout masks as its adapter-on forward would."""

        def draw(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs.get("x")
            if not layer.training or not isinstance(x, Tensor):
                return
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                dtype = layer.lora_A[adapter].weight.dtype
                layer.lora_dropout[adapter](x.to(dtype))

        handles: list[RemovableHandle] = [
            layer.register_forward_hook(draw, with_kwargs=True) for layer in self._dropout_layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the model with its adapters switched off on ``(args, kwargs)``.

        Raises:
            ValueError: the adapters were not at their initialisation when the reference was
                built (and no checkpoint of it was loaded since).
        """
        if self._not_initial is not None:
            raise ValueError(self._not_initial)
        with self.model.disable_adapter(), self._lora_dropout_draws():
            return self.model(*args, **kwargs)

    def forward(self, inputs: Any) -> Any:
        """Run the reference on a batch: a mapping as keyword arguments, a tuple/list as
        positional arguments, anything else as the single argument."""
        if isinstance(inputs, Mapping):
            return self.call((), dict(inputs))
        if isinstance(inputs, (tuple, list)):
            return self.call(tuple(inputs), {})
        return self.call((inputs,), {})

    def state_dict(self) -> dict[str, Tensor]:
        """Nothing: the reference is the frozen base model, saved with the model."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Accept the empty state of :meth:`state_dict` (a resumed run: the adapters may have
        trained since θ0); refuse copied reference weights."""
        if state:
            raise KeyError(
                "AdapterOffReference holds no weights, but the checkpoint has reference tensors "
                f"({len(state)}, e.g. {next(iter(state))!r}): it was saved with copied reference "
                "weights (tram.targets.ReferenceWeights)"
            )
        self._not_initial = None

    def copy_from_model(self) -> None:
        """Not available: the adapter-off model is θ0 only (``trust_region="pretrained"``)."""
        raise TypeError(
            "AdapterOffReference is the pre-trained model θ0 and cannot follow the weights; use "
            "it with trust_region='pretrained' (for 'previous' use ReferenceWeights)"
        )

    def update_ema(self, decay: float) -> None:
        """Not available: the adapter-off model is θ0 only (``trust_region="pretrained"``)."""
        raise TypeError(
            "AdapterOffReference is the pre-trained model θ0 and cannot follow the weights; use "
            "it with trust_region='pretrained' (for 'ema' use ReferenceWeights)"
        )
