"""One logits finder: the Trainer integration's ``find_logits`` is ``tram.targets.extract_logits``
with the Trainer's error."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from tram.integrations.hf import MissingLogitsError, find_logits
from tram.targets import extract_logits

LOGITS = torch.randn(3, 5)


@pytest.mark.parametrize(
    "output",
    [
        LOGITS,
        SequenceClassifierOutput(loss=torch.tensor(0.7), logits=LOGITS),
        {"loss": torch.tensor(0.7), "logits": LOGITS},
        SimpleNamespace(logits=LOGITS),
    ],
    ids=["tensor", "model_output", "dict", "attribute"],
)
def test_find_logits_returns_what_extract_logits_returns(output):
    assert find_logits(output) is LOGITS
    assert extract_logits(output) is LOGITS


@pytest.mark.parametrize(
    ("output", "found"),
    [
        (BaseModelOutput(last_hidden_state=torch.zeros(2, 4, 3)), "keys (last_hidden_state)"),
        ((torch.zeros(2, 5),), "a tuple"),
        ({"loss": torch.tensor(0.1)}, "keys (loss)"),
    ],
)
def test_find_logits_raises_the_trainer_error_naming_what_it_found(output, found):
    with pytest.raises(TypeError, match="cannot find logits"):
        extract_logits(output)
    with pytest.raises(MissingLogitsError, match=re.escape(found)) as info:
        find_logits(output)
    assert isinstance(info.value.__cause__, TypeError)
