"""TwoPassBackward: the two-pass step in a hand-written accelerate loop."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import tram  # noqa: E402
from tests.helpers import end_distributed_worker, run_example, torchrun  # noqa: E402
from tram.integrations.accelerate import TwoPassBackward, unwrap_optimizer  # noqa: E402

GA = 2
BATCH = 4


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * GA * BATCH, 6, generator=generator)
    y = torch.randint(0, 3, (steps * GA * BATCH,), generator=generator)
    return list(zip(x, y))


def make_optimizer(method, model: nn.Module) -> tram.TwoPassOptimizer:
    """``method`` is a wrapper class (default arguments) or ``fn(base, model)``."""
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return method(base) if isinstance(method, type) else method(base, model)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_run(
    method, steps: int, *, bf16: bool = False
) -> tuple[nn.Module, tram.TwoPassOptimizer]:
    """By hand: accumulate GA micro-batches (loss / GA, as accelerator.backward divides),
    one ascent, replay, restore, clip, base step, schedule; with ``bf16``, every loss of both
    passes under CPU bf16 autocast."""

    def loss(model: nn.Module, batch) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return loss_fn(model, batch) / GA

    model = make_model()
    optimizer = make_optimizer(method, model)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=steps)
    data = make_data(steps)
    for step in range(steps):
        window = []
        for micro in range(GA):
            start = (step * GA + micro) * BATCH
            rows = data[start : start + BATCH]
            window.append((torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows])))
        for batch in window:
            with optimizer.first_pass():
                loss(model, batch).backward()
        if optimizer.first_step():
            for batch in window:
                loss(model, batch).backward()
            optimizer.restore()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer


def accelerate_run(method, steps: int, accelerator: Accelerator, inject=None, forward_hook=None):
    model = make_model()
    if forward_hook is not None:  # on a layer: inside accelerate's autocast wrapper of forward
        model[0].register_forward_hook(forward_hook)
    optimizer = make_optimizer(method, model)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=steps)
    loader = torch.utils.data.DataLoader(make_data(steps), batch_size=BATCH, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    wrapper = unwrap_optimizer(optimizer)
    compute = loss_fn
    if inject is not None:

        def compute(model, batch):
            loss = loss_fn(model, batch)
            if inject(wrapper, len(history)):
                loss = loss * float("inf")
            return loss

    backward = TwoPassBackward(accelerator, model, optimizer, compute)
    history = []
    for batch in loader:
        with accelerator.accumulate(model):
            before = flat(model).clone()
            loss = backward(batch)
            assert not wrapper.is_perturbed
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                history.append((before, flat(model).clone(), optimizer.step_was_skipped))
        assert torch.isfinite(loss) or inject is not None
    return accelerator.unwrap_model(model), wrapper, history


def closure_of(accelerator: Accelerator, optimizer: Any, model: nn.Module, batch: Any) -> Any:
    """The classic SAM closure, its backward through accelerate."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        accelerator.backward(loss)
        return loss

    return closure


