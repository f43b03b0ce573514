"""tram with PyTorch Lightning: TramCallback (automatic optimization) and manual_step.

Every run is compared with a hand-written loop on the same data: ``tram.accumulating_closure``
with ``step(closure)``, the explicit form, or ``tram.scaled_step``. Lightning is real (no mock).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import pytest
import torch
from torch import Tensor, nn

import tram
from tram._wrapper import TwoPassOptimizer

pl = pytest.importorskip("lightning.pytorch")
torchmetrics = pytest.importorskip("torchmetrics")

from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from tests.helpers import (  # noqa: E402
    counting_backend,
    end_distributed_worker,
    run_example,
    some_fast,
    some_fast_rows,
    torchrun,
)
from tram.integrations.lightning import TramCallback, manual_step  # noqa: E402

MissingAscentError = tram.MissingAscentError

VOCAB, WIDTH, CLASSES, LENGTH = 23, 8, 3, 5
BATCH = 4


class Net(nn.Module):
    """Embedding → mean over tokens → linear: an nn.Embedding for TRAM's noise, no dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(dim=1))


def make_data(batches: int, seed: int = 3) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batches * BATCH, LENGTH), generator=generator)
    labels = torch.randint(0, CLASSES, (batches * BATCH,), generator=generator)
    return [
        (tokens[i * BATCH : (i + 1) * BATCH], labels[i * BATCH : (i + 1) * BATCH])
        for i in range(batches)
    ]


def loader(data: list[tuple[Tensor, Tensor]]) -> torch.utils.data.DataLoader:
    tokens = torch.cat([x for x, _ in data])
    labels = torch.cat([y for _, y in data])
    dataset = torch.utils.data.TensorDataset(tokens, labels)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


