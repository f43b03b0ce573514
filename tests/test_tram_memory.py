"""TRAM holds no copy of the first pass's logits, and measures the same d as when it did.

TRAM used to keep each recorded forward's logits (detached) until ``first_step`` and run the
reference forward there: a ``B x T x vocabulary`` tensor held through the whole first backward
(0.30 x the parameters of the benchmarks' small Llama). It now runs the reference forward at the
start of each recorded forward and measures d at its end (``tram/_recording.py``). The old path is
still there for models with sharded parameters (``measure_during_forward = False``); it is the
oracle here: d and the weights must not change, to float tolerance, whichever path measures.
"""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tram
from tram import _recording

transformers = pytest.importorskip("transformers")

from tests.helpers import tiny_bert, tiny_llama_config  # noqa: E402

VOCAB = 97
STEPS = 3
TARGETS = ["noise", "pretrained", "previous", "ema"]
OPTIONS: dict[str, dict[str, Any]] = {
    "noise": {"sigma": 0.3, "seed": 3},  # given: both runs of a comparison draw alike
    "pretrained": {},
    "previous": {},
    "ema": {"ema_decay": 0.8},
}


def tiny_llama(*, seed: int = 0, dropout: float = 0.1) -> nn.Module:
    """A two-layer, 32-wide ``LlamaForCausalLM`` from a config (attention dropout on)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=VOCAB,
        dropout=dropout,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).train()


class SoftCapped(nn.Module):
    """A causal LM whose logits are post-processed: soft-capped, ``c * tanh(z / c)`` (Gemma 2)."""

    def __init__(self, seed: int = 0, cap: float = 2.5) -> None:
        super().__init__()
        self.lm = tiny_llama(seed=seed)
        self.cap = cap

    def forward(self, **batch: Tensor) -> Any:
        labels = batch.pop("labels")
        logits = self.lm(**batch).logits
        logits = self.cap * torch.tanh(logits / self.cap)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def lm_batch(seed: int) -> dict[str, Tensor]:
    """Right padding on two of three rows, labels -100 there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def bert_batch(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (4,))}


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], dict[str, Tensor]]]] = {
    "llama": (tiny_llama, lm_batch),
    "bert": (lambda: tiny_bert(dropout=0.1).train(), bert_batch),
    "softcapped": (SoftCapped, lm_batch),
}


def run(
    model: nn.Module,
    make_batch: Callable[[int], dict[str, Tensor]],
    trust_region: str,
    *,
    during_forward: bool,
    micro_batches: int = 1,
    autocast: bool = False,
    **options: Any,
) -> tram.TRAM:
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)
    options = {**OPTIONS[trust_region], **options}
    optimizer = tram.TRAM(base, model, trust_region=trust_region, **options)
    if not during_forward:  # the path that keeps the logits until first_step
        optimizer.recorder.measure_during_forward = False
    torch.manual_seed(1234)  # dropout masks
    for step in range(STEPS):
        batches = [make_batch(10 * step + k) for k in range(micro_batches)]

        def closure(batches: list[dict[str, Tensor]] = batches) -> Tensor:
            optimizer.zero_grad()
            total = torch.zeros(())
            for batch in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = model(**batch).loss / len(batches)
                loss.backward()
                total = total + loss.detach()
            return total

        optimizer.step(closure)
    return optimizer


@pytest.mark.parametrize("trust_region", TARGETS)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize(
    "scenario", ["plain", "accumulation", "bf16 autocast", "no replay"], ids=str
)
def test_d_is_the_d_measured_from_kept_logits(
    model_name: str, trust_region: str, scenario: str
) -> None:
    make_model, make_batch = MODELS[model_name]
    options: dict[str, Any] = {
        "plain": {},
        "accumulation": {"micro_batches": 3},
        "bf16 autocast": {"autocast": True},
        "no replay": {"replay_dropout": False},
    }[scenario]
    model = make_model()
    twin = copy.deepcopy(model)
    new = run(model, make_batch, trust_region, during_forward=True, **options)
    old = run(twin, make_batch, trust_region, during_forward=False, **options)
    assert len(new.radius_history) == STEPS
    # d > 0 after the first step for every target, so the comparison is not of zeros.
    assert min(new.radius_history[1:]) > 1e-6
    assert new.radius_history == pytest.approx(old.radius_history, rel=1e-5, abs=1e-9)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def holds_memory_at(obj: object, address: int) -> bool:
    """Whether ``obj`` is a tensor whose data starts at ``address``. Tensors without storage
    (the fake tensors that earlier ``torch.compile`` tests leave to the garbage collector)
    hold nothing."""
    if not issubclass(type(obj), Tensor) or obj.numel() == 0:  # type: ignore[attr-defined]
        return False
    try:
        return obj.data_ptr() == address  # type: ignore[attr-defined]
    except RuntimeError:
        return False


