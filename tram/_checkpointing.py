"""Whether the forward running now is inside ``torch.utils.checkpoint``, or is its recomputation.

Activation checkpointing runs a block's forward twice: once without keeping its activations, and
again during the backward to rebuild them. A hook that must see each forward of the step once
(TRAM's recorder, ``tram/_recording.py``), or whose effect must be the same in both runs (the
representation noise, ``tram/noise.py``), has to tell them apart. torch names neither, so they are
read from how ``torch/utils/checkpoint.py`` runs them:

- ``use_reentrant=False`` (the default of ``torch.utils.checkpoint.checkpoint`` and of Hugging
  Face ``gradient_checkpointing_enable()``): the block's forward runs under the saved-tensor hooks
  of its ``_checkpoint_hook``, its recomputation under those of ``_recomputation_hook``; the
  innermost saved-tensor hooks are those of the innermost region. (Saved-tensor hooks entered
  inside the block, such as ``torch.autograd.graph.save_on_cpu``, hide it.)
- ``use_reentrant=True``: the forward runs inside ``CheckpointFunction.forward`` (gradients
  disabled), its recomputation inside ``CheckpointFunction.backward``: frames on the stack.

``tests/test_checkpointing.py`` pins both readings against the installed torch.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Literal

import torch
import torch.utils.checkpoint

__all__ = ["checkpoint_phase"]

CheckpointPhase = Literal["forward", "recomputation"]

# Private torch names, looked up defensively so that a torch that renames them still imports
# tram (the pinning test in tests/test_checkpointing.py fails instead).
_CHECKPOINT_FUNCTION = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
_TOP_SAVED_TENSORS_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)

_REENTRANT_CODE: dict[object, CheckpointPhase] = (
    {}
    if _CHECKPOINT_FUNCTION is None
    else {
        _CHECKPOINT_FUNCTION.forward.__code__: "forward",
        _CHECKPOINT_FUNCTION.backward.__code__: "recomputation",
    }
)
_NON_REENTRANT_HOOKS: dict[str, CheckpointPhase] = {
    "_checkpoint_hook.": "forward",
    "_recomputation_hook.": "recomputation",
}


def checkpoint_phase() -> tuple[CheckpointPhase, bool] | None:
    """``(phase, reentrant)`` when called inside an activation-checkpointed block: ``"forward"``
    while the block first runs, ``"recomputation"`` while the backward runs it again; None
    outside checkpointed blocks, and while torch.compile traces (it cannot trace the private
    lookups, and a compiled graph does not run the hooks that ask)."""
    if torch.compiler.is_compiling():
        return None
    hooks = None if _TOP_SAVED_TENSORS_HOOKS is None else _TOP_SAVED_TENSORS_HOOKS(False)
    if hooks is not None:
        name = getattr(hooks[0], "__qualname__", "")
        for prefix, phase in _NON_REENTRANT_HOOKS.items():
            if name.startswith(prefix):
                return phase, False
    if not _REENTRANT_CODE:
        return None
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        reentrant_phase = _REENTRANT_CODE.get(frame.f_code)
        if reentrant_phase is not None:
            return reentrant_phase, True
        frame = frame.f_back
    return None
