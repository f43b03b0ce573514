"""Integrations of tram with training frameworks; each submodule imports its framework lazily.

- :mod:`tram.integrations.hf`: ``TramTrainer``, a Hugging Face ``Trainer`` that wraps the
  optimizer it builds in a tram method, runs the exact two-pass gradient accumulation, adds
  loss-side regularizers and logs the methods' diagnostics. Switching a Trainer script::

      from tram.integrations.hf import TramTrainer
      trainer = TramTrainer(model=model, args=args, ..., method="sam", method_kwargs={"rho": 0.05})

- :mod:`tram.integrations.accelerate`: ``TwoPassBackward``, the same two-pass step for a
  hand-written accelerate loop (gradient accumulation, ``no_sync``, loss scaling).

``import tram`` imports neither transformers nor accelerate.
"""