@pytest.mark.parametrize("during_forward", [True, False], ids=["in the forward", "kept"])
@pytest.mark.parametrize("trust_region", ["noise", "pretrained"])
def test_the_logits_are_not_held_through_the_backward(
    during_forward: bool, trust_region: str
) -> None:
    """Once the model's output is dropped, no tensor holds its logits' memory at the backward
    (the log-softmax of the loss is saved for it, but not the logits)."""
    model = tiny_llama(dropout=0.0)
    optimizer = tram.TRAM(torch.optim.AdamW(model.parameters()), model, trust_region=trust_region)
    optimizer.recorder.measure_during_forward = during_forward
    batch = lm_batch(0)
    alive_at_backward: list[bool] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        output = model(**batch)
        address = output.logits.data_ptr()
        loss = output.loss
        del output
        gc.collect()
        alive_at_backward.append(any(holds_memory_at(obj, address) for obj in gc.get_objects()))
        loss.backward()
        return loss

    optimizer.step(closure)
    # First pass (recorded), second pass (never recorded).
    assert alive_at_backward == [not during_forward, False]
    assert optimizer.last_radius is not None


def test_records_between_the_first_pass_and_first_step_are_d_only() -> None:
    model = tiny_llama()
    optimizer = tram.TRAM(torch.optim.AdamW(model.parameters()), model, sigma=0.2)
    with optimizer.first_pass():
        for seed in (1, 2):
            model(**lm_batch(seed)).loss.backward()
    records = list(optimizer._records)
    assert len(records) == 2
    # [d, tokens] per forward: two numbers, never a logits-sized tensor.
    assert all(
        isinstance(r, Tensor) and r.shape == (2,) and r.dtype == torch.float32 for r in records
    )
    assert optimizer.first_step()
    weighted = sum(float(d * n) for d, n in records) / sum(float(n) for _, n in records)
    assert optimizer.last_radius == pytest.approx(weighted, rel=1e-6)
    assert optimizer.last_radius > 0
    optimizer.zero_grad()
    model(**lm_batch(1)).loss.backward()
    optimizer.second_step()


def test_a_failed_first_pass_rolls_the_noise_generator_back() -> None:
    """The reference forward drew noise at the start of the failed forward; the next step draws
    what it would have drawn had the failed step never run."""
    radii = []
    for fail in (False, True):
        model = tiny_llama(dropout=0.0)
        optimizer = tram.TRAM(torch.optim.AdamW(model.parameters()), model, sigma=0.2)
        if fail:

            def failing(optimizer: tram.TRAM = optimizer, model: nn.Module = model) -> Tensor:
                optimizer.zero_grad()
                model(**lm_batch(5))
                raise RuntimeError("failed after the forward")

            with pytest.raises(RuntimeError, match="failed after"):
                optimizer.step(failing)
        batch = lm_batch(6)

        def closure(
            batch: dict[str, Tensor] = batch,
            optimizer: tram.TRAM = optimizer,
            model: nn.Module = model,
        ) -> Tensor:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        optimizer.step(closure)
        radii.append(optimizer.last_radius)
    assert radii[1] == radii[0]


