"""Tests for tram.noise: hook-point resolution and the scoped representation-noise hook."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tram.noise import NoiseHandle, find_input_embeddings, representation_noise, resolve_module

transformers = pytest.importorskip("transformers")

from tests.helpers import tiny_bert, tiny_gpt2, wrapped  # noqa: E402


def _bert() -> nn.Module:
    return tiny_bert(dropout=0.1, max_position_embeddings=64, initializer_range=0.02).eval()


def _gpt2() -> nn.Module:
    # GPT-2's default special tokens and dropout: only the weights matter here.
    return tiny_gpt2(dropout=0.1, n_positions=64, bos_token_id=50256, eos_token_id=50256).eval()


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return _bert()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return _gpt2()


@pytest.fixture
def batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 100, (3, 7), generator=g)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[0, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class TinyNet(nn.Module):
    def __init__(self, n_embeddings: int = 1) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(20, 8) for _ in range(n_embeddings))
        self.proj = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = sum((e(x) for e in self.embeds), torch.zeros(()))
        return self.proj(h)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- resolution


def test_finds_bert_word_embeddings(bert: nn.Module) -> None:
    assert find_input_embeddings(bert) is bert.bert.embeddings.word_embeddings


def test_finds_gpt2_wte(gpt2: nn.Module) -> None:
    assert find_input_embeddings(gpt2) is gpt2.transformer.wte


def test_finds_single_embedding_of_plain_module() -> None:
    net = TinyNet()
    assert find_input_embeddings(net) is net.embeds[0]


def test_unwraps_module_wrappers(bert: nn.Module) -> None:
    net = TinyNet()
    assert find_input_embeddings(wrapped(wrapped(net))) is net.embeds[0]
    assert find_input_embeddings(wrapped(bert)) is bert.bert.embeddings.word_embeddings
    assert find_input_embeddings(nn.DataParallel(net)) is net.embeds[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_finds_embeddings_through_peft() -> None:
    peft = pytest.importorskip("peft")
    base = _bert()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    model = peft.get_peft_model(base, config)
    assert find_input_embeddings(model) is base.bert.embeddings.word_embeddings


def test_get_input_embeddings_not_implemented_falls_back() -> None:
    class NoGetter(TinyNet):
        def get_input_embeddings(self) -> nn.Module:
            raise NotImplementedError

    net = NoGetter()
    assert find_input_embeddings(net) is net.embeds[0]


@pytest.mark.parametrize("n", [0, 2])
def test_ambiguous_or_missing_embeddings_raise(n: int) -> None:
    msg = (
        rf"Cannot find the input embeddings of TinyNet: it has no get_input_embeddings\(\) and "
        rf"{n} nn.Embedding modules \(expected exactly one\); pass module= explicitly"
    )
    with pytest.raises(ValueError, match=msg):
        find_input_embeddings(TinyNet(n))
    with pytest.raises(ValueError, match=msg):
        representation_noise(wrapped(TinyNet(n)), sigma=0.1)


def test_getter_returning_none_is_reported() -> None:
    class NoneGetter(TinyNet):
        def get_input_embeddings(self) -> None:
            return None

    with pytest.raises(ValueError, match=r"its get_input_embeddings\(\) returned no module and 2"):
        find_input_embeddings(NoneGetter(2))


def test_resolve_module_by_name_and_object() -> None:
    net = TinyNet(2)
    assert resolve_module(net, "embeds.1") is net.embeds[1]
    assert resolve_module(wrapped(net), "embeds.1") is net.embeds[1]
    assert resolve_module(wrapped(net), "module.embeds.0") is net.embeds[0]
    assert resolve_module(wrapped(net), net.embeds[1]) is net.embeds[1]
    with representation_noise(net, sigma=0.1, module="embeds.1") as handle:
        assert handle.module is net.embeds[1]
        net(torch.tensor([[1, 2]]))


def test_a_block_without_a_hooked_forward_raises() -> None:
    """Nothing noised is an error, not a clean forward passed off as a noised one: the hooked
    module never ran (another module was named), or the model is torch.compile'd and its
    graph ignores hooks added after compilation."""
    net = TinyNet(2)
    x = torch.tensor([[1, 2, 3]])
    with (
        pytest.raises(RuntimeError, match=r"no forward of the hooked Embedding ran"),
        representation_noise(net, sigma=0.1, module="embeds.1"),
    ):
        net.proj(torch.zeros(1, 8))
    compiled = torch.compile(TinyNet(), backend="aot_eager")
    clean = compiled(x)  # compiled outside any block: its graph has no hook
    with (
        pytest.raises(RuntimeError, match=r"torch.compile'd model .* \(model._orig_mod\)"),
        representation_noise(compiled, sigma=0.1, generator=_gen()),
    ):
        compiled(x)
    with representation_noise(compiled, sigma=0.1, generator=_gen()) as handle:
        noised = compiled._orig_mod(x)
    assert handle.calls == 1
    assert not torch.equal(noised, clean)


def test_resolve_module_errors() -> None:
    net = TinyNet()
    with pytest.raises(
        ValueError, match=r"Invalid module name: 'embeds\.3' is not a submodule of "
    ):
        resolve_module(wrapped(net), "embeds.3")
    with pytest.raises(ValueError, match="Invalid module: the given Embedding is not a submodule"):
        resolve_module(net, nn.Embedding(3, 8))
    with pytest.raises(ValueError, match="Invalid module: the given Embedding is not a submodule"):
        representation_noise(net, sigma=0.1, module=nn.Embedding(3, 8))
    with pytest.raises(
        TypeError, match=r"module must be an nn\.Module, a str or None, but got int"
    ):
        resolve_module(net, 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf")])
def test_invalid_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match=rf"Invalid sigma: {sigma}"):
        representation_noise(TinyNet(), sigma=sigma)


def test_invalid_distribution() -> None:
    msg = r"Invalid distribution: 'normal'\. Expected 'gaussian' or 'uniform'"
    with pytest.raises(ValueError, match=msg):
        representation_noise(TinyNet(), sigma=0.1, distribution="normal")  # type: ignore[arg-type]


def test_invalid_generator() -> None:
    with pytest.raises(
        TypeError,
        match=r"generator must be a torch\.Generator, a tram\.noise\.NoiseStream or None, "
        r"but got int",
    ):
        representation_noise(TinyNet(), sigma=0.1, generator=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the hook


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_noise_only_inside_block(name: str, request: pytest.FixtureRequest, batch: dict) -> None:
    model = request.getfixturevalue(name)
    emb = find_input_embeddings(model)
    with torch.no_grad():
        clean = model(**batch).logits
        with representation_noise(model, sigma=0.1, generator=_gen()) as handle:
            assert handle.active
            noised = model(**batch).logits
        after = model(**batch).logits
    assert isinstance(handle, NoiseHandle)
    assert handle.calls == 1  # the tied GPT-2 lm_head does not call wte's forward
    assert not handle.active
    assert (noised - clean).abs().max() > 1e-4
    assert torch.equal(after, clean)
    assert len(emb._forward_hooks) == 0


def _forward_then_raise(model: nn.Module, batch: dict, handles: list[NoiseHandle]) -> None:
    with representation_noise(model, sigma=0.1) as handle:
        handles.append(handle)
        model(**batch)
        raise RuntimeError("boom")


def test_hook_removed_when_block_raises(bert: nn.Module, batch: dict) -> None:
    emb = find_input_embeddings(bert)
    handles: list[NoiseHandle] = []
    with torch.no_grad():
        clean = bert(**batch).logits
        with pytest.raises(RuntimeError, match="boom"):
            _forward_then_raise(bert, batch, handles)
        after = bert(**batch).logits
    (handle,) = handles
    assert handle.calls == 1
    assert not handle.active
    assert len(emb._forward_hooks) == 0
    assert torch.equal(after, clean)


def test_hook_equals_inputs_embeds_with_same_noise(bert: nn.Module, batch: dict) -> None:
    emb = bert.bert.embeddings.word_embeddings
    sigma = 0.1
    with torch.no_grad():
        with representation_noise(bert, sigma=sigma, generator=_gen(7)):
            hooked = bert(**batch).logits
        z = torch.randn((*batch["input_ids"].shape, 32), generator=_gen(7)) * sigma
        reference = bert(
            inputs_embeds=emb(batch["input_ids"]) + z, attention_mask=batch["attention_mask"]
        ).logits
    assert (hooked - reference).abs().max() < 1e-6


def test_caller_batch_unchanged(bert: nn.Module, batch: dict) -> None:
    before = {k: v.clone() for k, v in batch.items()}
    keys = list(batch)
    with torch.no_grad(), representation_noise(bert, sigma=0.5, generator=_gen()):
        bert(**batch)
    assert list(batch) == keys
    for k, v in batch.items():
        assert torch.equal(v, before[k])


def test_module_output_not_modified_in_place() -> None:
    seen: list[Tensor] = []
    net = TinyNet()
    # A hook registered first sees (and keeps) the embedding output before the noise is added.
    net.embeds[0].register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.arange(6).view(2, 3)
    with torch.no_grad():
        clean = net.embeds[0](x)
        with representation_noise(net, sigma=1.0, generator=_gen()):
            net(x)
    assert torch.equal(seen[-1], clean)


def test_sigma_zero_is_identity_and_draws_nothing(bert: nn.Module, batch: dict) -> None:
    g = _gen(3)
    state = g.get_state()
    with torch.no_grad():
        clean = bert(**batch).logits
        with representation_noise(bert, sigma=0.0, generator=g) as handle:
            out = bert(**batch).logits
    assert handle.calls == 1
    assert torch.equal(out, clean)
    assert torch.equal(g.get_state(), state)


def _zero_embedding(dim: int = 128) -> tuple[nn.Embedding, Tensor]:
    emb = nn.Embedding(1, dim)
    nn.init.zeros_(emb.weight)
    return emb, torch.zeros(64, 32, dtype=torch.long)


def test_gaussian_std_is_sigma() -> None:
    emb, x = _zero_embedding()
    with torch.no_grad(), representation_noise(emb, sigma=0.3, generator=_gen()):
        z = emb(x)
    assert abs(z.mean().item()) < 0.005
    assert z.std().item() == pytest.approx(0.3, rel=0.01)
    assert z.abs().max().item() > 0.3 * 3.5  # unbounded, unlike the uniform


def test_uniform_bounded_by_sigma() -> None:
    emb, x = _zero_embedding()
    with (
        torch.no_grad(),
        representation_noise(emb, sigma=0.3, distribution="uniform", generator=_gen()),
    ):
        z = emb(x)
    assert z.abs().max().item() <= 0.3
    assert z.min().item() < -0.29
    assert z.max().item() > 0.29
    assert z.std().item() == pytest.approx(0.3 / 3**0.5, rel=0.01)


def test_same_seed_same_noise_and_fresh_noise_per_forward() -> None:
    emb, x = _zero_embedding(8)
    with torch.no_grad():
        with representation_noise(emb, sigma=1.0, generator=_gen(5)) as handle:
            a1, a2 = emb(x), emb(x)
        with representation_noise(emb, sigma=1.0, generator=_gen(5)):
            b1 = emb(x)
    assert handle.calls == 2
    assert torch.equal(a1, b1)
    assert not torch.equal(a1, a2)


def test_dtype_follows_output() -> None:
    emb, x = _zero_embedding(8)
    emb = emb.to(torch.bfloat16)
    with torch.no_grad(), representation_noise(emb, sigma=1.0, generator=_gen()):
        z = emb(x)
    assert z.dtype == torch.bfloat16
    assert z.abs().max() > 0


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_global_rng_untouched_with_generator(
    distribution: str, bert: nn.Module, batch: dict
) -> None:
    state = torch.get_rng_state()
    with (
        torch.no_grad(),
        representation_noise(
            bert,
            sigma=0.1,
            distribution=distribution,  # type: ignore[arg-type]
            generator=_gen(),
        ),
    ):
        bert(**batch)
    assert torch.equal(torch.get_rng_state(), state)


def test_global_rng_used_without_generator() -> None:
    emb, x = _zero_embedding(8)
    torch.manual_seed(11)
    with torch.no_grad(), representation_noise(emb, sigma=0.3):
        z = emb(x)
    torch.manual_seed(11)
    assert torch.equal(z, torch.randn(z.shape) * 0.3)


def test_gradients_flow_to_embedding_weight(batch: dict) -> None:
    model = _bert()
    emb = model.bert.embeddings.word_embeddings
    with representation_noise(model, sigma=0.1, generator=_gen()):
        model(**batch).logits.sum().backward()
    assert emb.weight.grad is not None
    assert emb.weight.grad.abs().sum() > 0


def test_gradient_of_additive_noise_equals_clean_gradient() -> None:
    emb = nn.Embedding(10, 4)
    x = torch.tensor([[1, 2, 2, 7]])
    (emb(x) * 3).sum().backward()
    assert emb.weight.grad is not None
    clean_grad = emb.weight.grad.clone()
    emb.weight.grad = None
    with representation_noise(emb, sigma=0.5, generator=_gen()):
        (emb(x) * 3).sum().backward()
    assert torch.equal(emb.weight.grad, clean_grad)


class TupleOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.kind = kind

    def forward(self, x: Tensor) -> Any:
        h = self.embed(x)
        extra = torch.ones(2)
        if self.kind == "tuple":
            return h, extra
        if self.kind == "list":
            return [h, extra]
        if self.kind == "namedtuple":
            return Pair(h, extra)
        if self.kind == "dict":
            return {"hidden": h}
        if self.kind == "int":
            return x
        return ()


Pair = namedtuple("Pair", ["hidden", "extra"])


class Outer(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner = TupleOut(kind)

    def forward(self, x: Tensor) -> Any:
        return self.inner(x)


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple"])
def test_sequence_output_noises_first_element(kind: str) -> None:
    model = Outer(kind)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        clean = model(x)
        with representation_noise(model, sigma=0.1, module="inner", generator=_gen()):
            out = model(x)
    assert type(out) is type(clean)
    assert len(out) == 2
    assert not torch.equal(out[0], clean[0])
    assert (out[0] - clean[0]).abs().max() < 1.0
    assert out[1] is clean[1] or torch.equal(out[1], clean[1])


@pytest.mark.parametrize(
    ("kind", "msg"),
    [
        ("dict", "representation_noise needs a tensor output, but got dict"),
        ("empty", "representation_noise got an empty tuple"),
        ("int", "representation_noise needs a floating-point output, but got dtype torch.int64"),
    ],
)
def test_unsupported_output_raises(kind: str, msg: str) -> None:
    model = Outer(kind)
    handle_module = model.inner
    with (
        pytest.raises(TypeError, match=msg),
        representation_noise(model, sigma=0.1, module=handle_module),
    ):
        model(torch.tensor([[1, 2]]))
    assert len(handle_module._forward_hooks) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_model_gives_device_independent_noise() -> None:
    emb, x = _zero_embedding(8)
    with torch.no_grad():
        with representation_noise(emb, sigma=1.0, generator=_gen(2)):
            on_cpu = emb(x)
        emb_cuda = emb.cuda()
        with representation_noise(emb_cuda, sigma=1.0, generator=_gen(2)):
            on_cuda = emb_cuda(x.cuda())
        g_cuda = torch.Generator(device="cuda").manual_seed(2)
        with representation_noise(emb_cuda, sigma=1.0, generator=g_cuda):
            from_cuda_gen = emb_cuda(x.cuda())
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), on_cpu)
    assert from_cuda_gen.abs().max() > 0
