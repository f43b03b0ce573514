"""TRAM-θ0 for PEFT LoRA models without a copy of any weight: the adapter-off forward.

For a LoRA model whose adapters are at their initialisation (``lora_B = 0``, PEFT's default
``init_lora_weights=True``), the pre-trained model θ0 *is* the model with the adapters switched
off: ``W x + B A x · s = W x`` when ``B = 0``. :class:`AdapterOff` is a TRAM target
(:class:`tram.targets.Target`) whose output is ``with model.disable_adapter(): model(...)``
(PEFT's public API), so it holds no tensor at all, where :class:`tram.targets.Pretrained` copies
every trainable parameter (for LoRA: the adapter weights and any ``modules_to_save`` head)::

    optimizer = tram.TRAM(base, peft_model, target=tram.adapters.AdapterOff())

It computes the same function as the copied θ0, exactly:

- with ``B = 0`` the LoRA term adds an exact zero, so the adapter-on forward at θ0 and the
  adapter-off forward give the same logits bit for bit;
- a ``modules_to_save`` head (PEFT's ``task_type="SEQ_CLS"``) is swapped back to its original,
  frozen module, which holds the head's θ0 (the trainable copy starts equal to it);
- **dropout replay**: the adapter-on forward draws the LoRA dropout mask of every LoRA layer
  (``lora_dropout > 0``); with the adapters off PEFT skips those draws, which would shift every
  later dropout mask of the model and make TRAM's replayed masks differ (d would then measure
  dropout, not the trust region). The target draws and discards the same LoRA dropout masks, in
  the same order, so the random stream advances exactly as in the recorded forward.

It refuses what is not θ0 or not exact: when TRAM binds it, merged adapters, DoRA (its magnitude
rescaling is not an exact identity at initialisation) and LoRA layer types whose dropout replay is
not implemented; at the first reference forward, adapters whose ``lora_B`` was not zero when it
was bound (a loaded adapter, PiSSA/OLoRA/… initialisations, which also change the base weights),
unless a checkpoint of this target was loaded since (resuming a run that used it: its adapters
trained, its base weights are still θ0). Use :class:`tram.targets.Pretrained` for those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tram._versions import require_installed
from tram.targets import Target, unwrap_model

__all__ = ["AdapterOff"]


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _replayable_dropout_types() -> tuple[type, ...]:
    """LoRA layer types whose adapter-on forward draws ``lora_dropout[adapter](x)`` once per
    active adapter on the layer's input (``peft/tuners/lora/layer.py``: ``Linear`` and the
    convolutions)."""
    from peft.tuners.lora import layer

    return (layer.Linear, layer._ConvNd)


class AdapterOff(Target):
    """TRAM-θ0 of a PEFT LoRA model as its adapter-off forward: ``TRAM(base, model,
    target=AdapterOff())``.

    A :class:`tram.targets.Target` like :class:`tram.targets.Pretrained`, whose output it equals
    (see the module docstring), holding no weights. Its checkpoint is a marker only.

    Raises (when TRAM binds it to the model):
        TypeError: the model is not a PEFT model with LoRA adapters.
        ValueError: merged adapters, DoRA, or a LoRA layer type with dropout that cannot be
            replayed. From :meth:`output`: ``lora_B`` was not zero when it was bound (and no
            checkpoint of this target was loaded since).
    """

    name = "adapter_off"

    def bind(self, model: nn.Module) -> None:
        require_installed("peft", needed_by="tram.adapters.AdapterOff")
        model = unwrap_model(model)
        if not callable(getattr(model, "disable_adapter", None)) or not hasattr(
            model, "peft_config"
        ):
            raise TypeError(
                "AdapterOff needs a peft.PeftModel (with disable_adapter()), but got "
                f"{type(model).__name__}"
            )
        layers = _lora_layers(model)
        if not layers:
            raise TypeError(
                f"{type(model).__name__} has no LoRA layers; AdapterOff supports LoRA adapters "
                "only (use tram.targets.Pretrained, which copies θ0, for other PEFT methods)"
            )
        super().bind(model)
        self.peft_model: Any = model  # peft is imported lazily, untyped here
        self._dropout_layers: list[Any] = []
        # Why the adapter-off model may not be θ0; cleared by loading a checkpoint of this
        # target (a resumed run: the adapters trained, the base weights are still θ0).
        self._not_initial: str | None = None
        replayable = _replayable_dropout_types()
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
                    "identity at initialisation; use tram.targets.Pretrained"
                )
            # The update is B·A: zero at initialisation when either factor is (PEFT starts
            # lora_B at zero for linear layers, lora_embedding_A for embeddings).
            for first, second in (
                (layer.lora_A, layer.lora_B),
                (layer.lora_embedding_A, layer.lora_embedding_B),
            ):
                if adapter not in first or adapter not in second:
                    continue
                nonzero = [
                    torch.count_nonzero(
                        cast(Tensor, f.weight if isinstance(f, nn.Module) else f).detach()
                    ).item()
                    for f in (first[adapter], second[adapter])
                ]
                if self._not_initial is None and all(nonzero):
                    self._not_initial = (
                        f"adapter {adapter!r} has non-zero lora factors in a {name} layer: with it "
                        "switched off the model is not the model at the start of training "
                        "(a loaded or trained adapter, or an initialisation such as PiSSA "
                        "that also changes the base weights); use "
                        "tram.targets.Pretrained, which copies θ0. (Resuming a run that "
                        "used this target is fine: load the optimizer's state dict first.)"
                    )
            # (nn.ModuleDict has no get())
            dropout = layer.lora_dropout[adapter] if adapter in layer.lora_dropout else None  # noqa: SIM401
            if adapter in layer.lora_A and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                if not isinstance(layer, replayable):
                    raise ValueError(
                        f"LoRA dropout (p={dropout.p}) on a {name} layer cannot be replayed by "
                        "the adapter-off reference; set lora_dropout=0 for it or use "
                        "tram.targets.Pretrained"
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
    def output(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The model with its adapters switched off on ``(args, kwargs)``.

        Raises:
            ValueError: the adapters were not at their initialisation when the target was bound
                (and no checkpoint of it was loaded since).
        """
        if self._not_initial is not None:
            raise ValueError(self._not_initial)
        with self.peft_model.disable_adapter(), self._lora_dropout_draws():
            return self.peft_model(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """A marker only: the reference is the frozen base model, saved with the model."""
        return {"adapter_off": True}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Accept this target's marker (a resumed run: the adapters may have trained since θ0)."""
        if not state.get("adapter_off"):
            raise KeyError(
                "the checkpoint is not from an AdapterOff target (no 'adapter_off' marker); it "
                "holds the state of another target"
            )
        self._not_initial = None

    def __repr__(self) -> str:
        return "AdapterOff()"