def test_step_closure_on_the_prepared_optimizer_inside_accumulation_is_refused() -> None:
    """accelerate's prepared optimizer calls ``step(closure)`` only on the micro-batch that
    closes the accumulation window: the closure of the first micro-batch never runs, and the
    step would train on the last alone. Refused there, with the weights untouched and the
    fix named; with ``gradient_accumulation_steps=1`` the closure form is the two-pass step."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    model = make_model()
    model, optimizer = accelerator.prepare(model, make_optimizer(tram.SAM, model))
    before = flat(model)
    batches = list(torch.utils.data.DataLoader(make_data(1), batch_size=BATCH))
    with accelerator.accumulate(model):  # the first micro-batch: accelerate calls nothing
        optimizer.step(closure_of(accelerator, optimizer, model, batches[0]))
    with (
        pytest.raises(RuntimeError, match=r"gradient_accumulation_steps=2: .*TwoPassBackward"),
        accelerator.accumulate(model),
    ):
        optimizer.step(closure_of(accelerator, optimizer, model, batches[1]))
    assert torch.equal(flat(model), before)
    assert not optimizer.optimizer.is_perturbed

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model, twin = make_model(), make_model()
    model, optimizer = accelerator.prepare(model, make_optimizer(tram.SAM, model))
    plain = make_optimizer(tram.SAM, twin)
    for batch in batches:
        optimizer.step(closure_of(accelerator, optimizer, model, batch))
        plain.step(closure_of(accelerator, plain, twin, batch))
    assert torch.equal(flat(model), flat(twin))
    assert not torch.equal(flat(model), before)


def test_step_closure_through_the_prepared_optimizers_grad_scaler_is_refused() -> None:
    """Under fp16 accelerate's prepared optimizer steps through
    ``GradScaler.step(optimizer, closure)``, which unscales the gradients left before the
    closure runs: both passes would step with scaled gradients (SGD's step 1024 times too
    large). accelerate has no fp16 on CPU, so its AcceleratedOptimizer is given a CPU scaler."""
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = AcceleratedOptimizer(make_optimizer(tram.SAM, model), scaler=scaler)
    batch = next(iter(torch.utils.data.DataLoader(make_data(1), batch_size=BATCH)))

    def scaled_closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        scaler.scale(loss).backward()
        return loss

    scaled_closure()  # the gradients a previous step leaves
    before = flat(model)
    with pytest.raises(RuntimeError, match=r"GradScaler\.step\(optimizer, closure\).*by 1024"):
        optimizer.step(scaled_closure)
    assert torch.equal(flat(model), before)
    del accelerator


def test_accelerates_prepared_optimizer_is_refused_as_the_base() -> None:
    """Wrapping after ``prepare`` runs the two passes inside accelerate's step rules: in an
    accumulation window its zero_grad() and step() do nothing, so the second pass adds to the
    first and the window's earlier micro-batches are zeroed away at its close. Its subclasses
    (accelerate's DeepSpeed and Megatron-LM optimizers) too."""
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, prepared = accelerator.prepare(model, base)
    refused = (
        r"^base_optimizer is accelerate's prepared optimizer \(AcceleratedOptimizer\): "
        r"FisherSAM .* then accelerator\.prepare\(\) the FisherSAM"
    )
    with pytest.raises(TypeError, match=refused):
        tram.FisherSAM(prepared)

    class FrameworkOptimizer(AcceleratedOptimizer):
        pass

    with pytest.raises(TypeError, match=refused):
        tram.FisherSAM(FrameworkOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2)))


@pytest.mark.parametrize("method", [tram.SAM, tram.ASAM, tram.FisherSAM])
def test_accelerate_loop_equals_the_hand_written_loop(method):
    steps = 3
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    model, wrapper, history = accelerate_run(method, steps, accelerator)
    reference, _ = reference_run(method, steps)
    assert (flat(model) - flat(reference)).abs().max().item() == 0.0
    assert wrapper.steps == steps
    assert len(history) == steps
    assert wrapper.param_groups is wrapper.base_optimizer.param_groups  # re-linked after prepare


