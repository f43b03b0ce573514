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
not implemented; at the first reference forward, adapters whose ``lora_B`` was not zero when they
were first active (a loaded adapter, PiSSA/OLoRA/… initialisations, which also change the base
weights), unless a checkpoint of this target was loaded since (resuming a run that used it: its
adapters trained, its base weights are still θ0). Use :class:`tram.targets.Pretrained` for those.
An adapter made active after TRAM is built (``model.set_adapter``) is checked, and its LoRA
dropout replayed, from the next reference forward or base step on, before its first update; a
layer merged since is refused at the next reference forward.
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
    (see the module docstring), holding no weights. Its checkpoint is a marker and the adapters
    it has checked.

    The active adapters may change after TRAM is built (``model.set_adapter(...)``): each
    adapter is checked when it is first seen active (at the next reference forward or base
    step, before its first update), as :class:`tram.targets.Pretrained` copies a parameter
    unfrozen later, and the LoRA dropout replayed is the active adapters'.

    Raises (when TRAM binds it to the model):
        TypeError: the model is not a PEFT model with LoRA adapters.
        ValueError: merged adapters, DoRA, or a LoRA layer type with dropout that cannot be
            replayed. From :meth:`output`: the same for adapters made active (or layers
            merged) since, and ``lora_B`` not zero when its adapter was first active (unless a
            checkpoint of this target was loaded since that vouches for it).
    """

    name = "adapter_off"
    optional_state = frozenset({"not_initial", "checked"})

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
        self._layers = layers
        self._replayable = _replayable_dropout_types()
        self._dropout_layers: list[Any] = []
        # (layer index, adapter) whose factors were checked when first seen active: a checked
        # adapter trains and is not checked again.
        self._checked: set[tuple[int, str]] = set()
        # Each layer's active adapters and merged flag when last checked.
        self._active: tuple[tuple[tuple[str, ...], bool], ...] | None = None
        # Why the adapter-off model is not θ0 (an adapter's factors were not zero when it was
        # first active); a checkpoint of this target carries it, so loading one saved by the
        # run being resumed (whose adapters trained from zero) clears it, and TRAM's rollback
        # of a failed pass keeps it.
        self._not_initial: str | None = None
        # Why the adapter-off forward cannot stand for θ0 at all (merged layers, DoRA, LoRA
        # dropout that cannot be replayed): found afresh at each check, never loaded.
        self._unsupported: str | None = None
        self._follow_active_adapters()
        if self._unsupported is not None:
            raise ValueError(self._unsupported)

    def _follow_active_adapters(self) -> None:
        """Check the layers again when their active adapters or merged flags changed since the
        last check (a walk over the LoRA layers' flags: ~1 µs per layer)."""
        active = tuple((tuple(layer.active_adapters), bool(layer.merged)) for layer in self._layers)
        if active == self._active:
            return
        self._unsupported = None
        self._dropout_layers = [
            layer for index, layer in enumerate(self._layers) if self._check_layer(index, layer)
        ]
        self._active = active

    def _check_layer(self, index: int, layer: Any) -> bool:
        """Check one LoRA layer's active adapters, noting the first problem found; whether its
        adapter-on forward draws LoRA dropout masks (which the reference must replay)."""
        name = type(layer).__name__
        if layer.merged:
            self._note_unsupported(
                f"a LoRA {name} layer has merged adapters: the adapter-off model is not the "
                "pre-trained model; unmerge them (model.unmerge_adapter()) first"
            )
        draws_dropout = False
        for adapter in layer.active_adapters:
            if layer.use_dora.get(adapter, False):
                self._note_unsupported(
                    f"adapter {adapter!r} uses DoRA, whose magnitude rescaling is not an exact "
                    "identity at initialisation; use tram.targets.Pretrained"
                )
            if (index, adapter) not in self._checked:
                self._checked.add((index, adapter))
                self._check_factors(layer, adapter)
            # (nn.ModuleDict has no get())
            dropout = layer.lora_dropout[adapter] if adapter in layer.lora_dropout else None  # noqa: SIM401
            if adapter in layer.lora_A and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                if not isinstance(layer, self._replayable):
                    self._note_unsupported(
                        f"LoRA dropout (p={dropout.p}) on a {name} layer cannot be replayed by "
                        "the adapter-off reference; set lora_dropout=0 for it or use "
                        "tram.targets.Pretrained"
                    )
                draws_dropout = True
        return draws_dropout

    def _note_unsupported(self, problem: str) -> None:
        if self._unsupported is None:
            self._unsupported = problem

    def _check_factors(self, layer: Any, adapter: str) -> None:
        """Note when ``adapter``'s update B·A on ``layer`` is not zero: the adapter-off model is
        then not the model at the start of training."""
        # Zero at initialisation when either factor is (PEFT starts lora_B at zero for linear
        # layers, lora_embedding_A for embeddings).
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
                    f"adapter {adapter!r} had non-zero lora factors in a "
                    f"{type(layer).__name__} layer when it was first active: with it switched "
                    "off the model is not the model at the start of training (a loaded or "
                    "trained adapter, or an initialisation such as PiSSA that also changes the "
                    "base weights); use tram.targets.Pretrained, which copies θ0. (Resuming a "
                    "run that used this target is fine: load the optimizer's state dict first.)"
                )

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
            ValueError: merged layers, DoRA or LoRA dropout that cannot be replayed on the
                active adapters; or an adapter whose ``lora_B`` was not zero when it was first
                active (and no checkpoint of this target was loaded since).
        """
        self._follow_active_adapters()
        if self._unsupported is not None:
            raise ValueError(self._unsupported)
        if self._not_initial is not None:
            raise ValueError(self._not_initial)
        with self.peft_model.disable_adapter(), self._lora_dropout_draws():
            return self.peft_model(*args, **kwargs)

    def before_base_step(self) -> None:
        """Check an adapter made active since the last check before its first update, also on
        a step that measures no d (``radius_every > 1``, a skipped ascent)."""
        self._follow_active_adapters()

    def state_dict(self) -> dict[str, Any]:
        """The marker, why the adapter-off model is not θ0 (None when it is) and the adapters
        checked, as ``[layer index, adapter]`` pairs: the reference itself is the frozen base
        model, saved with the model."""
        return {
            "adapter_off": True,
            "not_initial": self._not_initial,
            "checked": [[index, adapter] for index, adapter in sorted(self._checked)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take this target's checkpoint: from a run being resumed, it vouches that the
        adapters it checked started at θ0 (they may have trained since). A checkpoint saved
        before the checked adapters were recorded vouches for the adapters active now."""
        if not state.get("adapter_off"):
            raise KeyError(
                "the checkpoint is not from an AdapterOff target (no 'adapter_off' marker); it "
                "holds the state of another target"
            )
        if "checked" in state:
            self._checked = {(int(index), str(adapter)) for index, adapter in state["checked"]}
        else:
            self._checked = {
                (index, adapter)
                for index, layer in enumerate(self._layers)
                for adapter in layer.active_adapters
            }
        not_initial = state.get("not_initial")
        self._not_initial = None if not_initial is None else str(not_initial)
        self._active = None  # check the layers again, against the loaded checked adapters

    def __repr__(self) -> str:
        return "AdapterOff()"
