"""Machinery of the step-cost benchmarks (issue 6, part 1): models, methods, timers, memory.

``make bench`` (``pytest benchmarks --benchmark-only -p no:cacheprovider``) runs everything in
one process. Per model, the timing tests run first, in blocks: each block times every method for
a few rounds, so the methods are measured side by side and interleaved, and drift in the load of
the machine touches them alike. The memory tests of that model follow. Then the next model.

All methods of one model share one model instance (built from a config, no hub; dropout 0 and a
fixed seeded batch, so every step does the same work); each method has its own base ``AdamW``.
The model's weights drift a little under the optimizers' steps, which changes no cost.

How memory is measured (see ``README.md``):

- **held**: the bytes the wrapper keeps between steps (weight backups, reference weights, TRAM
  records), found by walking the wrapper's attributes for tensors that are not the model's
  parameters, buffers or gradients nor the base optimizer's state; checked against the
  allocator's net growth over the wrapper's construction and first step, minus AdamW's.
- **peak transient**: the highest point above the starting level reached by the allocations of
  one steady-state step. On CUDA, ``torch.cuda.max_memory_allocated``; on CPU, which has no
  allocator statistics, the allocation and free events that the profiler
  (``profile_memory=True``) records from the CPU allocator, in time order, summed.
  extra = held + peak transient − AdamW's peak transient.
- **allocations after the first step**: a ``TorchDispatchMode`` that sees every aten op of two
  steady-state steps and records each output whose storage is new, tagged with the region it ran
  in: the caller's closure, the base optimizer's step, a model forward run by the wrapper, the
  divergence, or the wrapper's own code. The wrapper's own code must allocate nothing
  parameter-sized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from step_timing import step_timer  # benchmarks/ is on sys.path: pytest's rootdir conftest
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import tram
from tram import _recording as recording_module
from tram.adapters import AdapterOff

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

LR = 2e-5
WEIGHT_DECAY = 0.01
BATCH_SIZE = 8
SEQ_LEN = 64

MODELS: dict[str, str] = {
    "minilm_bert": "MiniLM-sized BERT for sequence classification (6 x 384, vocab 30522)",
    "small_llama": "small Llama causal LM (6 x 384, vocab 8192, tied embeddings)",
    "small_llama_lora": "the small Llama with PEFT LoRA r=8 on q/k/v/o_proj, base weights frozen",
}

LORA_RANK = 8
LORA_ALPHA = 16
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# Method name -> label in the tables. AdamW first: the memory baseline.
METHODS: dict[str, str] = {
    "adamw": "AdamW",
    "sam": "SAM",
    "peer_sam": "pytorch_optimizer.SAM",
    "asam": "ASAM",
    "fisher_sam": "FisherSAM",
    "tram_x": "TRAM-x",
    "tram_theta0": "TRAM-θ0",
    "tram_theta0_bf16": "TRAM-θ0 (bf16 reference)",
    "tram_previous": "TRAM-θt−1",
    "tram_fisher": "TRAM-Fisher",
    "r3f": "AdamW + R3F",
    "sam_every4": "SAM, ascent_every=4",
    "tram_x_every4": "TRAM-x, ascent_every=4",
    "tram_x_radius4": "TRAM-x, radius_every=4",
    "tram_theta0_radius4": "TRAM-θ0, radius_every=4",
    "tram_x_radius8": "TRAM-x, radius_every=8",
    "tram_theta0_radius8": "TRAM-θ0, radius_every=8",
    "tram_adapter_off": "TRAM-θ0 (adapter off)",
    "tram_adapter_off_radius4": "TRAM-θ0 (adapter off), radius_every=4",
}

PEFT_ONLY = ("tram_adapter_off", "tram_adapter_off_radius4")
"""Methods that need a PEFT LoRA model (:class:`tram.adapters.AdapterOff`)."""

MODEL_METHODS: dict[str, tuple[str, ...]] = {
    name: tuple(m for m in METHODS if m not in PEFT_ONLY) for name in MODELS
}
# LoRA: the rows of its target (TRAM amortised ≤ 1.15 × SAM, SAM ≤ 2.05 × AdamW), every-step
# TRAM and ASAM (the same ascent form as TRAM) beside them for the breakdown.
MODEL_METHODS["small_llama_lora"] = (
    "adamw",
    "sam",
    "asam",
    "tram_x",
    "tram_x_radius4",
    "tram_theta0",
    "tram_theta0_radius4",
    "tram_x_radius8",
    "tram_theta0_radius8",
    "tram_adapter_off",
    "tram_adapter_off_radius4",
)

LARGE_ALLOCATION_BYTES = 64 * 1024
"""An allocation of the wrapper's own code at least this large counts as a failure."""