def fp16_accelerator(scale: float = 2.0**8) -> tuple[Accelerator, torch.amp.GradScaler]:
    """accelerate refuses fp16 loss scaling on CPU; give it a CPU GradScaler as on a GPU."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA, mixed_precision="fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    accelerator.scaler = scaler
    accelerator.native_amp = True
    return accelerator, scaler


def fresh_accelerate_state() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# Methods whose ascent direction depends on the scale of the gradient (Fisher SAM's
# g / (1 + eta g^2)): under a GradScaler they must be handed the loss scale, and (with rho = 0)
# the same method without an ascent. rho != eta, and eta large enough that F matters.
SCALE_DEPENDENT = {
    "FisherSAM": (
        lambda base, model: tram.FisherSAM(base, rho=0.05, eta=0.5),
        lambda base, model: tram.FisherSAM(base, rho=0.0, eta=0.5),
    ),
    "TRAM-Fisher": (
        lambda base, model: tram.TRAM(
            base,
            model,
            trust_region="fisher",
            embeddings=model[0],
            sigma=0.3,
            rho=0.05,
            fisher_eta=0.5,
        ),
        lambda base, model: tram.TRAM(
            base,
            model,
            trust_region="fisher",
            embeddings=model[0],
            sigma=0.3,
            rho=0.0,
            fisher_eta=0.5,
        ),
    ),
}


@pytest.mark.parametrize(
    "method", [tram.SAM, *(m for m, _ in SCALE_DEPENDENT.values())], ids=["SAM", *SCALE_DEPENDENT]
)
def test_fp16_grad_scaler_equals_the_unscaled_run(method):
    """The loss scale is a power of two, so gradients scaled by it and unscaled by the scaler
    are exactly the unscaled ones: the same fp16-autocast loop with a loss scale of 1 is the
    reference. A wrapper that computed its ascent from the scaled gradients (Fisher SAM's
    direction depends on their scale) or took no ascent at all would fail."""
    accelerator, scaler = fp16_accelerator()
    model, wrapper, history = accelerate_run(method, 3, accelerator)
    assert wrapper.steps == 3
    assert not any(skipped for _, _, skipped in history)
    assert scaler.get_scale() == 2.0**8

    fresh_accelerate_state()
    unscaled, unit = fp16_accelerator(scale=1.0)
    reference, _, _ = accelerate_run(method, 3, unscaled)
    assert unit.get_scale() == 1.0
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-6, atol=1e-7)

    # The ascent matters: without it the weights are far from these (the test can fail).
    fresh_accelerate_state()
    no_ascent = {m: zero for m, zero in SCALE_DEPENDENT.values()}.get(
        method, lambda base, model: tram.SAM(base, rho=0.0)
    )
    plain, _, _ = accelerate_run(no_ascent, 3, fp16_accelerator()[0])
    assert (flat(model) - flat(plain)).abs().max() > 1e-4


@pytest.mark.parametrize("perturbed", [True, False], ids=["pass2", "pass1"])
def test_fp16_overflow_skips_the_step_with_the_weights_restored(perturbed):
    accelerator, scaler = fp16_accelerator()

    def inject(wrapper, window):
        return window == 1 and wrapper.is_perturbed == perturbed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model, wrapper, history = accelerate_run(tram.SAM, 3, accelerator, inject=inject)
    assert [skipped for _, _, skipped in history] == [False, True, False]
    before, after, _ = history[1]
    assert torch.equal(before, after)  # restored exactly, no step
    assert not torch.equal(*history[0][:2])
    assert not torch.equal(*history[2][:2])
    assert wrapper.skipped_ascents == (0 if perturbed else 1)
    assert wrapper.steps == 2
    assert scaler.get_scale() == 2.0**7
    assert torch.isfinite(flat(model)).all()


BF16_METHODS = {
    "SAM": tram.SAM,
    "ASAM": tram.ASAM,
    "TRAM-x": lambda base, model: tram.TRAM(
        base, model, trust_region="noise", embeddings=model[0], sigma=0.3, seed=3
    ),
    "TRAM-Fisher": SCALE_DEPENDENT["TRAM-Fisher"][0],
}


@pytest.mark.parametrize("name", list(BF16_METHODS))
def test_bf16_equals_the_hand_written_loop_under_autocast(name):
    """``mixed_precision="bf16"`` on CPU: accelerate runs the model's forward under bf16
    autocast, in both passes; the hand loop under the same autocast takes the same steps, bit
    for bit (TRAM-x: the same radii too). The fp32 loop ends elsewhere, so bf16 is in effect."""
    method, steps = BF16_METHODS[name], 3
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA, mixed_precision="bf16")
    autocast: list[bool] = []
    model, wrapper, _ = accelerate_run(
        method,
        steps,
        accelerator,
        forward_hook=lambda module, args, output: autocast.append(torch.is_autocast_enabled("cpu")),
    )
    assert wrapper.steps == steps
    # Every forward of both passes; TRAM-x's target forward on the noised inputs too.
    forwards = 3 if name == "TRAM-x" else 2
    assert autocast == [True] * (steps * GA * forwards)
    reference, reference_optimizer = reference_run(method, steps, bf16=True)
    assert torch.equal(flat(model), flat(reference))
    if name == "TRAM-x":
        assert min(wrapper.radius_history) > 0
        assert wrapper.radius_history == reference_optimizer.radius_history
    fp32, _ = reference_run(method, steps)
    assert (flat(model) - flat(fp32)).abs().max() > 1e-5


@pytest.mark.parametrize("name", list(BF16_METHODS))
def test_a_compiled_model_takes_the_hand_written_loops_steps(name):
    """``dynamo_backend`` makes ``prepare`` compile the model (``torch.compile(model)``); with
    ``aot_eager`` the steps are the eager hand loop's, bit for bit (TRAM-x: its radii too), and
    graphs were compiled (a run that compiled nothing would pass as well)."""
    method, steps = BF16_METHODS[name], 3
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA, dynamo_backend="aot_eager")
    model, wrapper, _ = accelerate_run(method, steps, accelerator)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert wrapper.steps == steps
    reference, reference_optimizer = reference_run(method, steps)
    assert torch.equal(flat(model), flat(reference))
    if name == "TRAM-x":
        assert min(wrapper.radius_history) > 0
        assert wrapper.radius_history == reference_optimizer.radius_history


class RecordingTracker(accelerate.tracking.GeneralTracker):
    """An accelerate tracker (its documented custom-tracker interface) that keeps what it is
    given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict, int | None]] = []

    @property
    def tracker(self) -> list[tuple[dict, int | None]]:
        return self.logged

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((dict(values), step))


