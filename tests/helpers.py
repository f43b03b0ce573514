"""Helpers shared by several test files: tiny Hugging Face models built from configs (no hub),
TensorBoard scalars, the README examples run as scripts, distributed workers' launch and records,
a torch.compile backend that counts its graphs.

Only torch is imported at module level; transformers and tensorboard are imported by the
helpers that need them, after the calling test file has checked they are installed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class NoiseDraws:
    """The generators of a tram noise stream (TRAM-x, TRAM-Fisher, R3F with a seed), written out
    for reference loops: draw ``k`` of rank ``rank`` is a fresh CPU generator seeded with
    ``tram._noise_stream.draw_seed(seed, rank=rank, draw=k)``."""

    def __init__(self, seed: int, *, rank: int = 0) -> None:
        self.seed, self.rank, self.draws = seed, rank, 0

    def next(self) -> torch.Generator:
        """The generator of the next draw (one noised forward of the reference)."""
        from tram._noise_stream import draw_seed

        seed = draw_seed(self.seed, rank=self.rank, draw=self.draws)
        self.draws += 1
        return torch.Generator().manual_seed(seed)


def tiny_bert_config(*, dropout: float = 0.0, **overrides: Any) -> Any:
    """A two-layer, 32-wide BERT config with a 100-token vocabulary and three labels."""
    import transformers

    settings: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "vocab_size": 100,
        "max_position_embeddings": 16,
        "num_labels": 3,
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }
    return transformers.BertConfig(**{**settings, **overrides})


def tiny_bert(*, seed: int = 0, dropout: float = 0.0, **overrides: Any) -> nn.Module:
    """A randomly initialised ``BertForSequenceClassification`` (seeded) of that config."""
    import transformers

    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(
        tiny_bert_config(dropout=dropout, **overrides)
    )


def tiny_gpt2(*, seed: int = 0, dropout: float = 0.0, **overrides: Any) -> nn.Module:
    """A randomly initialised (seeded) two-layer, 32-wide ``GPT2LMHeadModel``, vocabulary 100."""
    import transformers

    settings: dict[str, Any] = {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "vocab_size": 100,
        "n_positions": 16,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **overrides}))


def cross_entropy_closure(
    optimizer: torch.optim.Optimizer, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> Any:
    """The user's closure of one fixed batch: zero the gradients, cross-entropy, backward."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    return closure


def some_fast(values: Any, *fast: Any) -> list[Any]:
    """A test matrix's parameters, those not in ``fast`` marked slow: the fast suite runs a
    representative few, ``pytest -m slow`` the rest. Values are matched by ``str`` (wrapper
    cases, whose ids are their names)."""
    names = {str(value) for value in fast}
    unknown = names - {str(value) for value in values}
    if unknown:  # a misspelt name would quietly move its case out of the fast suite
        raise ValueError(f"some_fast: no value is named {sorted(unknown)}")
    return [
        pytest.param(value, marks=() if str(value) in names else pytest.mark.slow, id=str(value))
        for value in values
    ]


def some_fast_rows(rows: Iterable[tuple[str, tuple[Any, ...]]], *fast: str) -> list[Any]:
    """A matrix of several parameters as ``(id, values)`` rows, those whose id is not in
    ``fast`` marked slow (``some_fast`` for one parameter)."""
    rows = list(rows)
    unknown = set(fast) - {name for name, _ in rows}
    if unknown:  # a misspelt id would quietly move its row out of the fast suite
        raise ValueError(f"some_fast_rows: no row is named {sorted(unknown)}")
    return [
        pytest.param(*values, marks=() if name in fast else pytest.mark.slow, id=name)
        for name, values in rows
    ]


def wrapped(module: nn.Module) -> nn.Module:
    """``module`` inside a real torch wrapper that keeps it in ``.module``, as
    DistributedDataParallel does: ``nn.DataParallel``, which on CPU just calls the module."""
    return nn.DataParallel(module)


