"""tram with PEFT LoRA adapters, on a tiny Llama and a tiny BERT built from configs.

- SAM/TRAM train LoRA models; TRAM-θ0's copied reference holds the adapter weights only.
- :class:`tram.adapters.AdapterOff` (θ0 as the adapter-off forward, no weights) equals
  the copied reference bit for bit at step 1 (d = 0 exactly, dropout replayed) and after.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tram
from tests.helpers import counting_backend, run_example, tiny_llama_config
from tram._checkpointing import checkpoint_phase
from tram.adapters import AdapterOff
from tram.targets import ReferenceWeights

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 61


def tiny_llama(seed: int = 0, *, lora: dict[str, Any] | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, dropout=0.15))
    options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "target_modules": ["q_proj", "v_proj"]}
    options.update(lora or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(task_type="CAUSAL_LM", **options)
        return peft.get_peft_model(model, config).train()


def tiny_bert(seed: int = 0, *, lora: dict[str, Any] | None = None) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    options = {"r": 4, "lora_alpha": 12, "lora_dropout": 0.25, "target_modules": ["query", "value"]}
    options.update(lora or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(task_type="SEQ_CLS", **options)
        return peft.get_peft_model(model, config).train()


def batches(kind: str, count: int, seed: int = 7) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # padding
        if kind == "llama":
            labels = ids.masked_fill(mask == 0, -100)
        else:
            labels = torch.randint(0, 3, (3,), generator=generator)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


MODELS: dict[str, Callable[..., nn.Module]] = {"llama": tiny_llama, "bert": tiny_bert}


def make_tram(model: nn.Module, *, adapter_off: bool) -> tram.TRAM:
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.01)
    return tram.TRAM(base, model, target=AdapterOff() if adapter_off else "pretrained")


def adapter_off(model: nn.Module) -> AdapterOff:
    target = AdapterOff()
    target.bind(model)
    return target


def train(
    model: nn.Module,
    optimizer: tram.TwoPassOptimizer,
    data: list[dict[str, Tensor]],
    rng_state: Tensor | None = None,
) -> list[Tensor]:
    """step(closure) on each batch; returns the trainable weights after each step."""
    snapshots = []
    if rng_state is None:
        torch.manual_seed(1234)  # the dropout masks of training
    else:
        torch.set_rng_state(rng_state)
    for batch in data:

        def closure(batch: dict[str, Tensor] = batch) -> Tensor:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        optimizer.step(closure)
        snapshots.append(
            torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
        )
    return snapshots


# ---------------------------------------------------------------------- LoRA with tram
@pytest.mark.parametrize("kind", list(MODELS))
def test_copied_reference_holds_only_adapter_weights(kind: str) -> None:
    model = MODELS[kind]()
    optimizer = make_tram(model, adapter_off=False)
    assert isinstance(optimizer.reference, ReferenceWeights)
    names = list(optimizer.reference.state_dict())
    assert names
    assert all("lora_" in n or "modules_to_save" in n for n in names), names
    reference_numel = sum(t.numel() for t in optimizer.reference.state_dict().values())
    assert reference_numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert reference_numel < sum(p.numel() for p in model.parameters()) / 5


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["sam", "tram_noise"])
def test_lora_trains_and_base_weights_stay(kind: str, method: str) -> None:
    model = MODELS[kind]()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(trainable, lr=1e-2)
    if method == "sam":
        optimizer: tram.TwoPassOptimizer = tram.SAM(base, rho=0.05)
    else:
        optimizer = tram.TRAM(base, model, trust_region="noise", sigma=0.05)
    before = [p.detach().clone() for p in trainable]
    train(model, optimizer, batches(kind, 2))
    assert all(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True) if p.numel())
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    if method == "tram_noise":
        assert all(r > 0 for r in optimizer.radius_history)  # type: ignore[attr-defined]


PEFT_CHECKPOINTED = {
    "adapter-off": {"target": "adapter_off"},
    "tram-fisher": {"trust_region": "fisher", "sigma": 0.3, "rho": 0.05, "fisher_eta": 0.5},
}


def checkpointed_lora_run(options: dict[str, Any], mode: str | None) -> tuple[Tensor, int]:
    """Three steps of TRAM on the LoRA Llama (dropout 0.15, LoRA dropout 0.2), its layers
    checkpointed by ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` in
    earlier transformers) in ``mode`` (None: not checkpointed): the trainable weights, and how
    many forwards of the first layer's attention were recomputed."""
    model = tiny_llama()
    if mode is not None:
        kwargs = {"use_reentrant": mode == "reentrant"}
        if hasattr(model, "activation_checkpointing_enable"):
            # The name in transformers 5.x, where gradient_checkpointing_enable is deprecated.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # The embeddings are frozen: a reentrant block gives gradients to its adapters only if
        # its input requires grad (what PEFT's prepare_model_for_kbit_training also does).
        model.enable_input_require_grads()
    phases: list[Any] = []
    model.base_model.model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, output: phases.append(checkpoint_phase())
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(trainable, lr=1e-2)
    if options.get("target") == "adapter_off":
        optimizer = tram.TRAM(base, model, target=AdapterOff())
    else:
        optimizer = tram.TRAM(base, model, **options)
    weights = train(model, optimizer, batches("llama", 3))[-1]
    return weights, sum(phase is not None and phase[0] == "recomputation" for phase in phases)


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("case", list(PEFT_CHECKPOINTED))
def test_gradient_checkpointing_trains_lora_as_without_it(case: str, mode: str) -> None:
    """``model.gradient_checkpointing_enable()`` on a LoRA model: TRAM-θ0 as the adapter-off
    forward (its reference forward replays the dropout masks, LoRA's too) and TRAM-Fisher (its
    noise on the frozen embeddings, outside the checkpointed layers) take the same steps, bit
    for bit."""
    expected, none = checkpointed_lora_run(PEFT_CHECKPOINTED[case], None)
    got, recomputed = checkpointed_lora_run(PEFT_CHECKPOINTED[case], mode)
    assert none == 0
    assert recomputed == 3 * 2  # each step's two backwards
    assert torch.equal(got, expected), f"max difference {(got - expected).abs().max()}"


# ---------------------------------------------------------------------- adapter-off θ0
@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_off_reference_equals_copied_reference(kind: str) -> None:
    data = batches(kind, 4)
    copied_model, off_model = MODELS[kind](), MODELS[kind]()
    copied = make_tram(copied_model, adapter_off=False)
    off = make_tram(off_model, adapter_off=True)
    copied_weights = train(copied_model, copied, data)
    off_weights = train(off_model, off, data)
    # Step 1: θ = θ0, so the copied reference gives d = 0 exactly; the adapter-off forward too
    # (the LoRA term adds exact zeros and the dropout masks are replayed).
    assert copied.radius_history[0] == 0.0
    assert off.radius_history[0] == 0.0
    assert torch.equal(copied_weights[0], off_weights[0])
    # After: the same function (LoRA B·A·x·s with θ0's B = 0 adds an exact zero), so d and the
    # weights agree; measured bit for bit on CPU (the tolerance leaves room for other kernels).
    assert all(r > 0 for r in copied.radius_history[1:])
    assert off.radius_history == pytest.approx(copied.radius_history, rel=1e-6, abs=0)
    for a, b in zip(copied_weights, off_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "adapter_off",
    [
        pytest.param(True, id="adapter-off"),
        pytest.param(False, id="copied", marks=pytest.mark.slow),
    ],
)
def test_a_compiled_lora_model_trains_as_the_eager_one(adapter_off: bool) -> None:
    """``torch.compile`` of the PEFT model: TRAM-θ0's reference forward with the adapters
    switched off (a flag on every LoRA layer) runs another graph than the training forward, and
    dynamo, guarding on the flag, keeps them apart; d and the adapters are the eager run's, bit
    for bit, with LoRA dropout."""
    data = batches("bert", 4)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        backend, graphs = counting_backend()
        model = tiny_bert()
        called = torch.compile(model, backend=backend) if compiled else model
        trainable = [p for p in model.parameters() if p.requires_grad]
        base = torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.01)
        optimizer = tram.TRAM(base, called, target=AdapterOff() if adapter_off else "pretrained")
        runs.append((train(called, optimizer, data), optimizer.radius_history))
        assert bool(graphs) == compiled
    (eager, eager_radii), (weights, radii) = runs
    assert radii == eager_radii
    assert radii[0] == 0.0
    assert min(radii[1:]) > 0
    for a, b in zip(eager, weights, strict=True):
        assert torch.equal(a, b)


def test_adapter_off_takes_lora_on_the_embeddings() -> None:
    """PEFT starts an embedding's LoRA with lora_embedding_A = 0 and a random B (a linear
    layer's the other way round): B·A = 0 either way, so the adapter-off model is θ0 and its d
    equals the copied reference's."""
    lora = {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    data = batches("llama", 3)
    copied_model, off_model = tiny_llama(lora=lora), tiny_llama(lora=lora)
    copied = make_tram(copied_model, adapter_off=False)
    off = make_tram(off_model, adapter_off=True)
    train(copied_model, copied, data)
    train(off_model, off, data)
    assert copied.radius_history[0] == 0.0
    assert all(r > 0 for r in copied.radius_history[1:])
    assert off.radius_history == pytest.approx(copied.radius_history, rel=1e-6, abs=0)


def test_adapter_off_output_equals_theta0_output() -> None:
    model = tiny_bert()
    reference = adapter_off(model)
    theta0 = ReferenceWeights(model)
    batch = batches("bert", 1)[0]
    with torch.random.fork_rng():
        torch.manual_seed(3)
        expected = theta0.forward(batch).logits
    with torch.random.fork_rng():
        torch.manual_seed(3)
        got = reference.output((), batch).logits
    assert torch.equal(got, expected)
    with torch.random.fork_rng():  # the dropout masks matter: another seed gives other logits
        torch.manual_seed(4)
        assert not torch.equal(reference.output((), batch).logits, expected)


def test_adapter_off_reference_replays_lora_dropout() -> None:
    """Without drawing the LoRA dropout masks, the masks after the first LoRA layer shift."""
    model = tiny_llama()
    reference = adapter_off(model)
    assert reference._dropout_layers  # q_proj and v_proj of both layers
    batch = batches("llama", 1)[0]
    with torch.random.fork_rng():
        torch.manual_seed(5)
        with_adapters_at_theta0 = model(**batch).logits.detach()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        assert torch.equal(reference.output((), batch).logits, with_adapters_at_theta0)
    with torch.random.fork_rng(), torch.no_grad(), model.disable_adapter():
        torch.manual_seed(5)
        plain_off = model(**batch).logits
    assert not torch.equal(plain_off, with_adapters_at_theta0)


def test_adapter_off_checkpoint_round_trip() -> None:
    data = batches("bert", 4)
    straight_model = tiny_bert()
    straight = make_tram(straight_model, adapter_off=True)
    train(straight_model, straight, data)

    model = tiny_bert()
    optimizer = make_tram(model, adapter_off=True)
    train(model, optimizer, data[:2])
    rng_state = torch.get_rng_state()
    state = copy.deepcopy(optimizer.state_dict())
    weights = copy.deepcopy(model.state_dict())
    assert state["param_groups"][0]["tram"]["adapter_off"] is True
    assert "reference" not in state["param_groups"][0]["tram"]

    resumed_model = tiny_bert(seed=1)
    resumed_model.load_state_dict(weights)  # trained adapters: lora_B is not zero any more
    resumed = make_tram(resumed_model, adapter_off=True)
    resumed.load_state_dict(state)
    train(resumed_model, resumed, data[2:], rng_state)
    for a, b in zip(resumed_model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adapter_off_refuses_what_is_not_theta0() -> None:
    batch = batches("bert", 1)[0]
    trained = adapter_off(tiny_bert(lora={"init_lora_weights": False}))
    with pytest.raises(ValueError, match="non-zero lora factors"):
        trained.output((), batch)
    trained.load_state_dict({"adapter_off": True})  # resuming a run that used it: accepted
    trained.output((), batch)
    with pytest.raises(KeyError, match="not from an AdapterOff target"):
        trained.load_state_dict({"reference": {}})
    with pytest.raises(ValueError, match="DoRA"):
        adapter_off(tiny_llama(lora={"use_dora": True}))
    with pytest.raises(TypeError, match=r"needs a peft\.PeftModel"):
        adapter_off(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"needs a peft\.PeftModel"):
        make_tram(nn.Linear(2, 2), adapter_off=True)


def test_adapter_off_after_training_is_still_theta0() -> None:
    """Training moves the adapter; the adapter-off forward keeps giving θ0's output."""
    model = tiny_bert()
    theta0 = ReferenceWeights(model)
    reference = adapter_off(model)
    optimizer = make_tram(model, adapter_off=True)
    train(model, optimizer, batches("bert", 2))
    batch = batches("bert", 1, seed=9)[0]
    with torch.random.fork_rng():
        torch.manual_seed(2)
        expected = theta0.forward(batch).logits
    with torch.random.fork_rng():
        torch.manual_seed(2)
        assert torch.equal(reference.output((), batch).logits, expected)


def two_adapter_bert(second: dict[str, Any]) -> nn.Module:
    """The tiny BERT with adapter "default" (no LoRA dropout) active and a second adapter "b"
    added with ``second``'s LoRA options (inactive until ``set_adapter("b")``)."""
    model = tiny_bert(lora={"lora_dropout": 0.0})
    options = {"r": 4, "lora_alpha": 12, "lora_dropout": 0.25, "target_modules": ["query", "value"]}
    options.update(second)
    torch.manual_seed(99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("b", peft.LoraConfig(task_type="SEQ_CLS", **options))
    return model.train()


def every_adapter_tram(model: nn.Module, *, adapter_off: bool) -> tram.TRAM:
    """TRAM-θ0 over the weights of every adapter (active or not), as a user who switches
    adapters during training builds it."""
    weights = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
    base = torch.optim.AdamW(weights, lr=3e-2, weight_decay=0.01)
    return tram.TRAM(base, model, target=AdapterOff() if adapter_off else "pretrained")


def test_adapter_off_follows_an_adapter_set_active_after_it_was_built() -> None:
    """``set_adapter("b")`` after TRAM is built: b's LoRA dropout (p = 0.25, where the adapter
    active at construction has none) is replayed by the reference from then on, so d and the
    weights are the copied θ0's, d = 0 exactly at the first step. Checked when b was active at
    construction only, the reference skipped b's dropout draws: every later mask shifted and d
    measured dropout (1.5e-5 at the first step)."""
    data = batches("bert", 3)
    runs = []
    for adapter_off in (False, True):
        model = two_adapter_bert({})
        optimizer = every_adapter_tram(model, adapter_off=adapter_off)
        model.set_adapter("b")
        runs.append((train(model, optimizer, data), optimizer.radius_history))
    (copied_weights, copied_radii), (off_weights, off_radii) = runs
    assert copied_radii[0] == 0.0
    assert off_radii[0] == 0.0
    assert min(copied_radii[1:]) > 0
    assert off_radii == pytest.approx(copied_radii, rel=1e-6, abs=0)
    for a, b in zip(copied_weights, off_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adapter_off_refuses_a_trained_adapter_set_active_after_it_was_built() -> None:
    """An adapter with non-zero factors (a loaded one) made active after TRAM is built is
    refused at the next step, as when it is active at construction, and again at every retry:
    TRAM's rollback of the failed pass restores the target's state, which carries the refusal.
    (Before, d was measured against the base model, and a retry went through.)"""
    model = two_adapter_bert({"init_lora_weights": False})
    optimizer = every_adapter_tram(model, adapter_off=True)
    train(model, optimizer, batches("bert", 1))  # "default": at its initialisation
    model.set_adapter("b")
    weights = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        with pytest.raises(ValueError, match="adapter 'b' had non-zero lora factors"):
            train(model, optimizer, batches("bert", 1, seed=8))
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))

    loaded = every_adapter_tram(tiny_bert(lora={"init_lora_weights": False}), adapter_off=True)
    for _ in range(2):  # active at construction: refused at every retry too
        with pytest.raises(ValueError, match="adapter 'default' had non-zero lora factors"):
            train(loaded.target.model, loaded, batches("bert", 1))


def test_adapter_off_checks_an_adapter_set_active_on_a_step_without_d() -> None:
    """With ``radius_every=2`` the step after ``set_adapter("b")`` measures no d and trains b
    from B = 0: b is checked at that step's base step, before its update, so the next measured
    step takes it (as the copied θ0 does) instead of refusing its trained factors."""
    data = batches("bert", 3)
    runs = []
    for adapter_off in (False, True):
        model = two_adapter_bert({})
        weights = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
        base = torch.optim.AdamW(weights, lr=3e-2, weight_decay=0.01)
        target = AdapterOff() if adapter_off else "pretrained"
        optimizer = tram.TRAM(base, model, target=target, radius_every=2)
        torch.manual_seed(1234)
        train(model, optimizer, data[:1], torch.get_rng_state())
        model.set_adapter("b")
        b_factor = next(p for n, p in model.named_parameters() if ".lora_B.b." in n)
        train(model, optimizer, data[1:2], torch.get_rng_state())  # no d; b's first update
        assert torch.count_nonzero(b_factor) > 0
        train(model, optimizer, data[2:], torch.get_rng_state())
        runs.append(optimizer.radius_history)
    copied, off = runs
    assert len(copied) == 2
    assert copied[1] > 0
    assert off == pytest.approx(copied, rel=1e-6, abs=0)


def test_adapter_off_resumes_across_adapter_switches() -> None:
    """The checkpoint carries the adapters checked: a run resumed with adapter b active that
    switches back to the trained "default" goes on bit for bit, where a marker alone would
    refuse "default" (its factors are no longer zero)."""
    data = batches("bert", 5)

    def switched(model: nn.Module, optimizer: tram.TRAM, steps: range) -> None:
        for index in steps:
            model.set_adapter("b" if index in (2, 3) else "default")
            train(model, optimizer, [data[index]], torch.get_rng_state())

    torch.manual_seed(1234)
    straight_model = two_adapter_bert({})
    straight = every_adapter_tram(straight_model, adapter_off=True)
    torch.manual_seed(1234)
    switched(straight_model, straight, range(5))

    model = two_adapter_bert({})
    optimizer = every_adapter_tram(model, adapter_off=True)
    torch.manual_seed(1234)
    switched(model, optimizer, range(3))
    rng_state = torch.get_rng_state()
    state = copy.deepcopy(optimizer.state_dict())
    weights = copy.deepcopy(model.state_dict())
    assert state["param_groups"][0]["tram"]["not_initial"] is None

    resumed_model = two_adapter_bert({})
    resumed_model.load_state_dict(weights)
    resumed_model.set_adapter("b")
    resumed = every_adapter_tram(resumed_model, adapter_off=True)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng_state)
    switched(resumed_model, resumed, range(3, 5))
    assert resumed.radius_history == straight.radius_history[3:]
    for a, b in zip(resumed_model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adapter_off_refuses_a_layer_merged_after_it_was_bound() -> None:
    model = tiny_bert()
    reference = adapter_off(model)
    batch = batches("bert", 1)[0]
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        reference.output((), batch)
    model.unmerge_adapter()
    reference.output((), batch)


@pytest.mark.slow
def test_example_peft_lora_fine_tunes_minilm() -> None:
    stdout = run_example("peft_lora.py", None, "--model=minilm")
    assert "reference: adapter_off, holds 0.00 MiB" in stdout
    assert "step   2" in stdout


@pytest.mark.parametrize("kind", list(MODELS))
def test_previous_reference_holds_the_adapters_before_each_base_step(kind: str) -> None:
    """TRAM-θt−1 on LoRA: the snapshot is of the trainable (adapter) weights only, and after a
    step it equals them as they were before that step's base update; frozen weights are read
    from the live model, never copied."""
    model = MODELS[kind]()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    base = torch.optim.AdamW(list(trainable.values()), lr=3e-2, weight_decay=0.01)
    optimizer = tram.TRAM(base, model, trust_region="previous")
    assert isinstance(optimizer.reference, ReferenceWeights)
    assert list(optimizer.reference.state_dict()) == list(trainable)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable), list(trainable)
    for batch in batches(kind, 2, seed=19):
        before = {n: p.detach().clone() for n, p in trainable.items()}
        train(model, optimizer, [batch])
        snapshot = optimizer.reference.state_dict()
        assert all(torch.equal(snapshot[n], before[n]) for n in trainable)
        assert any(not torch.equal(snapshot[n], p) for n, p in trainable.items())
    assert optimizer.radius_history[0] == 0.0  # θ1 against θ0 at the first step: d = 0