# ---------------------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("step-cost", "tram step-cost benchmarks")
    group.addoption(
        "--step-cost-blocks",
        type=int,
        default=8,
        help="interleaved blocks of timing per model (default 8)",
    )
    group.addoption(
        "--step-cost-rounds",
        type=int,
        default=1,
        help="timed rounds of each method per block (default 1)",
    )
    group.addoption(
        "--step-cost-out",
        default=str(RESULTS),
        help="directory for step_cost.json, step_cost_summary.json, step_cost.md",
    )
    group.addoption(
        "--step-cost-threads",
        type=int,
        default=int(os.environ.get("TRAM_BENCH_THREADS", "1")),
        help="torch intra-op threads on CPU (default 1, or $TRAM_BENCH_THREADS)",
    )
    group.addoption(
        "--step-cost-clock",
        choices=("auto", "cpu", "wall", "device"),
        default="auto",
        help="clock the targets are checked on: auto is the CUDA-event time (device) on CUDA, "
        "process CPU time on a CPU run with one thread, wall-clock time otherwise",
    )


def pytest_configure(config: pytest.Config) -> None:
    out = Path(config.getoption("step_cost_out"))
    out.mkdir(parents=True, exist_ok=True)
    if getattr(config.option, "benchmark_json", None) is None:
        config.option.benchmark_json = out / "step_cost.json"
    torch.set_num_threads(config.getoption("step_cost_threads"))
    config._step_cost_machine = {"loadavg_start": _loadavg(), "started": time.time()}  # type: ignore[attr-defined]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_name" in metafunc.fixturenames and "method" in metafunc.fixturenames:
        pairs = [(model, method) for model in MODELS for method in MODEL_METHODS[model]]
        metafunc.parametrize(
            ("model_name", "method"), pairs, ids=[f"{model}-{method}" for model, method in pairs]
        )
    elif "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", list(MODELS))
    if "block" in metafunc.fixturenames:
        blocks = metafunc.config.getoption("step_cost_blocks")
        metafunc.parametrize("block", range(blocks), ids=[f"block{b}" for b in range(blocks)])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Model by model: the timing blocks (every method in each), then the memory tests."""
    model_order = list(MODELS)
    method_order = list(METHODS)

    def key(item: pytest.Item) -> tuple[int, int, int, int]:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "model_name" not in callspec.params:
            return (len(model_order), 0, 0, 0)
        params = callspec.params
        phase = 0 if "block" in params else 1
        return (
            model_order.index(params["model_name"]),
            phase,
            params.get("block", 0),
            method_order.index(params["method"]),
        )

    items.sort(key=key)


# ---------------------------------------------------------------------------------- models
def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_model(name: str, device: torch.device) -> tuple[nn.Module, dict[str, Tensor]]:
    """A model from its config (no download) and one seeded batch of 8 x 64 tokens.

    ``small_llama_lora`` is ``small_llama`` (the same weights and batch) wrapped by
    ``peft.get_peft_model`` with LoRA adapters (r = 8, alpha = 16, dropout 0) on every attention
    projection; only the adapters train.
    """
    if name == "small_llama_lora":
        return _lora_model(device)
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    model: nn.Module
    if name == "minilm_bert":
        config = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        )
        model = BertForSequenceClassification(config)
    elif name == "small_llama":
        config = LlamaConfig(
            vocab_size=8192,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=6,
            intermediate_size=1024,
            max_position_embeddings=SEQ_LEN,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            use_cache=False,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.to(device).train()
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    input_ids = torch.randint(5, vocab, (BATCH_SIZE, SEQ_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(0, BATCH_SIZE, 2):  # padding on every other example
        attention_mask[row, SEQ_LEN - 8 * (1 + row // 2) :] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if name == "minilm_bert":
        batch["labels"] = torch.randint(0, 3, (BATCH_SIZE,), generator=generator)
    else:
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {key: value.to(device) for key, value in batch.items()}
    # Materialise the gradients once, so every optimizer starts from the same allocator state.
    model(**batch).loss.backward()
    return model, batch


def _lora_model(device: torch.device) -> tuple[nn.Module, dict[str, Tensor]]:
    import warnings

    import peft

    model, batch = build_model("small_llama", device)
    model.zero_grad(set_to_none=True)
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(LORA_MODULES),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on the config, not about the benchmark
        lora = peft.get_peft_model(model, config).train()
    lora(**batch).loss.backward()  # the adapters' gradients, as build_model does for the others
    return lora, batch


def _reset_lora_b(model: nn.Module) -> None:
    """Zero every ``lora_B``, as at PEFT's initialisation.

    The methods share one model, which the steps of the methods built before have trained;
    :class:`tram.adapters.AdapterOff` refuses adapters that are not at their initialisation
    (``lora_B = 0``) when it is bound. Zeroing them makes the adapter-off model θ0 again; the
    other methods' costs do not depend on the values of the weights.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.zero_()


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------- methods
@dataclasses.dataclass
class Runner:
    """One optimizer method on one model: what it steps, how, and what to inspect."""

    method: str
    kind: str  # "base", "wrapper", "peer" or "regularizer"
    optimizer: Any  # what the caller steps
    base: torch.optim.Optimizer  # the AdamW underneath
    owner: Any  # the object whose tensors are "extra" (wrapper, regularizer), or None
    drive: Callable[[Callable[[], Tensor]], Any]  # one optimizer step given a closure
    closure: Callable[[], Tensor]
    steps_per_call: int
    device: torch.device
    first_step_net_bytes: int | None = None
    cpu_times: list[float] = dataclasses.field(default_factory=list)
    wall_times: list[float] = dataclasses.field(default_factory=list)
    device_times: list[float] = dataclasses.field(default_factory=list)  # CUDA events; CUDA only

    def __post_init__(self) -> None:
        self.timer = step_timer(self.device)

    def run(self) -> None:
        """``steps_per_call`` optimizer steps; records their process CPU and wall-clock times,
        and on CUDA their CUDA-event time (``step_timing.py``)."""
        self.timer.start()
        for _ in range(self.steps_per_call):
            self.drive(self.closure)
        times = self.timer.stop()
        self.cpu_times.append(times["cpu"])
        self.wall_times.append(times["wall"])
        if "device" in times:
            self.device_times.append(times["device"])