def test_the_divergence_keeps_at_most_max_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks grow past _CHUNK_ELEMENTS when there would be more than _MAX_CHUNKS of them."""
    calls: list[int] = []
    forward_kl_rows = _recording.forward_kl_rows

    def counted(target: Tensor, logits: Tensor) -> Tensor:
        calls.append(logits.shape[0])
        return forward_kl_rows(target, logits)

    monkeypatch.setattr(_recording, "forward_kl_rows", counted)
    monkeypatch.setattr(_recording, "_CHUNK_ELEMENTS", 5 * 7)  # 5 rows of 7 classes
    monkeypatch.setattr(_recording, "_MAX_CHUNKS", 4)
    g = torch.Generator().manual_seed(0)
    target, logits = torch.randn(30, 7, generator=g), torch.randn(30, 7, generator=g)
    divergence = tram.divergence.get_divergence("forward_kl")
    with torch.no_grad():
        value = _recording.chunked_mean_divergence(
            divergence, target, logits, None, forward_kl=True
        )
    assert calls == [8, 8, 8, 6]  # 5 rows would make 6 chunks: ceil(30 / 4) = 8 rows
    torch.testing.assert_close(value, divergence(target, logits))


@pytest.mark.parametrize("reference", ["pretrained", "previous", "ema", "TRPO", "MESA"])
def test_weight_references_refuse_sharded_parameters(
    one_process_group: None, reference: str
) -> None:
    """FSDP2 gathers the live parameters over the ones functional_call substitutes: a reference
    forward would run the live weights and d would be 0 at every step. Refused up front."""
    import torch.distributed as dist

    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not (dist.is_available() and hasattr(fsdp, "fully_shard")):
        pytest.skip("FSDP2 is not available")
    from torch.distributed.device_mesh import init_device_mesh

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for layer in (model[0], model[2], model):
        fsdp.fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
    if reference in ("TRPO", "MESA"):
        build = functools.partial(getattr(tram, reference), model)
    else:
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        build = functools.partial(tram.TRAM, base, model, trust_region=reference)
    with pytest.raises(ValueError, match=r"sharded \(FSDP, FSDP2 or DeepSpeed\)"):
        build()


def test_models_with_sharded_parameters_keep_their_logits_until_first_step(
    one_process_group: None,
) -> None:
    """FSDP2 gathers and scatters the parameters around its forward, which the reference
    forward must not re-enter: d is measured in first_step there. DDP replicates: in the forward."""
    import torch.distributed as dist

    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not (dist.is_available() and hasattr(fsdp, "fully_shard")):
        pytest.skip("FSDP2 is not available")
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def stepped(model: nn.Module, wrapped: nn.Module) -> tram.TRAM:
        optimizer = tram.TRAM(
            torch.optim.SGD(model.parameters(), lr=0.1), wrapped, embeddings=model[0]
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(wrapped(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        return optimizer

    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    sharded = copy.deepcopy(plain)
    fsdp.fully_shard(sharded[0], mesh=init_device_mesh("cpu", (1,)))
    fsdp.fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
    replicated = copy.deepcopy(plain)
    ddp = nn.parallel.DistributedDataParallel(replicated)
    on_sharded = stepped(sharded, sharded)
    on_ddp = stepped(replicated, ddp)
    on_plain = stepped(plain, plain)
    assert not on_sharded.recorder.measure_during_forward
    assert on_ddp.recorder.measure_during_forward
    assert on_plain.recorder.measure_during_forward
    assert on_plain.last_radius > 0
    assert on_sharded.last_radius == pytest.approx(on_plain.last_radius, rel=1e-5)
    assert on_ddp.last_radius == pytest.approx(on_plain.last_radius, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sharded_models_measure_d_under_the_recorded_forwards_autocast(
    one_process_group: None, dtype: torch.dtype
) -> None:
    """FSDP2's d is measured in first_step, outside the autocast region of the forward it
    replays: the reference forward runs under that forward's autocast state, so d and the step
    are the unsharded model's, bit for bit (bf16 through step(closure), fp16 through
    tram.scaled_step with a CPU GradScaler, which FSDP2's DTensor gradients go through)."""
    import torch.distributed as dist

    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not (dist.is_available() and hasattr(fsdp, "fully_shard")):
        pytest.skip("FSDP2 is not available")
    from torch.distributed.device_mesh import init_device_mesh

    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(6, 4, generator=generator), torch.randint(0, 3, (6,))) for _ in range(2)
    ]

    def train(sharded: bool) -> tuple[list[float], list[Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        if sharded:
            for module in (model[0], model[2], model):
                fsdp.fully_shard(module, mesh=init_device_mesh("cpu", (1,)))
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer = tram.TRAM(base, model, embeddings=model[0], sigma=0.3, seed=5)
        assert optimizer.recorder.measure_during_forward is not sharded
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        radii = []
        for x, y in batches:

            def loss_fn(x: Tensor = x, y: Tensor = y) -> Tensor:
                with torch.autocast("cpu", dtype=dtype):
                    return nn.functional.cross_entropy(model(x), y)

            def closure(loss_fn: Callable[[], Tensor] = loss_fn) -> Tensor:
                optimizer.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss

            if dtype == torch.float16:
                tram.scaled_step(optimizer, scaler, loss_fn)
            else:
                optimizer.step(closure)
            radii.append(optimizer.last_radius)
        full = [getattr(p, "full_tensor", p.detach)().detach() for p in model.parameters()]
        return radii, full

    (plain_radii, plain), (sharded_radii, sharded) = train(False), train(True)
    assert sharded_radii == plain_radii
    assert all(d > 1e-4 for d in plain_radii)
    for p, q in zip(sharded, plain, strict=True):
        assert torch.equal(p, q), (p - q).abs().max()


def test_a_sharded_root_with_its_own_parameters_gathers_the_perturbed_weights(
    one_process_group: None,
) -> None:
    """d of an FSDP2 model is measured in first_step by a forward of the model, after which
    ``fully_shard`` keeps the root's own parameters gathered. The ascent perturbs the shards, so
    they must be freed for the second pass to gather θ+ε: with only the root sharded (accelerate's
    FSDP2 default) the steps are the unsharded model's, bit for bit."""
    import torch.distributed as dist

    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not (dist.is_available() and hasattr(fsdp, "fully_shard")):
        pytest.skip("FSDP2 is not available")
    from torch.distributed.device_mesh import init_device_mesh

    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
        for _ in range(3)
    ]

    def train(sharded: bool) -> tuple[list[float], list[Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        if sharded:
            fsdp.fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer = tram.TRAM(base, model, embeddings=model[0], sigma=0.3, seed=3)
        assert optimizer.recorder.measure_during_forward is not sharded
        radii = []
        for x, y in batches:
            with optimizer.first_pass():
                torch.nn.functional.cross_entropy(model(x), y).backward()
            assert optimizer.first_step()
            radii.append(optimizer.last_radius)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.restore()
            optimizer.step()
            optimizer.zero_grad()
        full = [getattr(p, "full_tensor", lambda p=p: p)() for p in model.parameters()]
        return radii, [p.detach().clone() for p in full]

    (plain_radii, plain), (sharded_radii, sharded) = train(False), train(True)
    assert sharded_radii == plain_radii
    for p, q in zip(sharded, plain, strict=True):
        assert torch.equal(p, q), (p - q).abs().max()
