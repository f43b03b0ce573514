"""Integrations of tram with training frameworks; each submodule imports its framework lazily.

- :mod:`tram.integrations.hf`: ``TramTrainer``, a Hugging Face ``Trainer`` that wraps the
  optimizer it builds in a tram method, runs the exact two-pass gradient accumulation, adds
  loss-side regularizers and logs the methods' diagnostics. Switching a Trainer script::

      from tram.integrations.hf import TramTrainer
      trainer = TramTrainer(model=model, args=args, ..., method="sam", method_kwargs={"rho": 0.05})

- :mod:`tram.integrations.accelerate`: ``TwoPassBackward``, the same two-pass step for a
  hand-written accelerate loop (gradient accumulation, ``no_sync``, loss scaling).
- :mod:`tram.integrations.lightning`: ``TramCallback``, the exact two-pass step under PyTorch
  Lightning's automatic optimization, and ``manual_step`` for manual optimization::

      trainer = lightning.pytorch.Trainer(..., callbacks=[TramCallback()])

- :mod:`tram.integrations.trl`: ``TramSFTTrainer``, ``TramDPOTrainer`` and ``with_tram``: TRL's
  trainers with ``TramTrainer``'s ``method=``/``method_kwargs=`` (TRAM included, through TRL's
  fused LM head).

``import tram`` imports none of transformers, accelerate, Lightning or TRL.
"""