def build_runner(method: str, model: nn.Module, batch: dict[str, Tensor]) -> Runner:
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    device = params[0].device
    stepped: Any = base
    owner: Any = None
    kind = "wrapper"
    steps_per_call = 1

    def task_loss() -> Tensor:
        return model(**batch).loss

    loss_fn: Callable[[], Tensor] = task_loss

    def closure() -> Tensor:
        stepped.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    def closure_step(step_closure: Callable[[], Tensor]) -> Any:
        return stepped.step(step_closure)

    drive: Callable[[Callable[[], Tensor]], Any] = closure_step

    if method == "adamw":
        kind = "base"
    elif method in ("sam", "sam_every4"):
        steps_per_call = 4 if method == "sam_every4" else 1
        stepped = tram.SAM(base, rho=0.05, ascent_every=steps_per_call)
    elif method == "asam":
        stepped = tram.ASAM(base, rho=0.5, eta=0.01)
    elif method == "fisher_sam":
        stepped = tram.FisherSAM(base, rho=0.1, eta=0.1)
    elif method.startswith("tram_"):
        options: dict[str, Any] = {
            "tram_x": {"trust_region": "noise", "sigma": 0.1},
            "tram_x_every4": {"trust_region": "noise", "sigma": 0.1, "ascent_every": 4},
            "tram_theta0": {"trust_region": "pretrained"},
            "tram_theta0_bf16": {"trust_region": "pretrained", "reference_dtype": torch.bfloat16},
            "tram_previous": {"trust_region": "previous"},
            "tram_x_radius4": {"trust_region": "noise", "sigma": 0.1, "radius_every": 4},
            "tram_theta0_radius4": {"trust_region": "pretrained", "radius_every": 4},
            "tram_x_radius8": {"trust_region": "noise", "sigma": 0.1, "radius_every": 8},
            "tram_theta0_radius8": {"trust_region": "pretrained", "radius_every": 8},
            "tram_fisher": {"trust_region": "fisher", "sigma": 0.1},
            "tram_adapter_off": {"target": AdapterOff()},
            "tram_adapter_off_radius4": {"target": AdapterOff(), "radius_every": 4},
        }[method]
        steps_per_call = options.get("ascent_every", 1) * options.get("radius_every", 1)
        if isinstance(options.get("target"), AdapterOff):
            _reset_lora_b(model)
        stepped = tram.TRAM(base, model, **options)
    elif method == "r3f":
        kind = "regularizer"
        regularizer = tram.R3F(sigma=0.1, weight=0.1, seed=0)
        owner = regularizer

        def r3f_loss() -> Tensor:  # the task loss plus the R3F penalty, one backward
            output = model(**batch)
            return output.loss + regularizer(model, batch, output.logits)

        loss_fn = r3f_loss

    elif method == "peer_sam":
        from pytorch_optimizer import SAM as PeerSAM

        kind = "peer"
        # Its documented usage: it builds the base optimizer from the class and its options;
        # the first forward-backward runs before step(), which runs the second one itself.
        stepped = PeerSAM(params, torch.optim.AdamW, rho=0.05, lr=LR, weight_decay=WEIGHT_DECAY)
        base = stepped.base_optimizer

        def peer_step(step_closure: Callable[[], Tensor]) -> Any:
            loss = step_closure()
            stepped.step(step_closure)
            return loss

        drive = peer_step
    else:
        raise ValueError(f"unknown method {method!r}")
    if kind in ("wrapper", "peer"):
        owner = stepped
    return Runner(method, kind, stepped, base, owner, drive, closure, steps_per_call, device)