def counting_backend(*, aot: bool = False) -> tuple[Callable[..., Any], list[Any]]:
    """A ``torch.compile`` backend that runs each graph as dynamo traced it (bit for bit the
    eager arithmetic), or with ``aot`` through AOTAutograd's forward and backward graphs
    (``aot_eager``: the eager kernels, bit for bit in float32; under bf16 autocast its casts
    round otherwise), and keeps it, so that every test can assert something was compiled:
    torch 2.13's ``Module.compile()`` on a container of ``torch.nn`` compiles nothing (dynamo
    skips torch.nn's own forwards), and a test that passes because nothing was compiled proves
    nothing. A plain function: Fabric deep-copies the compile arguments, which keeps functions.
    Call ``torch._dynamo.reset()`` before each compiled run: dynamo's cache belongs to the code
    object (a class's ``forward``), so a second model of the class reuses the first's graphs."""
    graphs: list[Any] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(graph)
        if aot:
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(graph, example_inputs)
        return graph.forward

    return backend, graphs


def read_scalars(directory: Path) -> dict[str, list[float]]:
    """Every TensorBoard scalar under ``directory`` (searched recursively), by tag, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events under {directory}"
    for path in files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return scalars


def run_example(script: str, method: str | None, *extra: str) -> str:
    """Run ``examples/<script>`` offline with a real model for two tiny steps; its stdout.

    ``method`` is passed as ``--method`` and checked in the output, unless it is None (the
    script's default method). Every example reports its accuracy on the Amazon reviews.
    """
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        str(ROOT / "examples" / script),
        *([] if method is None else [f"--method={method}"]),
        "--steps=2",
        "--batch-size=4",
        "--train-size=16",
        "--eval-size=16",
        "--max-length=16",
        *extra,
    ]
    completed = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    if method is not None:
        assert f"method: {method}" in completed.stdout
    assert "accuracy on amazon" in completed.stdout
    return completed.stdout


def tiny_llama_config(*, dropout: float = 0.0, **overrides: Any) -> Any:
    """A two-layer, 16-wide Llama config (grouped-query attention) with a 61-token vocabulary."""
    import transformers

    settings: dict[str, Any] = {
        "vocab_size": 61,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
        "attention_dropout": dropout,
    }
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def zero_redundancy_adamw(params: Any, **options: Any) -> torch.optim.Optimizer:
    """torch's ZeroRedundancyOptimizer around AdamW (lr 1e-2, weight decay 0.01 unless
    ``options`` say otherwise), in the process group the caller set up."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        params, optimizer_class=torch.optim.AdamW, **{"lr": 1e-2, "weight_decay": 0.01, **options}
    )


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Two (optimizer or model) states equal to the bit: tensors of the same dtype and values,
    the same keys and lengths, the same other values; ``path`` names where they differ."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, path
        assert torch.equal(a, b), f"{path}: max diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, Mapping):
        assert set(a) == set(b), f"{path}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{index}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def scenario_records(results: list[dict], name: str) -> list[dict]:
    """One distributed scenario's records, one per rank; a worker's error fails the test."""
    records = [r[name] for r in results]
    for rank, record in enumerate(records):
        if "error" in record:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{record['error']}", pytrace=False)
    return records