def test_the_radius_reaches_accelerates_trackers():
    """TwoPassBackward logs nothing itself; after ``optimizer.step()`` the wrapper's
    ``last_radius`` is this step's d, which ``accelerator.log`` hands to every tracker."""
    tracker = RecordingTracker()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA, log_with=[tracker])
    accelerator.init_trackers("tram")
    method = BF16_METHODS["TRAM-x"]
    model, optimizer, _ = prepared(method, 3, accelerator)
    backward = TwoPassBackward(accelerator, model, optimizer, loss_fn)
    for index, batch in enumerate(torch.utils.data.DataLoader(make_data(3), batch_size=BATCH)):
        with accelerator.accumulate(model):
            backward(batch)
            optimizer.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                radius = unwrap_optimizer(optimizer).last_radius
                accelerator.log({"tram/radius": radius}, step=index // GA)
    accelerator.end_training()
    history = unwrap_optimizer(optimizer).radius_history
    assert len(history) == 3
    assert min(history) > 0
    assert len(set(history)) == 3
    assert tracker.logged == [({"tram/radius": d}, step) for step, d in enumerate(history)]


RESUMABLE = {
    # SAM's step counter decides which steps ascend; TRAM-x's noise generator its noise.
    "SAM-every-2": lambda base, model: tram.SAM(base, rho=0.07, ascent_every=2),
    "TRAM-x": lambda base, model: tram.TRAM(
        base, model, trust_region="noise", embeddings=model[0], sigma=0.3
    ),
}


def train_windows(accelerator, model, optimizer, scheduler, batches) -> None:
    backward = TwoPassBackward(accelerator, model, optimizer, loss_fn)
    for batch in batches:
        with accelerator.accumulate(model):
            backward(batch)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()


def prepared(method, steps: int, accelerator: Accelerator):
    model = make_model()
    optimizer = make_optimizer(method, model)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=steps)
    return accelerator.prepare(model, optimizer, scheduler)


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_save_state_and_load_state_resume_exactly(name, tmp_path):
    """accelerate's save_state/load_state (the optimizer's state dict, the scheduler, the RNG
    states) in the middle of a run: the resumed run ends where the uninterrupted one does, bit
    for bit."""
    method, steps, stop = RESUMABLE[name], 4, 2
    batches = [
        (torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows]))
        for rows in (
            make_data(steps)[start : start + BATCH] for start in range(0, steps * GA * BATCH, BATCH)
        )
    ]
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    model, optimizer, scheduler = prepared(method, steps, accelerator)
    train_windows(accelerator, model, optimizer, scheduler, batches[: stop * GA])
    accelerator.save_state(tmp_path)
    train_windows(accelerator, model, optimizer, scheduler, batches[stop * GA :])
    straight, straight_steps = flat(model), unwrap_optimizer(optimizer).steps

    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    model, optimizer, scheduler = prepared(method, steps, accelerator)
    accelerator.load_state(tmp_path)
    assert unwrap_optimizer(optimizer).steps == stop
    train_windows(accelerator, model, optimizer, scheduler, batches[stop * GA :])
    assert unwrap_optimizer(optimizer).steps == straight_steps == steps
    assert torch.equal(flat(model), straight)


