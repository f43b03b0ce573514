"""Tests for tram.targets: reference weights and the plumbing from a recorded call to logits."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tram.targets import ReferenceWeights, call_model, extract_logits, logits_mask, unwrap_model

transformers = pytest.importorskip("transformers")

from tests.helpers import tiny_bert, tiny_gpt2, wrapped  # noqa: E402


def bert(seed: int = 0) -> nn.Module:
    return tiny_bert(seed=seed, initializer_range=0.2)  # logits well away from 0


def gpt2(seed: int = 0) -> nn.Module:
    return tiny_gpt2(seed=seed)


def batch(seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    return {"input_ids": torch.randint(0, 100, (3, 6), generator=g), "attention_mask": mask}


@torch.no_grad()
def shift_weights(model: nn.Module, scale: float = 0.05, seed: int = 9) -> None:
    """Move every trainable weight, as training would."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------- ReferenceWeights
def test_pretrained_copy_never_changes_while_the_model_trains() -> None:
    model = bert()
    reference = ReferenceWeights(model)
    initial = {name: t.clone() for name, t in reference.tensors.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, labels = batch(), torch.tensor([0, 1, 2])
    for _ in range(2):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    live = dict(model.named_parameters())
    for name, tensor in reference.tensors.items():
        assert torch.equal(tensor, initial[name]), name
        assert not torch.equal(tensor, live[name]), name
        assert tensor.data_ptr() != live[name].data_ptr()
        assert not tensor.requires_grad


def test_forward_equals_a_copy_of_the_model_with_those_weights() -> None:
    model = bert().eval()
    snapshot = copy.deepcopy(model)
    reference = ReferenceWeights(model)
    shift_weights(model)
    inputs = batch()
    with torch.no_grad():
        expected = snapshot(**inputs).logits
        moved = model(**inputs).logits
        got = reference.forward(inputs).logits
        got_call = reference.call((), dict(inputs)).logits
        after = model(**inputs).logits
    assert torch.equal(got, expected)
    assert torch.equal(got_call, expected)
    assert not torch.allclose(moved, expected)
    # The live model is untouched by the reference forward.
    assert torch.equal(after, moved)


def test_forward_takes_positional_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    snapshot = copy.deepcopy(model)
    reference = ReferenceWeights(model)
    shift_weights(model)
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(reference.forward(x), snapshot(x))
        assert torch.equal(reference.forward((x,)), snapshot(x))
        assert torch.equal(reference.forward([x]), snapshot(x))


def test_copy_from_model_takes_the_live_weights() -> None:
    model = bert()
    reference = ReferenceWeights(model)
    shift_weights(model)
    pointers = {name: t.data_ptr() for name, t in reference.tensors.items()}
    reference.copy_from_model()
    live = dict(model.named_parameters())
    for name, tensor in reference.tensors.items():
        assert torch.equal(tensor, live[name])
        assert tensor.data_ptr() == pointers[name]  # in place, no reallocation
        assert tensor.data_ptr() != live[name].data_ptr()
    # A snapshot, not a view: training on does not move it.
    shift_weights(model, seed=10)
    assert not torch.equal(reference.tensors["classifier.weight"], model.classifier.weight)


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_update_ema_against_the_formula(decay: float) -> None:
    model = bert()
    reference = ReferenceWeights(model)
    old = {name: t.clone() for name, t in reference.tensors.items()}
    shift_weights(model)
    reference.update_ema(decay)
    live = dict(model.named_parameters())
    for name, tensor in reference.tensors.items():
        expected = decay * old[name] + (1 - decay) * live[name].detach()
        if decay in (0.0, 1.0):
            assert torch.equal(tensor, live[name] if decay == 0.0 else old[name]), name
        else:
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(tensor, old[name])


def test_update_ema_in_bfloat16() -> None:
    model = bert()
    reference = ReferenceWeights(model, dtype=torch.bfloat16)
    old = {name: t.float() for name, t in reference.tensors.items()}
    shift_weights(model)
    reference.update_ema(0.5)
    for name, param in model.named_parameters():
        tensor = reference.tensors[name]
        assert tensor.dtype == torch.bfloat16
        expected = 0.5 * old[name] + 0.5 * param.detach()
        torch.testing.assert_close(tensor.float(), expected, rtol=1e-2, atol=1e-2)


def test_frozen_parameters_are_shared_not_copied() -> None:
    model = bert().eval()
    model.bert.embeddings.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == 5  # word, position, token type, LayerNorm weight and bias
    reference = ReferenceWeights(model)
    assert set(reference.names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not frozen & set(reference.tensors)
    assert len(reference.live) == len(reference.names)
    # The reference reads frozen weights from the live module at call time.
    snapshot = copy.deepcopy(model)
    shift_weights(model)  # trainable weights move: the reference keeps its copy
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(2.0)
        snapshot.bert.embeddings.word_embeddings.weight.mul_(2.0)
        inputs = batch()
        assert torch.equal(reference.forward(inputs).logits, snapshot(**inputs).logits)


def test_tied_weights_follow_the_reference() -> None:
    """GPT-2's lm_head is tied to wte: the reference's head must use the reference wte."""
    model = gpt2().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    reference = ReferenceWeights(model)
    assert "transformer.wte.weight" in reference.names
    assert "lm_head.weight" not in reference.names
    snapshot = copy.deepcopy(model)
    shift_weights(model)
    inputs = batch()
    with torch.no_grad():
        got = reference.forward(inputs).logits
        expected = snapshot(**inputs).logits
        # What an untied reference would give: old body, live (moved) head.
        body = reference.forward({**inputs, "output_hidden_states": True}).hidden_states[-1]
        untied = body @ model.lm_head.weight.T
    assert torch.equal(got, expected)
    assert not torch.allclose(untied, expected)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bfloat16_storage_halves_the_memory_and_stays_close() -> None:
    model = bert().eval()
    full = ReferenceWeights(model)
    half = ReferenceWeights(model, dtype=torch.bfloat16)
    for name, tensor in half.tensors.items():
        assert tensor.dtype == torch.bfloat16
        assert tensor.element_size() == 2
        assert torch.equal(tensor, full.tensors[name].to(torch.bfloat16))
    assert 2 * sum(t.nbytes for t in half.tensors.values()) == sum(
        t.nbytes for t in full.tensors.values()
    )
    inputs = batch()
    with torch.no_grad():
        exact = full.forward(inputs).logits
        approx = half.forward(inputs).logits.float()
    assert exact.abs().max() > 0.5
    torch.testing.assert_close(approx, exact, rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_state_dict_round_trip_through_a_weights_only_checkpoint() -> None:
    model = bert()
    reference = ReferenceWeights(model)
    shift_weights(model)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    other_model = bert(seed=3)
    other = ReferenceWeights(other_model)
    pointers = {name: t.data_ptr() for name, t in other.tensors.items()}
    other.load_state_dict(state)
    for name, tensor in reference.tensors.items():
        assert torch.equal(other.tensors[name], tensor)
        assert other.tensors[name].data_ptr() == pointers[name]  # loaded in place
    other_model.load_state_dict(model.state_dict())
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(other.forward(inputs).logits, reference.forward(inputs).logits)


def test_load_state_dict_rejects_other_names() -> None:
    reference = ReferenceWeights(nn.Linear(3, 2))
    state = reference.state_dict()
    with pytest.raises(
        KeyError,
        match=r"reference weights do not match the model: missing \['bias'\], unexpected \[\]",
    ):
        reference.load_state_dict({"weight": state["weight"]})
    with pytest.raises(KeyError, match=r"missing \[\], unexpected \['extra'\]"):
        reference.load_state_dict({**state, "extra": torch.zeros(1)})


def test_wrappers_are_unwrapped_and_names_are_the_inner_model_s() -> None:
    inner = nn.Linear(3, 2)
    outer = wrapped(wrapped(inner))
    assert unwrap_model(outer) is inner
    reference = ReferenceWeights(outer)
    assert reference.model is inner
    assert reference.names == ["weight", "bias"]


def test_a_model_without_trainable_parameters_is_rejected() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no trainable parameters"):
        ReferenceWeights(model)


# ----------------------------------------------------------------------------- logits and masks
def test_logits_mask_classification_logits_need_none() -> None:
    logits = torch.zeros(3, 4)
    assert logits_mask({"attention_mask": torch.ones(3, 6)}, logits) is None
    assert logits_mask({}, logits) is None


def test_logits_mask_from_the_attention_mask() -> None:
    logits = torch.zeros(2, 5, 7)
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.full((2, 5), -100)  # ignored: the attention mask wins
    mask = logits_mask({"attention_mask": attention_mask, "labels": labels}, logits)
    assert mask is not None
    assert mask.dtype == torch.bool
    assert torch.equal(mask, attention_mask.bool())


def test_logits_mask_from_labels() -> None:
    logits = torch.zeros(2, 4, 7)
    labels = torch.tensor([[5, 6, -100, -100], [-100, 1, 2, 3]])
    mask = logits_mask({"labels": labels}, logits)
    assert torch.equal(mask, labels != -100)
    # An attention mask of another shape (e.g. [B, 1, T, T]) is not used; the labels are.
    odd = torch.ones(2, 1, 4, 4)
    assert torch.equal(
        logits_mask({"attention_mask": odd, "labels": labels}, logits), labels != -100
    )


def test_logits_mask_without_mask_or_labels() -> None:
    logits = torch.zeros(2, 4, 7)
    assert logits_mask({}, logits) is None
    assert logits_mask({"labels": torch.tensor([1, 2])}, logits) is None  # [B] labels


def test_extract_logits() -> None:
    logits = torch.randn(2, 3)
    assert extract_logits(logits) is logits
    assert extract_logits(SimpleNamespace(logits=logits)) is logits
    assert extract_logits({"logits": logits, "loss": 0.0}) is logits
    assert extract_logits((logits, 1), logits_fn=lambda out: out[0]) is logits
    output = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)
    assert extract_logits(output) is logits


@pytest.mark.parametrize(
    ("output", "kind"),
    [((torch.zeros(2),), "tuple"), ({"scores": torch.zeros(2)}, "dict"), (None, "NoneType")],
)
def test_extract_logits_error_names_the_output_and_logits_fn(output: Any, kind: str) -> None:
    message = (
        rf"cannot find logits in a model output of type {kind}: the model must return a Tensor "
        r"or an object with a \.logits Tensor; otherwise pass logits_fn="
    )
    with pytest.raises(TypeError, match=message):
        extract_logits(output)
    with pytest.raises(TypeError, match="logits_fn="):
        extract_logits(torch.zeros(2), logits_fn=lambda out: out.tolist())


def test_call_model_dispatches_mappings_sequences_and_tensors() -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    class Recorder(nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> int:
            seen.append((args, kwargs))
            return len(seen)

    model, x = Recorder(), torch.zeros(1)
    call_model(model, {"a": x})
    call_model(model, (x, 1))
    call_model(model, [x])
    call_model(model, x)
    assert seen == [((), {"a": x}), ((x, 1), {}), ((x,), {}), ((x,), {})]