def torchrun(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 <arguments>`` on one thread per rank, with
    this checkout importable and no model hub; fails the test with the tail of the output
    unless it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    completed = subprocess.run(
        [*command, *arguments], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return completed


def layer_checkpointing(enabled: bool, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``TrainingArguments`` settings that turn the layers' activation checkpointing on or off,
    under the name the installed transformers takes: ``activation_checkpointing`` where it
    exists (``gradient_checkpointing`` is its deprecated alias there, to be removed in
    transformers 6), ``gradient_checkpointing`` in the releases before it."""
    import dataclasses

    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing"
    if name not in names:
        name = "gradient_checkpointing"
    settings: dict[str, Any] = {name: enabled}
    if kwargs is not None:
        settings[f"{name}_kwargs"] = kwargs
    return settings


def end_distributed_worker() -> NoReturn:
    """End a torchrun worker whose results are written: wait for every rank, destroy the process
    groups, and exit without the interpreter's teardown.

    Left to interpreter exit, gloo's threads can be torn down while still joinable and abort a
    worker after a successful run (SIGABRT, "terminate called without an active exception");
    CI saw it under load even after ``destroy_process_group()``. The results are on disk by then,
    and nothing the tests check runs during the teardown ``os._exit`` skips.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_workers(
    worker: Path,
    spec_path: Path,
    out_dir: Path,
    log_dir: Path,
    *,
    world_size: int = 2,
    timeout_s: float = 120.0,
) -> float:
    """Run ``python worker spec_path out_dir`` as ``world_size`` gloo ranks on this machine to
    completion; return the seconds it took, or fail the test with every rank's output if one
    fails or hangs. A port taken between the probe and the bind is retried (3 attempts)."""
    for attempt in range(3):
        port = free_port()
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        logs = [log_dir / f"attempt{attempt}_rank{rank}.log" for rank in range(world_size)]
        start = time.monotonic()
        processes = []
        for rank, log in enumerate(logs):
            with log.open("w") as stream:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, str(worker), str(spec_path), str(out_dir)],
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                        cwd=ROOT,
                        stdout=stream,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = start + timeout_s
        failed_at: float | None = None
        try:
            while any(p.poll() is None for p in processes):
                now = time.monotonic()
                if any(p.returncode not in (None, 0) for p in processes):
                    failed_at = failed_at or now
                # A failed rank leaves the other waiting in a collective: a short grace only.
                if now > deadline or (failed_at is not None and now - failed_at > 15):
                    break
                time.sleep(0.05)
        finally:
            # Also on an interrupt: never leave a rank behind.
            for p in processes:
                if p.poll() is None:
                    p.kill()
            for p in processes:
                p.wait(timeout=10)
        elapsed = time.monotonic() - start
        codes = [p.returncode for p in processes]
        if all(code == 0 for code in codes):
            return elapsed
        output = {rank: log.read_text(errors="replace") for rank, log in enumerate(logs)}
        if any(
            "EADDRINUSE" in text or "address already in use" in text.lower()
            for text in output.values()
        ):
            continue  # The free port was taken between the probe and the bind: retry.
        report = "\n".join(
            f"----- rank {rank} (exit code {codes[rank]}) -----\n{output[rank][-6000:]}"
            for rank in range(world_size)
        )
        timed_out = " (killed at the time limit)" if elapsed >= timeout_s else ""
        pytest.fail(
            f"{worker.name} failed after {elapsed:.1f}s{timed_out}:\n{report}",
            pytrace=False,
        )
    pytest.fail(f"{worker.name} could not bind a free port in 3 attempts", pytrace=False)


def accelerate_fsdp2_on_cpu(accelerator: Any, plugin: Any) -> None:
    """Make ``accelerator`` (built with ``cpu=True`` in a gloo process group) take accelerate's
    FSDP2 code paths: ``prepare`` shards with ``fully_shard``, ``clip_grad_norm_`` and
    ``save_state``/``load_state`` go through their FSDP2 branches.

    accelerate 1.15 turns a ``FullyShardedDataParallelPlugin`` on only for accelerator devices
    (``AcceleratorState.__init__`` in ``accelerate/state.py`` sets ``DistributedType.FSDP`` in the
    multi-GPU branch; on CPU it stays ``MULTI_CPU`` and the model is wrapped in DDP), although
    ``fully_shard`` itself runs on CPU over gloo. Both shared states hold the distributed type:
    ``AcceleratorState`` copies ``PartialState``'s each time it is built, so both are set.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2


class _Tally(nn.Module):
    """A buffer its parent writes without calling this module."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("largest", torch.zeros(width))


class StatefulForward(nn.Module):
    """Keeps state in buffers that each training forward writes: a count of its calls and a
    running mean of its input (in place), the last input's mean (a buffer replaced), a running
    mean of the squared input written through ``.data`` (no version counter moves), and a
    child's buffer written without calling the child."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("input_mean", torch.zeros(width))
        self.register_buffer("last_input_mean", torch.zeros(width))
        self.register_buffer("square_mean", torch.zeros(width))
        self.tally = _Tally(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.calls += 1
                self.input_mean.mul_(0.7).add_(x.mean(0), alpha=0.3)
                self.last_input_mean = x.mean(0)
                self.square_mean.data.mul_(0.6).add_(x.square().mean(0), alpha=0.4)
                torch.maximum(self.tally.largest, x.abs().amax(0), out=self.tally.largest)
        return x


def stateful_model() -> nn.Module:
    """The contract model with forward-written state: :class:`StatefulForward` after the first
    layer, an InstanceNorm with running statistics (not a BatchNorm) and a spectrally
    normalised head (one power iteration of its vectors per training forward)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8),
        StatefulForward(8),
        nn.Unflatten(1, (2, 4)),
        nn.InstanceNorm1d(2, track_running_stats=True, momentum=0.3),
        nn.Flatten(),
        nn.Tanh(),
        nn.utils.parametrizations.spectral_norm(nn.Linear(8, 3)),
    )