# ---------------------------------------------------------------------------------- memory
def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _storage_key(tensor: Tensor) -> tuple[str, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0:
        return None
    return (str(tensor.device), storage.data_ptr())


def _excluded_storages(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[Any]:
    """Storages that are not extra: parameters, buffers, gradients, base optimizer state."""
    keys: set[Any] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        keys.add(_storage_key(tensor))
        if isinstance(tensor, nn.Parameter) and tensor.grad is not None:
            keys.add(_storage_key(tensor.grad))
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                keys.add(_storage_key(value))
    return keys


def held_tensors(owner: Any, model: nn.Module, base: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the tensors ``owner`` keeps (by attribute path), besides the shared ones.

    Walks attributes, containers and dataclasses; does not enter modules, optimizers other than
    ``owner`` or the shared ``param_groups``/``state`` (the base optimizer's).
    """
    excluded = _excluded_storages(model, base)
    seen_storages: set[Any] = set()
    seen_objects: set[int] = set()
    found: dict[str, int] = {}

    def visit(value: Any, path: str) -> None:
        if isinstance(value, Tensor):
            key = _storage_key(value)
            if key is None or key in excluded or key in seen_storages:
                return
            seen_storages.add(key)
            root = path.split(".")[0].split("[")[0]
            found[root] = found.get(root, 0) + value.untyped_storage().nbytes()
            return
        if id(value) in seen_objects:
            return
        seen_objects.add(id(value))
        if isinstance(value, (nn.Module, torch.optim.Optimizer)) and value is not owner:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                visit(k, f"{path}[key]")
                visit(v, f"{path}[{k!r}]" if isinstance(k, str) else f"{path}[]")
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                visit(v, f"{path}[]")
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            module = type(value).__module__
            if value is owner or module.startswith(("tram", "pytorch_optimizer")):
                for name, v in vars(value).items():
                    if value is owner and name in ("param_groups", "state", "defaults"):
                        continue
                    visit(v, name if value is owner else f"{path}.{name}")

    if owner is not None:
        visit(owner, "")
    return found


def _profiled_memory_events(prof: Any) -> list[tuple[int, int]]:
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            events.append((event.start_ns(), int(event.nbytes())))
    events.sort()
    return events


WINDOW = "tram_step_cost_window"


def traced_allocations(
    device: torch.device, measured: Callable[[], Any], warmup: Callable[[], Any] | None = None
) -> dict[str, int]:
    """``peak`` and ``net`` bytes allocated by ``measured()``, above the level it started at.

    CUDA: the caching allocator's statistics. CPU: the allocation and free events that the
    profiler records from the CPU allocator (``profile_memory=True``), summed in time order over
    the ``measured()`` window. The CPU allocator reports the free of a block only if the block was
    allocated while a profiler was recording, so ``warmup()`` runs first under the same profiler:
    a step before the measured one, which reallocates everything a step frees (the gradients).
    """
    if device.type == "cuda":
        if warmup is not None:
            warmup()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        measured()
        torch.cuda.synchronize(device)
        return {
            "peak": torch.cuda.max_memory_allocated(device) - start,
            "net": torch.cuda.memory_allocated(device) - start,
        }
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if warmup is not None:
            warmup()
        with record_function(WINDOW):
            measured()
    window = [
        (event.start_ns(), event.end_ns())
        for event in prof.profiler.kineto_results.events()
        if event.name() == WINDOW
    ]
    assert len(window) == 1, window
    begin, end = window[0]
    level = peak = 0
    for start_ns, nbytes in _profiled_memory_events(prof):
        if begin <= start_ns <= end:
            level += nbytes
            peak = max(peak, level)
    return {"peak": peak, "net": level}


class AllocationCounter(TorchDispatchMode):
    """Records every aten op output whose storage is new, tagged with the current region.

    Inside :meth:`excluded` (the closure, the base optimizer's step, the model's forwards) the
    mode is switched off: those allocations are not the wrapper's, and tracing them in Python
    would only slow the run down.
    """

    def __init__(self) -> None:
        super().__init__()
        self.regions = ["wrapper"]
        self.records: list[tuple[str, str, int, tuple[int, ...]]] = []

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        self.regions.append(name)
        try:
            yield
        finally:
            self.regions.pop()

    @staticmethod
    def excluded() -> contextlib.AbstractContextManager[Any]:
        return _disable_current_modes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            key = _storage_key(t)
            if key is None or key in inputs:
                continue
            inputs.add(key)
            nbytes = t.untyped_storage().nbytes()
            self.records.append((self.regions[-1], str(func), nbytes, tuple(t.shape)))
        return out


def count_allocations(runner: Runner, model: nn.Module, steps: int = 2) -> dict[str, Any]:
    """Allocations of ``steps`` steady-state steps outside the closure, the base step and the
    model's forwards: by the wrapper's own code, and by TRAM's divergence."""
    counter = AllocationCounter()
    param_sizes = {p.numel() * p.element_size() for p in model.parameters() if p.requires_grad}

    def tagged_closure() -> Tensor:
        with counter.excluded():
            return runner.closure()

    base_step = runner.base.step

    def tagged_base_step(*args: Any, **kwargs: Any) -> Any:
        with counter.excluded():
            return base_step(*args, **kwargs)

    exits: list[contextlib.ExitStack] = []

    def before_forward(*_: Any) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(counter.excluded())
        exits.append(stack)

    def after_forward(*_: Any) -> None:
        exits.pop().close()

    handles = [
        model.register_forward_pre_hook(before_forward),
        model.register_forward_hook(after_forward, always_call=True),
    ]
    # TRAM's d: the chunked mean over positions (its in-place forward KL or the divergence).
    is_tram = isinstance(runner.optimizer, tram.TRAM)
    divergence_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    divergence = recording_module.chunked_mean_divergence if is_tram else None
    if divergence is not None:

        def tagged_divergence(*args: Any, **kwargs: Any) -> Tensor:
            divergence_calls[:] = [(args, kwargs)]
            with counter.region("divergence"):
                return divergence(*args, **kwargs)

        recording_module.chunked_mean_divergence = tagged_divergence
    runner.base.step = tagged_base_step  # type: ignore[method-assign]
    try:
        with counter:
            for _ in range(steps * runner.steps_per_call):
                runner.drive(tagged_closure)
    finally:
        del runner.base.step
        for handle in handles:
            handle.remove()
        if divergence is not None:
            recording_module.chunked_mean_divergence = divergence
    steps_taken = steps * runner.steps_per_call
    regions: dict[str, dict[str, Any]] = {}
    for region, op, nbytes, shape in counter.records:
        entry = regions.setdefault(
            region, {"count": 0, "bytes": 0, "largest": 0, "largest_op": "", "large": []}
        )
        entry["count"] += 1
        entry["bytes"] += nbytes
        if nbytes > entry["largest"]:
            entry["largest"], entry["largest_op"] = nbytes, f"{op} {list(shape)}"
        if nbytes >= LARGE_ALLOCATION_BYTES:
            sized = " (parameter-sized)" if nbytes in param_sizes else ""
            entry["large"].append(f"{op} {list(shape)} {nbytes} B{sized}")
    for entry in regions.values():
        entry["per_step_count"] = entry["count"] / steps_taken
        entry["per_step_bytes"] = entry["bytes"] / steps_taken
    own = regions.get("wrapper", {"count": 0, "bytes": 0, "large": []})
    divergence_peak = None
    if divergence is not None and divergence_calls:
        # The transient memory of one divergence call, on the logits of the last step.
        args, kwargs = divergence_calls[0]
        with torch.no_grad():
            divergence_peak = traced_allocations(
                runner.device, lambda: divergence(*args, **kwargs), warmup=lambda: None
            )["peak"]
    return {
        "steps": steps_taken,
        "divergence_peak_bytes": divergence_peak,
        "logits_bytes": (divergence_calls[0][0][2].numel() * 4 if divergence_calls else None),
        "regions": regions,
        "wrapper_count": own["count"],
        "wrapper_bytes": own["bytes"],
        "wrapper_large": own["large"],
    }


# ---------------------------------------------------------------------------------- the session
class StepCostBench:
    """Holds one model at a time and its runners; builds them on first use."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.rounds: int = config.getoption("step_cost_rounds")
        self.device = pick_device()
        self.model_name: str | None = None
        self.model: nn.Module | None = None
        self.batch: dict[str, Tensor] = {}
        self.runners: dict[str, Runner] = {}

    def use_model(self, name: str) -> nn.Module:
        if name != self.model_name:
            self.runners.clear()
            self.model = None
            gc.collect()
            self.model, self.batch = build_model(name, self.device)
            self.model_name = name
        assert self.model is not None
        return self.model

    def runner(self, model_name: str, method: str) -> Runner:
        model = self.use_model(model_name)
        runner = self.runners.get(method)
        if runner is None:
            # Construction and first step with the allocator traced: the net growth, minus
            # AdamW's, is the memory the method holds, measured from the allocator. The gradients
            # are freed first so that every method starts from the same state.
            model.zero_grad(set_to_none=True)
            gc.collect()
            built: list[Runner] = []

            def build_and_step() -> None:
                built.append(build_runner(method, model, self.batch))
                built[0].drive(built[0].closure)

            growth = traced_allocations(self.device, build_and_step)
            runner = built[0]
            runner.first_step_net_bytes = growth["net"]
            for _ in range(runner.steps_per_call - 1):  # end on a whole ascent_every cycle
                runner.drive(runner.closure)
            self.runners[method] = runner
        return runner

    def measure_memory(self, model_name: str, method: str) -> dict[str, Any]:
        model = self.use_model(model_name)
        runner = self.runner(model_name, method)
        gc.collect()
        held = held_tensors(runner.owner, model, runner.base)
        trace = traced_allocations(self.device, runner.run, warmup=runner.run)
        allocations = count_allocations(runner, model) if runner.kind != "base" else None
        return {
            "kind": "memory",
            "model": model_name,
            "method": method,
            "label": METHODS[method],
            "device": str(self.device),
            "parameter_bytes": parameter_bytes(model),
            "held_bytes": sum(held.values()),
            "held_by_attribute": held,
            "first_step_net_bytes": runner.first_step_net_bytes,
            "peak_transient_bytes": trace["peak"],
            "steady_step_net_bytes": trace["net"],
            "steps_per_round": runner.steps_per_call,
            "allocations": allocations,
        }


@pytest.fixture(scope="session")
def step_cost(request: pytest.FixtureRequest) -> StepCostBench:
    return StepCostBench(request.config)


# ---------------------------------------------------------------------------------- reporting
def _report_module() -> Any:
    spec = importlib.util.spec_from_file_location("tram_step_cost_report", HERE / "report.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict) -> None:
    machine = dict(getattr(config, "_step_cost_machine", {}))
    machine.update(
        loadavg_end=_loadavg(),
        seconds=round(time.time() - machine.pop("started", time.time()), 1),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=str(pick_device()),
        device_name=(
            torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        )
        or None,
    )
    machine["clock"] = config.getoption("step_cost_clock")
    output_json["step_cost_machine"] = machine
    report = _report_module()
    summary = report.summarize(output_json)
    out = Path(config.getoption("step_cost_out"))
    report.write_outputs(summary, out)
    config._step_cost_table = report.render_markdown(summary)  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    table = getattr(config, "_step_cost_table", None)
    if table:
        terminalreporter.write_sep("=", "tram step cost (benchmarks/results/step_cost.md)")
        terminalreporter.write_line(table)