def loss_of(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    tokens, labels = batch
    return nn.functional.cross_entropy(net(tokens), labels)


MethodFactory = Callable[[torch.optim.Optimizer, nn.Module], TwoPassOptimizer]

METHODS: dict[str, MethodFactory] = {
    "sam": lambda base, net: tram.SAM(base, rho=0.37),
    "asam": lambda base, net: tram.ASAM(base, rho=0.83, eta=0.013),
    "fisher_sam": lambda base, net: tram.FisherSAM(base, rho=0.21, eta=0.7),
    "tram_noise": lambda base, net: tram.TRAM(base, net, trust_region="noise", sigma=0.3, seed=5),
    "tram_ema": lambda base, net: tram.TRAM(base, net, trust_region="ema", ema_decay=0.7),
    "tram_previous": lambda base, net: tram.TRAM(base, net, trust_region="previous"),
    "tram_fisher": lambda base, net: tram.TRAMFisher(base, net, sigma=0.3, rho=0.21, eta=0.7),
}


def make_base(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.43, momentum=0.6, weight_decay=0.01)


class Module(pl.LightningModule):
    def __init__(self, method: str | None, *, seed: int = 0, manual: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = Net()
        self.method = method
        self.manual = manual
        self.automatic_optimization = manual is None
        self.first_pass_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.manual == "manual_step":
            return manual_step(self, lambda: loss_of(self.net, batch))
        if self.manual == "closure":
            optimizer = self.optimizers()

            def closure() -> Tensor:
                optimizer.zero_grad()
                loss = loss_of(self.net, batch)
                self.manual_backward(loss)
                return loss

            optimizer.step(closure=closure)  # the classic SAM closure: the wrapper calls it twice
            return None
        if self.manual == "explicit":
            optimizer = self.optimizers()
            optimizer.zero_grad()
            with optimizer.first_pass():
                loss = loss_of(self.net, batch)
                self.manual_backward(loss)
            if optimizer.first_step():  # on the LightningOptimizer proxy
                self.manual_backward(loss_of(self.net, batch))
            optimizer.step()
            return None
        loss = loss_of(self.net, batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        base = make_base(self.net)
        return base if self.method is None else METHODS[self.method](base, self.net)


class MemoryLogger(Logger):
    """Keeps every logged metric in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((int(step or 0), dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> list[float]:
        return [metrics[key] for _, metrics in self.history if key in metrics]


def trainer(**kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(**options)


def fit(module: Module, data: list[tuple[Tensor, Tensor]], **kwargs: Any) -> Any:
    run = trainer(**kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        run.fit(module, loader(data))
    return run


def hand_loop(
    method: str | None,
    data: list[tuple[Tensor, Tensor]],
    *,
    accumulate: int = 1,
    clip: float | None = None,
    seed: int = 0,
) -> tuple[Net, TwoPassOptimizer | torch.optim.Optimizer, list[float]]:
    """The reference: accumulating_closure + step(closure), or the explicit form when clipping."""
    torch.manual_seed(seed)
    net = Net()
    base = make_base(net)
    optimizer = base if method is None else METHODS[method](base, net)
    losses = []
    for start in range(0, len(data), accumulate):
        window = data[start : start + accumulate]
        closure = tram.accumulating_closure(
            optimizer,
            window,
            lambda batch: loss_of(net, batch),
            weights=[1 / accumulate] * len(window),
        )
        if clip is None:
            losses.append(float(optimizer.step(closure)))
            continue
        assert isinstance(optimizer, TwoPassOptimizer)
        with optimizer.first_pass():
            losses.append(float(closure()))
        if optimizer.first_step():
            closure()
        optimizer.restore()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.second_step()
    return net, optimizer, losses


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


# ---------------------------------------------------------------------- automatic optimization
@pytest.mark.parametrize("method", list(METHODS))
def test_accumulation_equals_accumulating_closure(method: str) -> None:
    data = make_data(6)
    module = Module(method)
    fit(module, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
    net, optimizer, _ = hand_loop(method, data, accumulate=2)
    assert_same_weights(module.net, net)
    wrapper = module.trainer.optimizers[0]
    assert wrapper.steps == optimizer.steps == 3
    if method.startswith("tram") and method != "tram_fisher":  # TRAM-Fisher measures no d
        assert wrapper.radius_history == optimizer.radius_history
        assert len(wrapper.radius_history) == 3


def test_accumulation_short_last_window() -> None:
    """5 batches, k=2: Lightning steps on the final batch alone, still normalised by 2."""
    data = make_data(5)
    module = Module("sam")
    fit(module, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
    torch.manual_seed(0)
    net = Net()
    optimizer = METHODS["sam"](make_base(net), net)
    for start in range(0, 5, 2):
        window = data[start : start + 2]
        closure = tram.accumulating_closure(
            optimizer, window, lambda batch: loss_of(net, batch), weights=[0.5] * len(window)
        )
        optimizer.step(closure)
    assert_same_weights(module.net, net)


class WithoutBatchIndex(Module):
    def training_step(self, batch: Any) -> Tensor:  # type: ignore[override]
        return loss_of(self.net, batch)


def test_a_training_step_without_batch_idx_is_replayed_as_lightning_calls_it() -> None:
    """``training_step(self, batch)`` (Lightning passes ``batch_idx`` only when the signature
    takes it): the replay used to pass it anyway and raise ``TypeError``."""
    data = make_data(4)
    module = WithoutBatchIndex("sam")
    fit(module, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
    net, _, _ = hand_loop("sam", data, accumulate=2)
    assert_same_weights(module.net, net)


class SkippingBatches(Module):
    """Returns None from ``training_step`` on the batches named: Lightning's way to skip one."""

    def __init__(self, method: str, skipped: set[int]) -> None:
        super().__init__(method)
        self.skipped = skipped

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return None if batch_idx in self.skipped else loss_of(self.net, batch)


@pytest.mark.parametrize(("accumulate", "skipped"), [(1, {1}), (2, {2, 3})])
@pytest.mark.parametrize("method", ["sam", "tram_previous"])
def test_windows_whose_training_steps_return_none_take_no_step(
    method: str, accumulate: int, skipped: set[int]
) -> None:
    """A window where every ``training_step`` returned None has no gradient: no ascent and no
    step, as a plain optimizer moves nothing there (it used to raise from ``first_step()``,
    finding no gradients). The run is the hand loop over the other windows."""
    data = make_data(6)
    module = SkippingBatches(method, skipped)
    fit(module, data, max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[TramCallback()])
    kept = [batch for index, batch in enumerate(data) if index not in skipped]
    net, optimizer, _ = hand_loop(method, kept, accumulate=accumulate)
    assert_same_weights(module.net, net)
    assert module.trainer.optimizers[0].steps == optimizer.steps


class WithBatchNorm(Module):
    def __init__(self) -> None:
        super().__init__("sam")
        self.norm = nn.BatchNorm1d(CLASSES)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self.norm(self.net(tokens)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return tram.SAM(make_base(self), rho=0.37, model=self)


def test_stochastic_weight_averagings_batchnorm_epoch_takes_no_step() -> None:
    """With a BatchNorm, ``StochasticWeightAveraging`` adds an epoch that only recomputes the
    running statistics of the averaged weights: no backward, and no step by its own account.
    The callback used to ascend from the last real step's gradient, replay and step there,
    ending 0.013 off the average; the weights are now the average, bit for bit (a plain
    optimizer steps on the stale gradient there: 0.034 off)."""
    averaging = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    module = WithBatchNorm()
    fit(module, make_data(5), max_epochs=3, callbacks=[averaging, TramCallback()])
    assert averaging._average_model is not None
    for p, q in zip(module.parameters(), averaging._average_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lr_find_runs_its_steps_without_the_callback() -> None:
    """``Tuner.lr_find`` swaps the Trainer's callbacks for its own while it trains: the
    callback's step hook, still on the module, used to raise (it saw no batch start). Its
    steps are now the wrapper's own, exact ``step(closure)`` under Lightning's closure, and the
    weights are put back after."""
    module = Module("sam")
    before = [p.detach().clone() for p in module.parameters()]
    run = trainer(max_epochs=1, callbacks=[TramCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finder = pl.tuner.Tuner(run).lr_find(
            module, train_dataloaders=loader(make_data(8)), num_training=5, update_attr=False
        )
    assert finder is not None
    assert len(finder.results["lr"]) == 5
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


def test_gradient_clipping_clips_the_descent_gradient() -> None:
    data = make_data(4)
    module = Module("asam")
    fit(
        module,
        data,
        max_epochs=1,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        callbacks=[TramCallback()],
    )
    net, _, _ = hand_loop("asam", data, accumulate=2, clip=0.05)
    assert_same_weights(module.net, net)
    unclipped, _, _ = hand_loop("asam", data, accumulate=2)
    assert not torch.equal(net.head.weight, unclipped.head.weight)  # the clip was active


def test_plain_optimizer_is_untouched() -> None:
    data = make_data(4)
    module = Module(None)
    fit(module, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
    net, _, _ = hand_loop(None, data, accumulate=2)
    assert_same_weights(module.net, net)


def test_logs_first_pass_loss_and_radius() -> None:
    data = make_data(4)
    module = Module("tram_noise")
    logger = MemoryLogger()
    fit(module, data, max_epochs=1, logger=logger, callbacks=[TramCallback()])
    _, optimizer, losses = hand_loop("tram_noise", data)
    assert logger.values("train_loss") == pytest.approx(losses, rel=1e-6, abs=0)
    radii = logger.values("tram/radius")
    assert radii == pytest.approx(optimizer.radius_history, rel=1e-6)
    assert len(radii) == 4
    assert all(r > 0 for r in radii)
    assert len(logger.values("tram/ascent_grad_norm")) == 4
    assert logger.values("tram/skipped_ascents") == [0.0] * 4


class MetricsModule(Module):
    """Updates torchmetrics metrics in the training step, as Lightning's documentation does:
    a tensor state (the mean loss), a list state (every prediction) and a metric called for its
    batch value and logged (accuracy). Manually (``manual_step``), inside ``loss_fn``."""

    def __init__(self, method: str, *, manual: str | None = None) -> None:
        super().__init__(method, manual=manual)
        self.mean_loss = torchmetrics.MeanMetric()
        self.predictions = torchmetrics.CatMetric()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(CLASSES, average="micro")

    def measured_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        tokens, labels = batch
        logits = self.net(tokens)
        loss = nn.functional.cross_entropy(logits, labels)
        self.mean_loss.update(loss.detach())
        self.predictions.update(logits.detach().argmax(dim=-1))
        self.log("train_accuracy", self.accuracy(logits.detach(), labels), on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.manual == "manual_step":
            return manual_step(self, lambda: self.measured_loss(batch))
        return self.measured_loss(batch)


def first_pass_outputs(method: str, data: list[tuple[Tensor, Tensor]], accumulate: int):
    """The hand loop's loss and predictions of every micro-batch at θ (its first pass)."""
    torch.manual_seed(0)
    net = Net()
    optimizer = METHODS[method](make_base(net), net)
    losses: list[Tensor] = []
    predictions: list[Tensor] = []

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        logits = net(batch[0])
        if not optimizer.is_perturbed:
            losses.append(nn.functional.cross_entropy(logits, batch[1]).detach())
            predictions.append(logits.detach().argmax(dim=-1))
        return nn.functional.cross_entropy(logits, batch[1])

    for start in range(0, len(data), accumulate):
        window = data[start : start + accumulate]
        optimizer.step(tram.accumulating_closure(optimizer, window, loss_fn))
    return torch.stack(losses), torch.cat(predictions)


@pytest.mark.parametrize(
    ("manual", "accumulate"), [(None, 2), ("manual_step", 1)], ids=["TramCallback", "manual_step"]
)
def test_torchmetrics_count_each_batch_once_at_theta(manual: str | None, accumulate: int) -> None:
    """A metric updated in the training step sees the first pass only: the replay at θ+ε
    (TramCallback) or the second call of ``loss_fn`` (manual_step) leaves every metric's state
    as the first pass left it, so the epoch's metrics are a plain optimizer's, at θ."""
    data = make_data(4)
    module = MetricsModule("sam", manual=manual)
    logger = MemoryLogger()
    callbacks = [TramCallback()] if manual is None else []
    fit(
        module,
        data,
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=logger,
        callbacks=callbacks,
    )
    losses, predictions = first_pass_outputs("sam", data, accumulate)
    labels = torch.cat([y for _, y in data])
    assert module.mean_loss.update_count == len(data)
    assert float(module.mean_loss.compute()) == pytest.approx(float(losses.mean()), rel=1e-6)
    assert torch.equal(module.predictions.compute(), predictions)
    accuracy = float((predictions == labels).float().mean())
    assert logger.values("train_accuracy_epoch") == [pytest.approx(accuracy)]


def test_loss_logged_at_theta_not_theta_plus_epsilon() -> None:
    """With a large radius the loss at θ+ε is far above the loss at θ; the log shows θ's."""
    data = make_data(2)
    module = Module(None)
    module.configure_optimizers = lambda: tram.SAM(make_base(module.net), rho=2.0)  # type: ignore[method-assign]
    logger = MemoryLogger()
    initial = copy.deepcopy(module.net)
    fit(module, data, max_epochs=1, max_steps=1, logger=logger, callbacks=[TramCallback()])
    logged = logger.values("train_loss")
    assert logged == [pytest.approx(float(loss_of(initial, data[0])), rel=1e-6)]


def test_bf16_mixed_equals_autocast_loop() -> None:
    data = make_data(4)
    module = Module("sam")
    fit(
        module,
        data,
        max_epochs=1,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        callbacks=[TramCallback()],
    )
    net, _ = bf16_hand_loop("sam", data)
    assert_same_weights(module.net, net)


def bf16_hand_loop(
    method: str, data: list[tuple[Tensor, Tensor]]
) -> tuple[Net, TwoPassOptimizer | torch.optim.Optimizer]:
    """bf16-mixed's reference with k = 2: ``accumulating_closure`` under CPU bf16 autocast
    (which moves the weights otherwise than float32 does, checked here)."""
    torch.manual_seed(0)
    net = Net()
    optimizer = METHODS[method](make_base(net), net)

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_of(net, batch)

    for start in range(0, len(data), 2):
        optimizer.step(tram.accumulating_closure(optimizer, data[start : start + 2], loss_fn))
    fp32, _, _ = hand_loop(method, data, accumulate=2)
    assert not torch.equal(fp32.head.weight, net.head.weight)  # autocast was on
    return net, optimizer


def fp16_plugin() -> MixedPrecision:
    # Lightning maps "16-mixed" to bf16 on CPU; the plugin with a CPU GradScaler is its GPU path.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))


def test_fp16_mixed_equals_scaled_step() -> None:
    data = make_data(3)
    module = Module("fisher_sam")  # its ascent is not scale-invariant: grad_scale must be right
    fit(module, data, max_epochs=1, plugins=[fp16_plugin()], callbacks=[TramCallback()])
    assert_same_weights(module.net, scaled_step_loop("fisher_sam", data))
    assert module.trainer.optimizers[0].steps == 3


def test_fp16_mixed_overflow_skips_the_step_at_theta() -> None:
    data = make_data(1)
    module = Module("sam")
    with torch.no_grad():
        module.net.head.bias.fill_(1e5)  # fp16 logits overflow: a nan loss in the first pass
    before = copy.deepcopy(module.net)
    plugin = fp16_plugin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit(module, data, max_epochs=1, plugins=[plugin], callbacks=[TramCallback()])
    assert_same_weights(module.net, before)
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() < 2.0**10  # backed off
    assert not module.trainer.optimizers[0].is_perturbed


def test_resume_is_bit_exact(tmp_path: Any) -> None:
    data = make_data(4)
    method = "tram_ema"  # the EMA reference lives in the optimizer's checkpoint
    straight = Module(method)
    fit(straight, data, max_epochs=2, accumulate_grad_batches=2, callbacks=[TramCallback()])

    first = Module(method)
    run = fit(first, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
    path = str(tmp_path / "epoch1.ckpt")
    run.save_checkpoint(path)
    resumed = Module(method, seed=1)  # other initial weights: everything must come from the file
    run = trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[TramCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(resumed, loader(data), ckpt_path=path)
    assert_same_weights(resumed.net, straight.net)
    assert run.optimizers[0].steps == 4


def test_callback_with_deepspeed_like_strategy_refuses() -> None:
    callback = TramCallback()

    class Strategy:
        handles_gradient_accumulation = True

    class FakeTrainer:
        strategy = Strategy()

    with pytest.raises(ValueError, match="does not support Strategy"):
        callback.setup(FakeTrainer(), Module("sam"), "fit")


# ---------------------------------------------------------------------- without the callback
def test_lightning_closure_is_recognised() -> None:
    """The structure tram._callers relies on: the closure Lightning's precision plugin passes to
    optimizer.step(closure) under automatic optimization leads to the Trainer."""
    from tram._callers import _lightning_trainer

    seen: list[Any] = []

    class Recording(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            seen.append(closure)
            return super().step(closure)

    module = Module(None)
    module.configure_optimizers = lambda: Recording(module.net.parameters(), lr=0.1)  # type: ignore[method-assign]
    run = fit(module, make_data(1), max_epochs=1)
    assert len(seen) == 1
    assert _lightning_trainer(seen[0]) is run
    assert _lightning_trainer(lambda: None) is None


def test_without_callback_accumulation_refuses() -> None:
    module = Module("sam")
    with pytest.raises(RuntimeError, match=r"accumulate_grad_batches=2.*TramCallback"):
        fit(module, make_data(2), max_epochs=1, accumulate_grad_batches=2)


def test_without_callback_clipping_refuses() -> None:
    module = Module("sam")
    with pytest.raises(RuntimeError, match=r"gradient_clip_val=0\.5.*TramCallback"):
        fit(module, make_data(2), max_epochs=1, gradient_clip_val=0.5)


def test_without_callback_single_batch_is_exact_and_warns() -> None:
    data = make_data(3)
    module = Module("sam")
    run = trainer(max_epochs=1)
    with pytest.warns(UserWarning, match=r"loss at the perturbed weights.*TramCallback"):
        run.fit(module, loader(data))
    net, _, _ = hand_loop("sam", data)
    assert_same_weights(module.net, net)


def test_without_callback_fp16_refuses_the_step_without_ascent() -> None:
    module = Module("sam")
    before = [p.detach().clone() for p in module.parameters()]
    run = trainer(max_epochs=1, plugins=[fp16_plugin()])
    with pytest.raises(MissingAscentError, match="16-mixed"):
        run.fit(module, loader(make_data(2)))
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


# ---------------------------------------------------------------------- manual optimization
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_manual_step_equals_step_closure(precision: str) -> None:
    data = make_data(3)
    module = Module("tram_noise", manual="manual_step")
    logger = MemoryLogger()
    fit(module, data, max_epochs=1, precision=precision, logger=logger)
    torch.manual_seed(0)
    net = Net()
    optimizer = METHODS["tram_noise"](make_base(net), net)
    autocast = precision == "bf16-mixed"
    for batch in data:

        def closure(batch: tuple[Tensor, Tensor] = batch) -> Tensor:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(net, batch)
            loss.backward()
            return loss

        optimizer.step(closure)
    assert_same_weights(module.net, net)
    assert logger.values("tram/radius") == pytest.approx(optimizer.radius_history, rel=1e-6)


@pytest.mark.parametrize("method", ["tram_ema", "tram_noise"])
def test_manual_step_resume_is_bit_exact(tmp_path: Any, method: str) -> None:
    """manual_step resumed through Lightning's checkpoint (``fit(ckpt_path=...)``) on a module
    built with other weights ends where the uninterrupted run does, bit for bit: the optimizer's
    state in the checkpoint carries TRAM's EMA reference, or its noise generator, and the step
    counter."""
    data = make_data(3)
    straight = Module(method, manual="manual_step")
    fit(straight, data, max_epochs=2)

    first = Module(method, manual="manual_step")
    run = fit(first, data, max_epochs=1)
    path = str(tmp_path / "epoch1.ckpt")
    run.save_checkpoint(path)
    resumed = Module(method, seed=1, manual="manual_step")
    run = trainer(max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(resumed, loader(data), ckpt_path=path)
    assert_same_weights(resumed.net, straight.net)
    assert run.optimizers[0].steps == 6


def test_manual_step_fp16_equals_scaled_step() -> None:
    data = make_data(3)
    module = Module("sam", manual="manual_step")
    fit(module, data, max_epochs=1, plugins=[fp16_plugin()])
    assert_same_weights(module.net, scaled_step_loop("sam", data))


def test_manual_step_closure_is_exact_and_not_refused() -> None:
    data = make_data(3)
    module = Module("asam", manual="closure")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the automatic-optimization guard stays off
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        fit(module, data, max_epochs=1)
    net, _, _ = hand_loop("asam", data)
    assert_same_weights(module.net, net)


def test_manual_explicit_form_through_the_proxy() -> None:
    """first_step() on the LightningOptimizer proxy, then its step(): the real wrapper's state."""
    data = make_data(3)
    module = Module("sam", manual="explicit")
    fit(module, data, max_epochs=1)
    net, _, _ = hand_loop("sam", data)
    assert_same_weights(module.net, net)
    wrapper = module.trainer.optimizers[0]
    assert wrapper.steps == 3
    assert not wrapper.is_perturbed


def test_hooks_before_the_step_see_theta() -> None:
    """on_before_optimizer_step (and clipping) run with the weights restored to θ."""

    class Watch(pl.Callback):
        def __init__(self) -> None:
            self.at_start: list[Tensor] = []
            self.before_step: list[Tensor] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            self.at_start.append(pl_module.net.head.weight.detach().clone())

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.before_step.append(pl_module.net.head.weight.detach().clone())

    watch = Watch()
    fit(Module("sam"), make_data(2), max_epochs=1, callbacks=[TramCallback(), watch])
    assert len(watch.before_step) == 2
    for theta, seen in zip(watch.at_start, watch.before_step, strict=True):
        assert torch.equal(theta, seen)


# ---------------------------------------------------------------------- torch.compile
COMPILES = ("torch.compile(net)", "net.compile()")


def compiled_module(
    method: str | None,
    how: str,
    backend: Callable[..., Any],
    *,
    seed: int = 0,
    manual: str | None = None,
) -> Module:
    """``Module`` whose ``net`` is compiled: wrapped (``self.net = torch.compile(Net())``, the
    checkpoint keys gain ``_orig_mod.``) or in place (``self.net.compile()``)."""
    # Dynamo's cache belongs to the code object (Net.forward), shared by every Net of the
    # process: without the reset a run would reuse an earlier run's graphs and trace nothing.
    torch._dynamo.reset()
    module = Module(method, seed=seed, manual=manual)
    if how == "torch.compile(net)":
        module.net = torch.compile(module.net, backend=backend)  # type: ignore[assignment]
    else:
        module.net.compile(backend=backend)
    return module


def tram_radii(method: str) -> bool:
    return method.startswith("tram") and method != "tram_fisher"  # TRAM-Fisher measures no d


@pytest.mark.parametrize(
    ("method", "how"),
    some_fast_rows(
        ((f"{method}-{how}", (method, how)) for how in COMPILES for method in METHODS),
        *("sam-torch.compile(net)", "tram_noise-net.compile()"),
        *("tram_fisher-torch.compile(net)", "tram_previous-net.compile()"),
    ),
)
def test_compiled_net_accumulation_equals_the_eager_loop(method: str, how: str) -> None:
    """The network compiled inside the LightningModule, k = 2: the eager loop's weights and d,
    bit for bit, and d logged. TRAM-Fisher included: Lightning's first forward of the compiled
    net runs inside its noised first pass, where dynamo traces the noise hook in (a graph traced
    before is refused, see the next test)."""
    data = make_data(6)
    backend, graphs = counting_backend()
    module = compiled_module(method, how, backend)
    logger = MemoryLogger()
    fit(
        module,
        data,
        max_epochs=1,
        accumulate_grad_batches=2,
        logger=logger,
        callbacks=[TramCallback()],
    )
    assert graphs
    net, optimizer, _ = hand_loop(method, data, accumulate=2)
    assert_same_weights(module.net, net)
    wrapper = module.trainer.optimizers[0]
    assert wrapper.steps == optimizer.steps == 3
    if tram_radii(method):
        assert wrapper.radius_history == optimizer.radius_history
        assert min(optimizer.radius_history[1:]) > 0
        assert logger.values("tram/radius") == pytest.approx(optimizer.radius_history, rel=1e-6)


@pytest.mark.parametrize("how", COMPILES)
def test_compiled_net_traced_before_fit_tram_fisher(how: str) -> None:
    """A training graph traced before TRAM-Fisher adds its noise hook runs without it (dynamo
    does not guard on module hooks): the ``torch.compile(net)`` wrapper is refused at the first
    ascent, naming the fix, with the weights untouched; in place, TRAM-Fisher runs the noised
    pass eagerly (``tram.noise.eager_forward``) and the steps are the eager loop's."""
    data = make_data(4)
    backend, graphs = counting_backend()
    module = compiled_module("tram_fisher", how, backend)
    module.net(data[0][0])  # a training-mode forward before fit: the graph is traced here
    assert graphs
    before = copy.deepcopy(module.net)
    if how == "torch.compile(net)":
        with pytest.raises(RuntimeError, match=r"ignores the noise hook .* model\._orig_mod"):
            fit(module, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
        assert_same_weights(module.net, before)
        return
    fit(module, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
    net, _, _ = hand_loop("tram_fisher", data, accumulate=2)
    assert_same_weights(module.net, net)


class ForwardModule(Module):
    """``training_step`` through ``self(...)``, logging nothing: ``trainer.fit(torch.compile(
    module))`` compiles the module's ``forward`` and ``training_step``
    (``lightning.pytorch.utilities.compile.from_compiled``), and ``self.log`` inside a compiled
    ``training_step`` stops dynamo with any optimizer (torch 2.13, Lightning 2.6)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)


@pytest.mark.parametrize("method", some_fast(METHODS, "tram_noise", "tram_fisher"))
def test_fit_of_a_compiled_lightning_module_equals_the_eager_loop(method: str) -> None:
    """Lightning's documented way, ``trainer.fit(torch.compile(module))``, k = 2: the callback's
    replay at θ+ε calls the compiled ``training_step`` too; weights and d are the eager loop's."""
    data = make_data(6)
    backend, graphs = counting_backend()
    torch._dynamo.reset()
    module = ForwardModule(method)
    logger = MemoryLogger()
    run = trainer(
        max_epochs=1, accumulate_grad_batches=2, logger=logger, callbacks=[TramCallback()]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(torch.compile(module, backend=backend), loader(data))
    assert module._compiler_ctx is not None  # fit ran the LightningModule Lightning compiled
    assert graphs
    net, optimizer, _ = hand_loop(method, data, accumulate=2)
    assert_same_weights(module.net, net)
    wrapper = run.optimizers[0]
    assert wrapper.steps == optimizer.steps == 3
    if tram_radii(method):
        assert wrapper.radius_history == optimizer.radius_history
        assert logger.values("tram/radius") == pytest.approx(optimizer.radius_history, rel=1e-6)


@pytest.mark.parametrize("how", COMPILES)
def test_compiled_net_bf16_mixed_equals_autocast_loop(how: str) -> None:
    """bf16-mixed with a compiled net, k = 2: the eager loop under autocast, bit for bit."""
    data = make_data(4)
    backend, graphs = counting_backend()
    module = compiled_module("tram_noise", how, backend)
    fit(
        module,
        data,
        max_epochs=1,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        callbacks=[TramCallback()],
    )
    assert graphs
    net, optimizer = bf16_hand_loop("tram_noise", data)
    assert_same_weights(module.net, net)
    assert module.trainer.optimizers[0].radius_history == optimizer.radius_history


@pytest.mark.parametrize("how", some_fast(COMPILES, "torch.compile(net)"))
def test_compiled_net_resume_is_bit_exact(tmp_path: Any, how: str) -> None:
    """A run with a compiled net resumed from Lightning's checkpoint into a module built with
    other weights ends where the uninterrupted one does, bit for bit; the wrapped net's keys
    carry ``_orig_mod.``, so a checkpoint loads into a module compiled the same way."""
    data = make_data(4)
    method = "tram_ema"  # the EMA reference lives in the optimizer's checkpoint
    backend, graphs = counting_backend()
    straight = compiled_module(method, how, backend)
    fit(straight, data, max_epochs=2, accumulate_grad_batches=2, callbacks=[TramCallback()])

    first = compiled_module(method, how, backend)
    run = fit(first, data, max_epochs=1, accumulate_grad_batches=2, callbacks=[TramCallback()])
    path = str(tmp_path / "epoch1.ckpt")
    run.save_checkpoint(path)
    keys = set(torch.load(path, weights_only=False)["state_dict"])
    wrapped = how == "torch.compile(net)"
    assert ("net._orig_mod.embed.weight" in keys) == wrapped
    assert ("net.embed.weight" in keys) != wrapped
    resumed = compiled_module(method, how, backend, seed=1)  # weights must come from the file
    graphs.clear()
    run = trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[TramCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(resumed, loader(data), ckpt_path=path)
    assert graphs
    assert_same_weights(resumed.net, straight.net)
    assert run.optimizers[0].steps == 4
    history = straight.trainer.optimizers[0].radius_history
    assert run.optimizers[0].radius_history[-2:] == history[-2:]


@pytest.mark.parametrize(
    ("method", "how"),
    some_fast_rows(
        ((f"{method}-{how}", (method, how)) for how in COMPILES for method in METHODS),
        *("fisher_sam-torch.compile(net)", "tram_noise-net.compile()"),
    ),
)
def test_compiled_net_manual_step_equals_step_closure(method: str, how: str) -> None:
    """manual_step with a compiled net: the eager ``step(closure)`` loop's weights and d."""
    data = make_data(3)
    backend, graphs = counting_backend()
    module = compiled_module(method, how, backend, manual="manual_step")
    logger = MemoryLogger()
    fit(module, data, max_epochs=1, logger=logger)
    assert graphs
    net, optimizer, _ = hand_loop(method, data)
    assert_same_weights(module.net, net)
    if tram_radii(method):
        assert module.trainer.optimizers[0].radius_history == optimizer.radius_history
        assert logger.values("tram/radius") == pytest.approx(optimizer.radius_history, rel=1e-6)


@pytest.mark.parametrize("how", COMPILES)
def test_compiled_net_fp16_mixed_equals_scaled_step(how: str) -> None:
    """ "16-mixed" (a CPU GradScaler in Lightning's plugin) with a compiled net: the eager
    ``tram.scaled_step`` loop, bit for bit (FisherSAM: its ascent is not scale-invariant)."""
    data = make_data(3)
    backend, graphs = counting_backend()
    module = compiled_module("fisher_sam", how, backend)
    fit(module, data, max_epochs=1, plugins=[fp16_plugin()], callbacks=[TramCallback()])
    assert graphs
    assert_same_weights(module.net, scaled_step_loop("fisher_sam", data))
    assert module.trainer.optimizers[0].steps == 3


def scaled_step_loop(method: str, data: list[tuple[Tensor, Tensor]]) -> Net:
    """The eager reference under "16-mixed": fp16 autocast and ``tram.scaled_step``."""
    torch.manual_seed(0)
    net = Net()
    optimizer = METHODS[method](make_base(net), net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for batch in data:

        def loss_fn(batch: tuple[Tensor, Tensor] = batch) -> Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                return loss_of(net, batch)

        tram.scaled_step(optimizer, scaler, loss_fn)
    return net


@pytest.mark.parametrize(
    ("precision", "how"),
    some_fast_rows(
        (
            (f"{precision}-{how}", (precision, how))
            for how in COMPILES
            for precision in ("bf16-mixed", "16-mixed")
        ),
        *("bf16-mixed-torch.compile(net)", "16-mixed-net.compile()"),
    ),
)
def test_compiled_net_manual_step_under_mixed_precision(precision: str, how: str) -> None:
    """manual_step with a compiled net under bf16-mixed (the eager ``step(closure)`` loop
    under bf16 autocast) and "16-mixed" (the eager ``tram.scaled_step`` loop), bit for bit."""
    data = make_data(3)
    backend, graphs = counting_backend()
    if precision == "16-mixed":
        # FisherSAM: its ascent is not scale-invariant, so grad_scale must be right.
        module = compiled_module("fisher_sam", how, backend, manual="manual_step")
        fit(module, data, max_epochs=1, plugins=[fp16_plugin()])
        assert graphs
        assert_same_weights(module.net, scaled_step_loop("fisher_sam", data))
        return
    module = compiled_module("tram_noise", how, backend, manual="manual_step")
    fit(module, data, max_epochs=1, precision=precision)
    assert graphs
    torch.manual_seed(0)
    net = Net()
    optimizer = METHODS["tram_noise"](make_base(net), net)
    for batch in data:

        def closure(batch: tuple[Tensor, Tensor] = batch) -> Tensor:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(net, batch)
            loss.backward()
            return loss

        optimizer.step(closure)
    assert_same_weights(module.net, net)
    assert module.trainer.optimizers[0].radius_history == optimizer.radius_history
    fp32, _, _ = hand_loop("tram_noise", data)
    assert not torch.equal(fp32.head.weight, net.head.weight)  # autocast was on


@pytest.mark.parametrize("how", some_fast(COMPILES, "torch.compile(net)"))
def test_compiled_net_manual_step_resume_is_bit_exact(tmp_path: Any, how: str) -> None:
    """manual_step with a compiled net resumed through ``fit(ckpt_path=...)`` into a module
    built with other weights: the uninterrupted run's weights (TRAM-x's noise generator and
    step counter from the checkpoint), bit for bit."""
    data = make_data(3)
    method = "tram_noise"
    backend, graphs = counting_backend()
    straight = compiled_module(method, how, backend, manual="manual_step")
    fit(straight, data, max_epochs=2)

    first = compiled_module(method, how, backend, manual="manual_step")
    run = fit(first, data, max_epochs=1)
    path = str(tmp_path / "epoch1.ckpt")
    run.save_checkpoint(path)
    resumed = compiled_module(method, how, backend, seed=1, manual="manual_step")
    graphs.clear()
    run = trainer(max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(resumed, loader(data), ckpt_path=path)
    assert graphs
    assert_same_weights(resumed.net, straight.net)
    assert run.optimizers[0].steps == 6


# ---------------------------------------------------------------------- the example
@pytest.mark.slow
def test_example_lightning_fine_tunes_minilm(tmp_path: Any) -> None:
    stdout = run_example("lightning.py", None, f"--output-dir={tmp_path}")
    assert "method: tram (TRAM), steps: 2" in stdout
    assert "TRAM radius d" in stdout
    assert list(tmp_path.rglob("events.out.tfevents.*"))


# ---------------------------------------------------------------------- DDP
class SaveBatches(pl.Callback):
    """Saves every batch each rank trains on (spawned processes: through files)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        torch.save(batch, os.path.join(self.directory, f"{trainer.global_rank}_{batch_idx}.pt"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["sam", "tram_ema"])
def test_ddp_with_accumulation_equals_global_batch(tmp_path: Any, method: str) -> None:
    """2 processes (gloo), k = 2: one synchronised ascent from the global accumulated gradient,
    every rank's micro-batches replayed (no_sync but on the last); the weights equal the
    single-process loop on the union of the ranks' j-th micro-batches. (TRAM's d is the mean
    over ranks of equal-sized batches, so a deterministic target matches too; TRAM-x draws its
    noise per rank, another realisation.)"""
    data = make_data(8)
    module = Module(method)
    run = trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        devices=2,
        strategy="ddp_spawn",
        callbacks=[TramCallback(), SaveBatches(str(tmp_path))],
        default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, loader(data))
    seen = {
        (rank, index): torch.load(tmp_path / f"{rank}_{index}.pt")
        for rank in range(2)
        for index in range(4)
    }
    global_batches = [
        (
            torch.cat([seen[0, j][0], seen[1, j][0]]),
            torch.cat([seen[0, j][1], seen[1, j][1]]),
        )
        for j in range(4)
    ]
    net, _, _ = hand_loop(method, global_batches, accumulate=2)
    for (name, p), q in zip(module.net.named_parameters(), net.parameters(), strict=True):
        # All-reduced means against means over the concatenated batch: rounding only.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- FSDP2
FSDP2_METHODS = ("sam", "tram_noise")


class ShardedModule(Module):
    """``Module`` under ModelParallelStrategy: ``configure_model`` shards the network with
    FSDP2 (the root only, so it holds every parameter), before ``configure_optimizers`` builds
    the tram wrapper on the sharded parameters."""

    batches_seen = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.batches_seen += 1

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def full_parameters(net: nn.Module) -> Tensor:
    full = [getattr(p, "full_tensor", lambda p=p: p)() for p in net.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full])


def wrapped_loop(method: str, batches: list[tuple[Tensor, Tensor]], wrap: Callable) -> Tensor:
    """The two-pass step written out with k = 2 on this rank's batches, the network wrapped by
    ``wrap`` (DDP, or FSDP2 in place) before the optimizer is built."""
    torch.manual_seed(0)
    net = Net()
    model = wrap(net)
    optimizer = METHODS[method](make_base(net), net)
    for start in range(0, len(batches), 2):
        window = batches[start : start + 2]
        for batch in window:
            with optimizer.first_pass():
                (loss_of(model, batch) / 2).backward()
        if optimizer.first_step():
            for batch in window:
                (loss_of(model, batch) / 2).backward()
        optimizer.restore()
        optimizer.step()
        optimizer.zero_grad()
    return full_parameters(net)


def this_ranks_batches() -> list[tuple[Tensor, Tensor]]:
    """Under torchrun: every other batch of ``make_data(16)``, from this rank's index."""
    return make_data(16)[int(os.environ["RANK"]) :: 2]


def fit_on_two_ranks(
    module: Module, batches: list[tuple[Tensor, Tensor]], root: str, **options: Any
) -> Any:
    """``fit`` under torchrun's two ranks with TramCallback, each rank on ``batches`` (no
    distributed sampler); ``resume`` is the checkpoint to start from, the rest Trainer options."""
    resume = options.pop("resume", None)
    run = trainer(
        devices=2,
        use_distributed_sampler=False,
        callbacks=[TramCallback()],
        default_root_dir=root,
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, loader(batches), ckpt_path=resume)
    return run


def save_on_rank_zero_and_end(results: dict[str, Any], out_path: str) -> NoReturn:
    """Write a torchrun worker's ``results`` (with the world size) from rank 0 and end it."""
    import torch.distributed as dist

    results["world"] = dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    end_distributed_worker()


def launch_worker(tmp_path: Any, flag: str) -> dict[str, Any]:
    """Run this file's worker ``flag`` under torchrun on two ranks; rank 0's results."""
    out = tmp_path / "results.pt"
    torchrun(__file__, flag, str(out))
    results = torch.load(out, weights_only=True)
    assert results["world"] == 2
    return results


def initial_parameters() -> Tensor:
    """The parameters every ``Module`` starts from (seed 0), flat."""
    torch.manual_seed(0)
    return full_parameters(Net())


def _fsdp2_worker(out_path: str) -> None:
    """Run under torchrun (two gloo ranks): Lightning's ModelParallelStrategy with TramCallback,
    then the written-out loop under FSDP2 and DDP on the same batches of each rank."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    data = make_data(16)
    mine = this_ranks_batches()

    def fit_sharded(method: str, epochs: int, resume: str | None = None) -> tuple[Any, Any]:
        module = ShardedModule(method)
        run = fit_on_two_ranks(
            module,
            mine,
            f"{out_path}-{method}",
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            max_epochs=epochs,
            accumulate_grad_batches=2,
            resume=resume,
        )
        return run, module

    results: dict[str, Any] = {}
    for method in FSDP2_METHODS:
        _, straight = fit_sharded(method, 2)
        first, _ = fit_sharded(method, 1)
        checkpoint = f"{out_path}-{method}/epoch-1.ckpt"
        first.save_checkpoint(checkpoint)  # sharded: torch.distributed.checkpoint
        _, resumed = fit_sharded(method, 2, resume=checkpoint)
        results[method] = {
            "lightning": full_parameters(straight.net),
            "resumed": full_parameters(resumed.net),
            "sharded": type(next(straight.net.parameters())).__name__,
            "steps": [m.optimizers().optimizer.steps for m in (straight, resumed)],
            "batches": [m.batches_seen for m in (straight, resumed)],
            "fsdp2": wrapped_loop(method, mine + mine, lambda net: fully_shard(net) or net),
            "ddp": wrapped_loop(method, mine + mine, nn.parallel.DistributedDataParallel),
        }
    global_batches = [
        (torch.cat([data[i][0], data[i + 1][0]]), torch.cat([data[i][1], data[i + 1][1]]))
        for i in range(0, len(data), 2)
    ]
    net, _, _ = hand_loop("sam", global_batches * 2, accumulate=2)
    results["sam"]["one_process"] = full_parameters(net)
    save_on_rank_zero_and_end(results, out_path)


@pytest.mark.distributed
def test_model_parallel_strategy_fsdp2_is_ddp_and_resumes_exactly(tmp_path: Any) -> None:
    """ModelParallelStrategy (two gloo ranks, ``fully_shard`` in ``configure_model``, the tram
    wrapper built on the sharded parameters, k = 2) with TramCallback steps as the written-out
    FSDP2 loop (bit for bit) and as DDP, SAM as one process on the global batch; a resume from
    Lightning's sharded checkpoint ends where the run does, bit for bit. Before the root's
    gathered parameters were freed after TRAM's reference forward, TRAM-x moved 1e-5 off DDP."""
    results = launch_worker(tmp_path, "--fsdp2-worker")
    initial = initial_parameters()
    for method in FSDP2_METHODS:
        result = results[method]
        assert result["sharded"] == "DTensor"
        assert result["steps"] == [8, 8]
        assert result["batches"] == [16, 8]  # the resumed run trained the second epoch only
        assert torch.equal(result["resumed"], result["lightning"])
        assert torch.equal(result["fsdp2"], result["lightning"])
        assert (result["lightning"] - initial).abs().max() > 1e-2
        torch.testing.assert_close(result["lightning"], result["ddp"], rtol=1e-5, atol=1e-6)
    sam = results["sam"]
    torch.testing.assert_close(sam["lightning"], sam["one_process"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- ZeroRedundancyOptimizer
ZERO_METHODS = ("sam", "tram_noise")


class ZeroModule(Module):
    """``Module`` whose base optimizer, ``make_base``'s SGD, is sharded over the ranks by torch's
    ``ZeroRedundancyOptimizer``."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        base = ZeroRedundancyOptimizer(
            self.net.parameters(),
            optimizer_class=torch.optim.SGD,
            lr=0.43,
            momentum=0.6,
            weight_decay=0.01,
        )
        assert self.method is not None
        return METHODS[self.method](base, self.net)


def _zero_worker(out_path: str) -> None:
    """Run under torchrun (two gloo ranks): Lightning's DDP strategy with TramCallback, the
    wrapper around ZeroRedundancyOptimizer(SGD) and around SGD itself, on each rank's batches;
    and the sharded run saved after its first epoch and resumed from Lightning's checkpoint."""
    mine = this_ranks_batches()

    def fit_ddp(module: Module, epochs: int, resume: str | None = None) -> Any:
        root = f"{out_path}-{type(module).__name__}"
        return fit_on_two_ranks(
            module, mine, root, strategy="ddp", max_epochs=epochs, resume=resume
        )

    results: dict[str, Any] = {}
    for method in ZERO_METHODS:
        sharded, plain, resumed = ZeroModule(method), Module(method), ZeroModule(method)
        fit_ddp(sharded, 2)
        fit_ddp(plain, 2)
        checkpoint = f"{out_path}-{method}.ckpt"
        fit_ddp(ZeroModule(method), 1).save_checkpoint(checkpoint)
        fit_ddp(resumed, 2, resume=checkpoint)
        results[method] = {
            "sharded": full_parameters(sharded.net),
            "plain": full_parameters(plain.net),
            "resumed": full_parameters(resumed.net),
            "steps": [m.optimizers().optimizer.steps for m in (sharded, resumed)],
            "owned": len(
                sharded.optimizers().optimizer.base_optimizer.optim.param_groups[0]["params"]
            ),
        }
    save_on_rank_zero_and_end(results, out_path)


@pytest.mark.distributed
def test_ddp_with_a_zero_redundancy_optimizer_is_ddp_and_resumes_exactly(tmp_path: Any) -> None:
    """Lightning's DDP strategy (two gloo ranks) with TramCallback and the wrapper around
    ZeroRedundancyOptimizer(SGD), each rank stepping the parameters it owns: the same weights
    as around SGD itself, bit for bit. Lightning saves such an optimizer through
    ``consolidate_state_dict()`` on every rank and rank 0's ``state_dict()``, which it looks for
    on the wrapper; the run resumed from that checkpoint ends where the run does, bit for bit."""
    results = launch_worker(tmp_path, "--zero-worker")
    initial = initial_parameters()
    for method in ZERO_METHODS:
        result = results[method]
        assert result["steps"] == [16, 16]  # 8 batches a rank, 2 epochs
        assert 0 < result["owned"] < len(list(Net().parameters()))
        assert (result["sharded"] - initial).abs().max() > 1e-2
        assert torch.equal(result["sharded"], result["plain"])
        assert torch.equal(result["resumed"], result["sharded"])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--fsdp2-worker":
    torch.set_num_threads(1)
    _fsdp2_worker(sys.argv[2])
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--zero-worker":
    torch.set_num_threads(1)
    _zero_worker(sys.argv[2])


class InputNormModule(Module):
    """Its loss also normalises the raw tokens with a BatchNorm that has no trainable weights
    and that no perturbed weight feeds: without ``model=`` the guard cannot tell it from another
    model's outside the wrapper's ``second_pass()``."""

    def __init__(self, *, manual: str | None, model_given: bool) -> None:
        super().__init__("sam", manual=manual)
        self.norm = nn.BatchNorm1d(LENGTH, affine=False, momentum=0.3)
        self.model_given = model_given

    def normalised_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        tokens, labels = batch
        shift = self.norm(tokens.float()).mean(dim=1, keepdim=True)
        return nn.functional.cross_entropy(self.net(tokens) + shift, labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.manual == "manual_step":
            return manual_step(self, lambda: self.normalised_loss(batch))
        return self.normalised_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return tram.SAM(make_base(self.net), rho=0.37, model=self if self.model_given else None)


@pytest.mark.parametrize("model_given", [False, True], ids=["without model=", "model="])
@pytest.mark.parametrize("manual", [None, "manual_step"], ids=["TramCallback", "manual_step"])
def test_the_replay_counts_as_the_second_pass_for_batchnorm_statistics(
    manual: str | None, model_given: bool
) -> None:
    """TramCallback and manual_step run the second pass inside the wrapper's ``second_pass()``:
    a BatchNorm on the raw inputs would update its statistics in both passes, silently, as
    another model's; without ``model=`` it is refused, naming ``model=``, and with it the
    statistics keep the first pass's update, one per batch."""
    data = make_data(3)
    module = InputNormModule(manual=manual, model_given=model_given)
    reference = copy.deepcopy(module.norm)
    callbacks = [] if manual else [TramCallback()]
    if not model_given:
        with pytest.raises(RuntimeError, match=r"BatchNorm1d in training mode ran at the .*model="):
            fit(module, data, max_epochs=1, callbacks=callbacks)
        return
    fit(module, data, max_epochs=1, callbacks=callbacks)
    with torch.no_grad():
        for tokens, _ in data:
            reference(tokens.float())
    assert torch.equal(module.norm.running_mean, reference.running_mean)
    assert torch.equal(module.norm.running_var, reference.running_var)
    assert int(module.norm.num_batches_tracked) == len(data)
