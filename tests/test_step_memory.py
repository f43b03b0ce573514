"""Memory the wrappers hold while perturbed: nothing of the gradients.

``benchmarks/`` measured a step's peak one parameter-size higher than it must be: the weights
were perturbed with the gradients still referenced by the wrapper, so the closure's
``zero_grad()`` (``set_to_none=True``) could not free them before the second backward allocated
new ones.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.wrappers_table import WRAPPERS, WrapperCase


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", WRAPPERS, ids=str)
def test_zero_grad_while_perturbed_frees_the_gradients(case: WrapperCase, foreach: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer = case.make(base, model, foreach=foreach)
    tokens, labels = torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,))
    with optimizer.first_pass():
        F.cross_entropy(model(tokens), labels).backward()
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    assert optimizer.first_step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    assert [ref() for ref in grads] == [None] * len(grads)
    optimizer.restore()