def test_a_plain_optimizer_is_refused():
    accelerator = Accelerator(cpu=True)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert unwrap_optimizer(optimizer) is None
    with pytest.raises(TypeError, match="needs a tram two-pass optimizer"):
        TwoPassBackward(accelerator, model, optimizer, loss_fn)


def test_local_ascent_under_fsdp2_is_refused():
    """Under FSDP2 a backward always reduce-scatters: there is no per-rank gradient to ascend
    along."""
    from accelerate import FullyShardedDataParallelPlugin

    from tests.helpers import accelerate_fsdp2_on_cpu

    accelerator = Accelerator(cpu=True)
    accelerate_fsdp2_on_cpu(accelerator, FullyShardedDataParallelPlugin(fsdp_version=2))
    model = make_model()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), local_ascent=True)
    with pytest.raises(ValueError, match="local_ascent=True is not available under FSDP2"):
        TwoPassBackward(accelerator, model, optimizer, loss_fn)


def test_unwrap_optimizer_finds_the_wrapper_through_accelerate():
    accelerator = Accelerator(cpu=True)
    model = make_model()
    wrapper = make_optimizer(tram.SAM, model)
    model, prepared = accelerator.prepare(model, wrapper)
    assert prepared is not wrapper
    assert not hasattr(prepared, "first_step")  # accelerate does not forward attributes
    assert unwrap_optimizer(prepared) is wrapper
    assert unwrap_optimizer(wrapper) is wrapper


@pytest.mark.slow
@pytest.mark.representative  # the README's accelerate example; about 70 s on 2 CPU cores
def test_example_accelerate_loop_fine_tunes_minilm():
    from tram import factory

    method = "tram" if "tram" in factory.list_methods() else "asam"
    stdout = run_example("accelerate_loop.py", method)
    assert "step   2" in stdout


# --------------------------------------------------------------------------- FSDP2, two ranks

FSDP2_STEPS = 3
FSDP2_RESUME_AT = 2
FSDP2_METHODS: dict[str, Any] = {
    "sam": lambda base, model: tram.SAM(base, rho=0.07),
    "tram_x": lambda base, model: tram.TRAM(
        base, model, trust_region="noise", embeddings=model[0], sigma=0.3, seed=3
    ),
}


def fsdp2_base(model: nn.Module) -> torch.optim.Optimizer:
    # SGD: AdamW's first steps move an element by lr·g/(|g| + eps) and would amplify the
    # round-off of tiny gradients into differences the tolerance has to admit.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def global_micro_batches(steps: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every optimizer step's GA global micro-batches of ``world * BATCH`` rows."""
    generator = torch.Generator().manual_seed(1)
    count = steps * GA
    x = torch.randn(count, world * BATCH, 6, generator=generator)
    y = torch.randint(0, 3, (count, world * BATCH), generator=generator)
    return list(zip(x, y))


def full_flat(model: nn.Module) -> torch.Tensor:
    """The unsharded parameters (an FSDP2 model's DTensors gathered)."""
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full])


def hand_written_run(make, batches, *, shard: bool, ddp: bool = False) -> torch.Tensor:
    """The two-pass step written out: accumulate GA micro-batches (loss / GA), ascend, replay,
    restore, clip, step; sharded with ``fully_shard`` on this rank's rows, or on one process
    with the global micro-batches."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    if shard:
        fully_shard(model)
    optimizer = make(fsdp2_base(model), model)
    inner = model
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    for step in range(FSDP2_STEPS):
        window = batches[step * GA : (step + 1) * GA]
        for batch in window:
            with optimizer.first_pass():
                (loss_fn(model, batch) / GA).backward()
        if optimizer.first_step():
            for batch in window:
                (loss_fn(model, batch) / GA).backward()
            optimizer.restore()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return full_flat(inner)


def accelerate_fsdp2_run(accelerator, make, batches, checkpoint: str) -> dict[str, Any]:
    """TwoPassBackward under accelerate's FSDP2; ``save_state`` after FSDP2_RESUME_AT steps,
    then ``load_state`` at the end and the last steps again."""
    # Only this run's model and optimizer: save_state saves every prepared one, and FSDP2's
    # clip_grad_norm_ compares the parameters with each prepared model's.
    accelerator.free_memory()
    model = make_model()
    optimizer = make(fsdp2_base(model), model)
    model, optimizer = accelerator.prepare(model, optimizer)
    backward = TwoPassBackward(accelerator, model, optimizer, loss_fn)

    def train(windows: range) -> None:
        for micro in range(windows.start * GA, windows.stop * GA):
            with accelerator.accumulate(model):
                backward(batches[micro])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()

    train(range(FSDP2_RESUME_AT))
    accelerator.save_state(checkpoint)
    train(range(FSDP2_RESUME_AT, FSDP2_STEPS))
    straight = full_flat(model)
    wrapper = unwrap_optimizer(optimizer)
    straight_steps = wrapper.steps
    accelerator.load_state(checkpoint)
    loaded_steps = wrapper.steps
    train(range(FSDP2_RESUME_AT, FSDP2_STEPS))
    return {
        "wrapped": type(model).__name__,
        "sharded": type(next(model.parameters())).__name__,
        "straight": straight,
        "steps": (straight_steps, loaded_steps, wrapper.steps),
        "resumed": full_flat(model),
    }


def _fsdp2_worker(out_path: str) -> None:
    """Run under torchrun (two gloo ranks): train with TwoPassBackward under accelerate's FSDP2
    and with the hand-written ``fully_shard`` loop on each rank's rows; rank 0 also trains on
    one process with the global micro-batches, and saves everything to ``out_path``."""
    import torch.distributed as dist
    from accelerate import FullyShardedDataParallelPlugin

    from tests.helpers import accelerate_fsdp2_on_cpu

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    accelerate_fsdp2_on_cpu(accelerator, FullyShardedDataParallelPlugin(fsdp_version=2))
    rank, world = dist.get_rank(), dist.get_world_size()
    global_batches = global_micro_batches(FSDP2_STEPS, world)
    mine = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in global_batches]
    results: dict[str, Any] = {"world": world}
    for name, make in FSDP2_METHODS.items():
        result = accelerate_fsdp2_run(accelerator, make, mine, f"{out_path}-{name}")
        result["hand_written_fsdp2"] = hand_written_run(make, mine, shard=True)
        result["one_process"] = hand_written_run(make, global_batches, shard=False)
        result["ddp"] = hand_written_run(make, mine, shard=False, ddp=True)
        result["initial"] = flat(make_model())
        results[name] = {
            key: value if key != "steps" else tuple(value) for key, value in result.items()
        }
    if rank == 0:
        torch.save(results, out_path)
    end_distributed_worker()


# float32 round-off only (measured up to 3e-8); the mutant and the bug it guards move TRAM-x by
# 5e-5.
FSDP2_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.distributed
def test_fsdp2_two_pass_backward_is_the_hand_written_fsdp2_loop(tmp_path):
    """TwoPassBackward under accelerate's FSDP2 (``fsdp_version=2``, two gloo ranks, the tram
    wrapper built before ``prepare`` shards the model) steps as the hand-written ``fully_shard``
    loop and as DDP; SAM as one process on the global batch. ``save_state``/``load_state``
    (sharded ``torch.distributed.checkpoint``) resume bit for bit, with the step counter."""
    out = tmp_path / "fsdp2.pt"
    torchrun(__file__, "--fsdp2-worker", str(out))
    results = torch.load(out, weights_only=True)
    assert results["world"] == 2
    for name in FSDP2_METHODS:
        result = results[name]
        assert result["wrapped"] == "FSDPSequential"
        assert result["sharded"] == "DTensor"
        assert result["steps"] == (FSDP2_STEPS, FSDP2_RESUME_AT, FSDP2_STEPS)
        assert torch.equal(result["resumed"], result["straight"])
        assert (result["straight"] - result["initial"]).abs().max() > 1e-2
        for reference in ("hand_written_fsdp2", "ddp"):
            torch.testing.assert_close(result["straight"], result[reference], **FSDP2_TOLERANCE)
    sam = results["sam"]
    torch.testing.assert_close(sam["straight"], sam["one_process"], **FSDP2_TOLERANCE)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--fsdp2-worker":
    torch.set_num_threads(1)
    _fsdp2_worker(sys.argv[2])


# ------------------------------------------------------------------- uneven inputs, two ranks

JOIN_STEPS = (3, 1)
"""Optimizer steps (windows of GA micro-batches) of rank 0 and rank 1: rank 1 joins first."""


@contextlib.contextmanager
def join_uneven_inputs_on_cpu(accelerator, joinables):
    """``accelerator.join_uneven_inputs(joinables, even_batches=False)`` entered as on GPUs.

    accelerate 1.15 enters ``Join`` there only for accelerator devices (its ``multi_device``
    property; a ``MULTI_CPU`` run gets a warning and no Join), although Join runs on CPU over
    gloo. The property is forced while the context is entered, and only then: the rest of the
    run is accelerate's CPU DDP."""
    with contextlib.ExitStack() as stack:
        original = Accelerator.multi_device
        Accelerator.multi_device = property(lambda self: True)
        try:
            stack.enter_context(accelerator.join_uneven_inputs(joinables, even_batches=False))
        finally:
            Accelerator.multi_device = original
        yield


def accelerate_join_run(accelerator, make, batches) -> dict[str, Any]:
    """TwoPassBackward inside accelerate's ``join_uneven_inputs``, over this rank's batches."""
    accelerator.free_memory()
    model = make_model()
    optimizer = make(fsdp2_base(model), model)
    model, optimizer = accelerator.prepare(model, optimizer)
    backward = TwoPassBackward(accelerator, model, optimizer, loss_fn)
    record: dict[str, Any] = {"wrapped": type(model).__name__, "message": None}
    try:
        with join_uneven_inputs_on_cpu(accelerator, [model]):
            for batch in batches:
                with accelerator.accumulate(model):
                    record["last_weights"] = full_flat(model)
                    backward(batch)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
    except RuntimeError as error:
        record["message"] = str(error)
    record["final"] = full_flat(model)
    return record


def _join_worker(out_path: str) -> None:
    """Run under torchrun (two gloo ranks; accelerate runs DDP on CPU): TwoPassBackward inside
    accelerate's ``join_uneven_inputs``, rank 1 out of batches after one step, with SAM, then
    with TRAM-x, whose synchronised ascent rank 0 refuses. Rank 1 is then left inside Join's
    collectives, which fail in gloo once rank 0's process is gone: the process group cannot be
    closed, and both ranks exit at once."""
    import torch.distributed as dist

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    rank = dist.get_rank()
    batches = global_micro_batches(max(JOIN_STEPS), 2)[: JOIN_STEPS[rank] * GA]
    mine = [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in batches]
    results = {"sam": accelerate_join_run(accelerator, FSDP2_METHODS["sam"], mine)}
    dist.barrier()
    results["tram_x"] = accelerate_join_run(accelerator, FSDP2_METHODS["tram_x"], mine)
    torch.save(results, f"{out_path}.rank{rank}")
    sys.stdout.flush()
    os._exit(0)


def one_process_join_reference(make) -> torch.Tensor:
    """The steps of two ranks of which rank 1 runs out of windows after JOIN_STEPS[1], on one
    process: the global micro-batches while both train, then rank 0's, with the loss halved as
    DDP divides the sum of rank 0's gradient and the joined rank's zeros by the world size."""
    model = make_model()
    optimizer = make(fsdp2_base(model), model)
    batches = global_micro_batches(max(JOIN_STEPS), 2)
    for step in range(JOIN_STEPS[0]):
        window, weight = batches[step * GA : (step + 1) * GA], 1 / GA
        if step >= JOIN_STEPS[1]:
            window, weight = [(x.chunk(2)[0], y.chunk(2)[0]) for x, y in window], 1 / (2 * GA)
        for batch in window:
            with optimizer.first_pass():
                (loss_fn(model, batch) * weight).backward()
        if optimizer.first_step():
            for batch in window:
                (loss_fn(model, batch) * weight).backward()
            optimizer.restore()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return flat(model)


@pytest.mark.distributed
def test_join_uneven_inputs_trains_sam_as_ddp_and_refuses_tram_synchronised(tmp_path):
    """accelerate's ``join_uneven_inputs`` with rank 1 out of batches after one step: SAM trains
    on as DDP defines the step (the joined rank adds zero gradients, the sum is divided by the
    world size), every rank ending with rank 0's weights; TRAM-x's synchronised ascent, whose
    all-reduce of d Join does not shadow, raises on rank 0 at its next step with the fixes
    named, weights at θ, instead of waiting forever."""
    out = tmp_path / "join.pt"
    torchrun(__file__, "--join-worker", str(out))
    ranks = [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in range(2)]
    sam = [r["sam"] for r in ranks]
    assert sam[0]["wrapped"] == "DistributedDataParallel"
    assert [r["message"] for r in sam] == [None, None]
    reference = one_process_join_reference(FSDP2_METHODS["sam"])
    torch.testing.assert_close(sam[0]["final"], reference, **FSDP2_TOLERANCE)
    assert torch.equal(sam[1]["final"], sam[0]["final"])
    tram_x = ranks[0]["tram_x"]
    assert tram_x["message"] is not None
    assert "1 of the 2 ranks stopped stepping" in tram_x["message"]
    assert "local_ascent=True" in tram_x["message"]
    assert torch.equal(tram_x["final"], tram_x["last_weights"])  # the refused step moved nothing


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--join-worker":
    torch.set_num_threads(1)
    _join_worker(sys.argv[2])


@pytest.mark.parametrize("model_given", [False, True], ids=["without model=", "model="])
def test_the_replay_counts_as_the_second_pass_for_batchnorm_statistics(model_given: bool):
    """TwoPassBackward replays the window inside the wrapper's ``second_pass()``. A BatchNorm on
    the raw inputs, which no perturbed weight feeds, runs in both passes: without ``model=`` its
    second update is refused, naming ``model=`` (it used to pass, silently, as another model's);
    with ``model=`` its statistics keep the first pass's update, one per micro-batch."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GA)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(6, affine=False, momentum=0.3), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    reference = copy.deepcopy(model[0])
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = tram.SAM(base, rho=0.05, model=model if model_given else None)
    model, optimizer = accelerator.prepare(model, optimizer)
    backward = TwoPassBackward(accelerator, model, optimizer, loss_fn)
    batches = list(torch.utils.data.DataLoader(make_data(2), batch_size=BATCH))

    def train() -> None:
        for batch in batches:
            with accelerator.accumulate(model):
                backward(batch)
                optimizer.step()
                optimizer.zero_grad()

    if not model_given:
        with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode ran at the .*model="):
            train()
        assert not unwrap_optimizer(optimizer).is_perturbed
        return
    train()
    with torch.no_grad():
        for inputs, _ in batches:
            reference(inputs)
    assert torch.equal(model[0].running_mean, reference.running_mean)
    assert torch.equal(model[0].running_var, reference.running_var)
    assert int(model[0].num_batches_tracked) == len(batches)
