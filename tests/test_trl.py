"""tram with TRL (SFTTrainer, DPOTrainer) and the plain transformers.Trainer, on a tiny Llama.

Real TRL and transformers (no mock); a word-level tokenizer built in memory, no download.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tram
from tram._checkpointing import checkpoint_phase
from tram.divergence import get_divergence

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from tests.helpers import layer_checkpointing, some_fast, tiny_llama_config  # noqa: E402
from tram.integrations.trl import TramDPOTrainer, TramSFTTrainer, with_tram  # noqa: E402

MissingAscentError = tram.MissingAscentError

VOCAB = 40
UNK, PAD, EOS = VOCAB - 3, VOCAB - 2, VOCAB - 1


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"[UNK]": UNK, "[PAD]": PAD, "[EOS]": EOS})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def tiny_llama(*, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=VOCAB, dropout=dropout, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None
    )
    return transformers.LlamaForCausalLM(config)


def sft_dataset(rows: int = 8) -> Any:
    generator = torch.Generator().manual_seed(0)
    sequences = []
    for _ in range(rows):
        length = int(torch.randint(4, 9, (1,), generator=generator))
        sequences.append(torch.randint(0, VOCAB - 3, (length,), generator=generator).tolist())
    return datasets.Dataset.from_dict({"input_ids": sequences})


TRAINER_ARGS: dict[str, Any] = {
    # SGD at a constant rate, no clipping, fp32: every trainer's step is checked by hand.
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": 2,
    "learning_rate": 0.3,
    "optim": "sgd",
    "lr_scheduler_type": "constant",
    "max_grad_norm": 0.0,
    "bf16": False,  # TRL's default is bf16 autocast
    "report_to": [],
    "use_cpu": True,
    "logging_steps": 1,
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 5,
}


def sft_config(tmp_path: Any, **kwargs: Any) -> Any:
    options: dict[str, Any] = {**TRAINER_ARGS, "output_dir": str(tmp_path / "out"), "seed": 3}
    options.update(kwargs)
    return trl.SFTConfig(**options)


def record_windows(trainer: Any) -> list[tuple[list[dict[str, Tensor]], Any]]:
    """Keep each optimizer step's micro-batches and num_items_in_batch as the trainer built them."""
    windows: list[tuple[list[dict[str, Tensor]], Any]] = []
    original = trainer.get_batch_samples

    def get_batch_samples(*args: Any, **kwargs: Any) -> Any:
        batch_samples, num_items = original(*args, **kwargs)
        windows.append(([dict(b) for b in batch_samples], num_items))
        return batch_samples, num_items

    trainer.get_batch_samples = get_batch_samples
    return windows


class Snapshots(transformers.TrainerCallback):
    """The model's weights after every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, Tensor]] = []

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def train_sft(tmp_path: Any, model: nn.Module, **kwargs: Any) -> tuple[Any, list[Any], Snapshots]:
    config_kwargs = kwargs.pop("config", {})
    trainer = TramSFTTrainer(
        model=model,
        args=sft_config(tmp_path, **config_kwargs),
        train_dataset=sft_dataset(),
        processing_class=tokenizer(),
        **kwargs,
    )
    windows = record_windows(trainer)
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    return trainer, windows, snapshots


def plain_loss(model: nn.Module, batch: dict[str, Tensor], num_items: Any) -> Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    return model(**inputs, num_items_in_batch=num_items, use_cache=False).loss


# ---------------------------------------------------------------------- SFTTrainer
def hand_loop(
    initial: nn.Module,
    windows: list[tuple[list[dict[str, Tensor]], Any]],
    make_optimizer: Any,
    *,
    bf16: bool = False,
) -> nn.Module:
    """The two-pass steps by hand on the trainer's micro-batches, with TRL's normalisation (the
    window's token count): the library's closure step, the contract tests' reference."""
    reference = copy.deepcopy(initial)
    optimizer = make_optimizer(reference)
    step_windows(
        optimizer, windows, lambda batch, num_items: plain_loss(reference, batch, num_items), bf16
    )
    return reference


def step_windows(
    optimizer: tram.TwoPassOptimizer,
    windows: list[tuple[list[dict[str, Tensor]], Any]],
    loss_of: Any,
    bf16: bool,
) -> None:
    """One ``step(closure)`` per window, whose closure backpropagates ``loss_of(batch,
    num_items)`` of each micro-batch (under bf16 autocast with ``bf16``), unscaled: TRL
    normalises by the window's token count ``num_items``."""
    for window, num_items in windows:

        def closure(window: list[dict[str, Tensor]] = window, num_items: Any = num_items) -> Tensor:
            optimizer.zero_grad()
            total = torch.zeros(())
            for batch in window:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_of(batch, num_items)
                loss.backward()
                total = total + loss.detach()
            return total

        optimizer.step(closure)


def assert_trained_alike(model: nn.Module, reference: nn.Module, initial: nn.Module, bf16: bool):
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        # TRL's fused head sums the log-probabilities in another order than the model's loss
        # (and in bf16 rounds its chunks differently).
        tolerance = {"rtol": 1e-2, "atol": 1e-3} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(p, q, **tolerance, msg=name)
    moved = max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), initial.parameters())
    )
    assert moved > 1e-3


@pytest.mark.parametrize("bf16", [False, True])
def test_sft_sam_equals_hand_loop(tmp_path: Any, bf16: bool) -> None:
    """SAM through TramSFTTrainer, gradient accumulation 2: the hand-written two-pass loop on the
    same micro-batches with TRL's normalisation (the window's token count)."""
    model = tiny_llama()
    initial = copy.deepcopy(model)
    trainer, windows, _ = train_sft(
        tmp_path, model, method="sam", method_kwargs={"rho": 0.27}, config={"bf16": bf16}
    )
    assert len(windows) == 2
    assert trainer.two_pass_optimizer.steps == 2
    reference = hand_loop(
        initial,
        windows,
        lambda m: tram.SAM(torch.optim.SGD(m.parameters(), lr=0.3), rho=0.27),
        bf16=bf16,
    )
    assert_trained_alike(model, reference, initial, bf16)


def test_sft_tram_runs_no_twin_on_a_step_that_reuses_d(tmp_path: Any) -> None:
    """radius_every=2: the twin runs on the step that measures d only (2 micro-batches: 2 twins,
    2 training and 2 replayed forwards, then 2 and 2), and the run equals the hand loop."""
    model = tiny_llama()
    initial = copy.deepcopy(model)
    forwards: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args: (
            forwards.append(1) if module.training and torch.is_grad_enabled() else None
        )
    )
    options = {"trust_region": "noise", "sigma": 0.3, "seed": 4, "radius_every": 2}
    trainer, windows, _ = train_sft(tmp_path, model, method="tram", method_kwargs=options)
    assert len(forwards) == 6 + 4
    radii = trainer.two_pass_optimizer.radius_history
    assert len(radii) == 1
    assert radii[0] > 0
    reference = hand_loop(
        initial,
        windows,
        lambda m: tram.TRAM(torch.optim.SGD(m.parameters(), lr=0.3), m, **options),
    )
    assert_trained_alike(model, reference, initial, bf16=False)


def test_sft_tram_fisher_ascends_from_the_noised_training_forward(tmp_path: Any) -> None:
    """TRAM-Fisher needs no logits, so no twin: its noise goes on the training forward itself,
    whose gradient gives the ascent (a noised twin beside a clean forward would be Fisher SAM)."""
    model = tiny_llama()
    initial = copy.deepcopy(model)
    options = {"trust_region": "fisher", "sigma": 0.37, "rho": 0.21, "fisher_eta": 0.13}
    trainer, windows, _ = train_sft(tmp_path, model, method="tram", method_kwargs=options)
    assert isinstance(trainer.two_pass_optimizer, tram.TRAMFisher)
    reference = hand_loop(
        initial,
        windows,
        lambda m: tram.TRAM(torch.optim.SGD(m.parameters(), lr=0.3), m, **options),
    )
    assert_trained_alike(model, reference, initial, bf16=False)


def test_sft_tram_measures_the_exact_radius(tmp_path: Any) -> None:
    """TRL's fused head returns no logits; the twin forward gives TRAM the exact d."""
    model = tiny_llama()
    theta0 = copy.deepcopy(model)
    trainer, windows, snapshots = train_sft(
        tmp_path, model, method="tram", method_kwargs={"trust_region": "pretrained"}
    )
    radii = trainer.two_pass_optimizer.radius_history
    assert len(radii) == 2
    assert radii[0] == 0.0  # θ = θ0 at step 1
    theta1 = copy.deepcopy(theta0)
    theta1.load_state_dict(snapshots.states[0])
    kl = get_divergence("forward_kl")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in windows[1][0]:  # d over the window's tokens, every micro-batch's
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = batch["attention_mask"] != 0
            d = float(kl(theta0(**inputs).logits, theta1(**inputs).logits, mask=mask))
            total += d * int(mask.sum())
            tokens += int(mask.sum())
    assert radii[1] > 0
    assert radii[1] == pytest.approx(total / tokens, rel=1e-5)
    logged = [h["tram/radius"] for h in trainer.state.log_history if "tram/radius" in h]
    assert logged == pytest.approx(radii, rel=1e-6)


SFT_COMPILE_CASES = {
    "sam": ("sam", {"rho": 0.27}),
    "tram-pretrained": ("tram", {"trust_region": "pretrained"}),
    "tram-fisher": ("tram", {"trust_region": "fisher", "sigma": 0.37, "rho": 0.21}),
}


@pytest.mark.slow  # ~40 s each, compiling a LLaMA; the mechanism is TramTrainer's (test_hf_trainer)
@pytest.mark.parametrize("case", list(SFT_COMPILE_CASES))
def test_sft_with_torch_compile_trains_as_without(tmp_path: Any, case: str) -> None:
    """``torch_compile=True`` (``aot_eager``): TRL's loss, TRAM's twin forward for d and
    TRAM-Fisher's noised forward through the compiled model take the eager run's steps, with
    dropout; graphs were compiled."""
    method, method_kwargs = SFT_COMPILE_CASES[case]
    runs = []
    for compile in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        config = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compile else {}
        trainer, _, snapshots = train_sft(
            tmp_path / str(compile),
            tiny_llama(dropout=0.2),
            method=method,
            method_kwargs=method_kwargs,
            config=config,
        )
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compile
        runs.append((trainer, snapshots))
    (eager, eager_snapshots), (compiled, compiled_snapshots) = runs
    for a, b in zip(eager_snapshots.states, compiled_snapshots.states, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    if case == "tram-pretrained":
        assert compiled.two_pass_optimizer.radius_history == eager.two_pass_optimizer.radius_history
        assert compiled.two_pass_optimizer.radius_history[1] > 0


def test_sft_tram_twin_keeps_the_dropout_masks(tmp_path: Any) -> None:
    """With dropout, d = 0 at θ0 (the reference replays the twin's masks) and the first pass's
    loss equals SAM's (the twin gives the random stream back to the real forward)."""
    tram_run, _, _ = train_sft(
        tmp_path,
        tiny_llama(dropout=0.3),
        method="tram",
        method_kwargs={"trust_region": "pretrained"},
        config={"max_steps": 1},
    )
    sam_run, _, _ = train_sft(
        tmp_path,
        tiny_llama(dropout=0.3),
        method="sam",
        method_kwargs={"rho": 0.0},
        config={"max_steps": 1},
    )
    assert tram_run.two_pass_optimizer.radius_history == [0.0]
    tram_loss = [h["loss"] for h in tram_run.state.log_history if "loss" in h]
    sam_loss = [h["loss"] for h in sam_run.state.log_history if "loss" in h]
    assert tram_loss == sam_loss
    plain = tiny_llama(dropout=0.3)
    plain_run, _, _ = train_sft(tmp_path, plain, config={"max_steps": 1, "seed": 4})
    assert [h["loss"] for h in plain_run.state.log_history if "loss" in h] != tram_loss


# ---------------------------------------------------------------------- DPOTrainer
def dpo_dataset() -> Any:
    generator = torch.Generator().manual_seed(1)

    def words(n: int) -> str:
        return " ".join(
            f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=generator)
        )

    rows = [{"prompt": words(3), "chosen": words(3), "rejected": words(2)} for _ in range(4)]
    return datasets.Dataset.from_list(rows)


def test_dpo_tram_trains_and_measures_the_radius(tmp_path: Any) -> None:
    model = tiny_llama()
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = TramDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),  # no hub name to load it from
        args=args,
        train_dataset=dpo_dataset(),
        processing_class=tokenizer(),
        method="tram",
        method_kwargs={"trust_region": "pretrained"},
    )
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    radii = trainer.two_pass_optimizer.radius_history
    assert radii[0] == 0.0
    assert len(radii) == 2
    assert radii[1] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def dpo_config(output_dir: Any, **kwargs: Any) -> Any:
    """Two SGD steps of DPO on CPU in fp32, one pair per micro-batch, two per step."""
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "learning_rate": 0.1,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "bf16": False,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 5,
    }
    options.update(kwargs)
    return trl.DPOConfig(**options)


def dpo_run(tmp_path: Any, *, batch_size: int, accumulation: int) -> nn.Module:
    model = tiny_llama()
    args = dpo_config(
        tmp_path / f"dpo{batch_size}",
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
    )
    trainer = TramDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=dpo_dataset(),
        processing_class=tokenizer(),
        method="sam",
        method_kwargs={"rho": 0.31},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    assert trainer.two_pass_optimizer.steps == 2
    return model


def test_dpo_sam_accumulation_equals_the_large_batch(tmp_path: Any) -> None:
    """DPO's loss is a mean over pairs: 2 micro-batches of 1 pair, one ascent from their
    accumulated gradient and both replayed, equal one batch of 2 pairs."""
    large = dpo_run(tmp_path, batch_size=2, accumulation=1)
    accumulated = dpo_run(tmp_path, batch_size=1, accumulation=2)
    for (name, p), q in zip(large.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    initial = tiny_llama()
    moved = max(
        (p - q).abs().max().item() for p, q in zip(large.parameters(), initial.parameters())
    )
    assert moved > 1e-3


class TrainLogs(transformers.TrainerCallback):
    """Every training log (the ones with the loss)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def logged(trainer: Any) -> list[dict[str, float]]:
    callback = TrainLogs()
    trainer.add_callback(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    return callback.logs


@pytest.mark.parametrize("method", ["sam", "tram"])
def test_sft_logs_trls_metrics_of_the_first_pass_once(tmp_path: Any, method: str) -> None:
    """With the learning rate at 0 the weights never move, so TRL's metrics (token count, token
    accuracy, entropy, loss) must be those of the plain SFTTrainer: the replay at θ+ε goes
    through TRL's compute_loss too, and its entries are not logged."""
    kwargs = {"method": "sam", "method_kwargs": {"rho": 0.5}}
    if method == "tram":
        kwargs = {"method": "tram", "method_kwargs": {"trust_region": "noise", "sigma": 0.3}}

    def run(trainer_class: type, **extra: Any) -> list[dict[str, float]]:
        return logged(
            trainer_class(
                model=tiny_llama(),
                args=sft_config(tmp_path, learning_rate=0.0),
                train_dataset=sft_dataset(),
                processing_class=tokenizer(),
                **extra,
            )
        )

    plain, tram_logs = run(trl.SFTTrainer), run(TramSFTTrainer, **kwargs)
    keys = ("num_tokens", "mean_token_accuracy", "entropy", "loss")
    assert len(plain) == len(tram_logs) == 2
    for ours, theirs in zip(tram_logs, plain, strict=True):
        assert {key: ours[key] for key in keys} == {key: theirs[key] for key in keys}


def test_dpo_logs_trls_metrics_of_the_first_pass_once(tmp_path: Any) -> None:
    """DPO's rewards, log-probabilities and token count, as logged by the plain DPOTrainer."""

    def run(trainer_class: type, **extra: Any) -> list[dict[str, float]]:
        model = tiny_llama()
        args = dpo_config(tmp_path / trainer_class.__name__, learning_rate=0.0, logging_steps=1)
        return logged(
            trainer_class(
                model=model,
                ref_model=copy.deepcopy(model),
                args=args,
                train_dataset=dpo_dataset(),
                processing_class=tokenizer(),
                **extra,
            )
        )

    plain = run(trl.DPOTrainer)
    ours = run(TramDPOTrainer, method="sam", method_kwargs={"rho": 0.5})
    assert len(plain) == len(ours) == 2
    keys = [key for key in plain[0] if key.startswith(("rewards/", "logps/", "num_tokens"))]
    assert "num_tokens" in keys
    assert any(key.startswith("rewards/") for key in keys)
    for mine, theirs in zip(ours, plain, strict=True):
        assert {key: mine[key] for key in keys} == {key: theirs[key] for key in keys}


def test_with_tram_builds_the_class_and_refuses_others() -> None:
    cls = with_tram(trl.SFTTrainer)
    assert cls.__name__ == "TramSFTTrainer"
    assert issubclass(cls, trl.SFTTrainer)
    assert with_tram(TramSFTTrainer) is TramSFTTrainer
    with pytest.raises(TypeError, match=r"subclass of transformers\.Trainer"):
        with_tram(dict)


# ---------------------------------------------------------------------- without the integration
@pytest.mark.parametrize("trainer_class", ["Trainer", "SFTTrainer"])
def test_plain_trainers_given_a_tram_optimizer_are_refused(
    tmp_path: Any, trainer_class: str
) -> None:
    model = tiny_llama()
    optimizer = tram.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    if trainer_class == "Trainer":
        collator = transformers.DataCollatorForLanguageModeling(tokenizer(), mlm=False)
        trainer: Any = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path / "t"),
                per_device_train_batch_size=2,
                max_steps=1,
                report_to=[],
                use_cpu=True,
                save_strategy="no",
                disable_tqdm=True,
            ),
            train_dataset=sft_dataset(),
            data_collator=collator,
            optimizers=(optimizer, None),
        )
    else:
        trainer = trl.SFTTrainer(
            model=model,
            args=sft_config(tmp_path, max_steps=1),
            train_dataset=sft_dataset(),
            processing_class=tokenizer(),
            optimizers=(optimizer, None),
        )
    with pytest.raises(MissingAscentError, match="TramTrainer"):
        trainer.train()
    assert optimizer.steps == 0


def test_sft_tram_resume_is_bit_exact(tmp_path: Any) -> None:
    """A checkpoint holds TRAM's θ0 reference; resuming equals the uninterrupted run."""
    method = {"method": "tram", "method_kwargs": {"trust_region": "pretrained"}}
    straight = tiny_llama(dropout=0.2)
    train_sft(tmp_path / "a", straight, config={"max_steps": 4}, **method)

    first = tiny_llama(dropout=0.2)
    train_sft(
        tmp_path / "b",
        first,
        config={"max_steps": 4, "save_steps": 2, "save_strategy": "steps"},
        **method,
    )
    resumed = tiny_llama(dropout=0.2, seed=1)  # other initial weights: all must come from the files
    trainer = TramSFTTrainer(
        model=resumed,
        args=sft_config(tmp_path / "b", max_steps=4),
        train_dataset=sft_dataset(),
        processing_class=tokenizer(),
        **method,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert trainer.two_pass_optimizer.steps == 4


def test_sft_with_a_lora_adapter_and_tram(tmp_path: Any) -> None:
    """TRL wraps the model in PEFT itself (peft_config=); TRAM records the PeftModel's forward.
    TRAM-θ0 with the copied reference and with the adapter-off target take the same steps."""
    peft = pytest.importorskip("peft")
    from tram.adapters import AdapterOff

    runs = {}
    for name, target in (("copied", "pretrained"), ("adapter_off", AdapterOff())):
        model = tiny_llama(dropout=0.1)
        frozen = copy.deepcopy(model.model.layers[0].mlp.up_proj.weight)
        # On q_proj alone one step moves the logits by d ~ 1e-9, round-off's size: v_proj too.
        config = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]
        )
        trainer, _, _ = train_sft(
            tmp_path / name,
            model,
            peft_config=config,
            method="tram",
            method_kwargs={"target": target},
        )
        base = trainer.model.base_model.model.model
        assert torch.equal(base.layers[0].mlp.up_proj.weight, frozen)
        runs[name] = trainer
    copied = runs["copied"].two_pass_optimizer
    assert copied.radius_history[0] == 0.0  # θ = θ0, the dropout masks (LoRA's too) replayed
    assert copied.radius_history[1] > 1e-6
    reference = copied.reference.state_dict()
    assert reference
    assert all("lora_" in name for name in reference)
    off = runs["adapter_off"].two_pass_optimizer
    assert off.reference is None
    assert off.radius_history == copied.radius_history
    for p, q in zip(
        runs["copied"].model.parameters(), runs["adapter_off"].model.parameters(), strict=True
    ):
        assert torch.equal(p, q)


def autocast_of_block(block: nn.Module) -> list[bool]:
    """Whether CPU autocast was on, for each forward of ``block`` with gradients enabled."""
    autocast: list[bool] = []
    block.register_forward_hook(
        lambda module, args, output: (
            autocast.append(torch.is_autocast_enabled("cpu")) if torch.is_grad_enabled() else None
        )
    )
    return autocast


def plain_bf16_sft_trainer(model: nn.Module, output_dir: Any) -> Any:
    """TRL's own SFTTrainer with ``bf16=True`` on the test's data: the reference's loss."""
    return trl.SFTTrainer(
        model=model,
        args=sft_config(output_dir, bf16=True),
        train_dataset=sft_dataset(),
        processing_class=tokenizer(),
    )


def sft_loss_loop(
    plain: Any,
    windows: list[tuple[list[dict[str, Tensor]], Any]],
    optimizer: tram.TwoPassOptimizer,
    *,
    bf16: bool,
) -> None:
    """The two-pass steps by hand with the plain SFTTrainer's own ``compute_loss`` (TRL's fused
    head, so the sums run in TRL's order) on ``plain.model``, normalised by each window's token
    count; with ``bf16``, under bf16 autocast."""
    model = plain.model
    model.train()
    step_windows(
        optimizer,
        windows,
        lambda batch, num_items: plain.compute_loss(
            model, dict(batch), num_items_in_batch=num_items
        ),
        bf16,
    )


def assert_same_parameters(model: nn.Module, reference: nn.Module, initial: nn.Module) -> None:
    trained = dict(model.named_parameters())
    for key, q in reference.named_parameters():
        assert torch.equal(trained[key], q), (
            f"{key}: max difference {(trained[key] - q).abs().max()}"
        )
    moved = max((p - q).abs().max().item() for p, q in zip(trained.values(), initial.parameters()))
    assert moved > 1e-3


@pytest.mark.parametrize("method", ["sam", "tram-fisher"])
def test_sft_under_bf16_equals_the_plain_trainers_loss(tmp_path: Any, method: str) -> None:
    """``bf16=True``: the weights equal, bit for bit, the hand loop of the plain SFTTrainer's
    loss under bf16 autocast, and every training forward of both passes runs under autocast
    (:func:`test_sft_sam_equals_hand_loop` compares with the model's own loss, to rtol 1e-2 and
    atol 1e-3, which lets a replay at θ+ε outside autocast pass: it ends about 3e-4 away)."""
    method_name, method_kwargs = METHODS[method]
    model = tiny_llama()
    initial = copy.deepcopy(model)
    autocast = autocast_of_block(model.model.layers[0])
    _, windows, _ = train_sft(
        tmp_path, model, method=method_name, method_kwargs=method_kwargs, config={"bf16": True}
    )
    assert autocast == [True] * (2 * 2 * 2)  # steps x micro-batches x passes
    reference = copy.deepcopy(initial)
    plain = plain_bf16_sft_trainer(reference, tmp_path / "plain")
    wrapper_class = {"sam": tram.SAM, "tram": tram.TRAM}[method_name]
    model_arg = (reference,) if method_name == "tram" else ()
    optimizer = wrapper_class(plain.create_optimizer(), *model_arg, **method_kwargs)
    sft_loss_loop(plain, windows, optimizer, bf16=True)
    assert_same_parameters(model, reference, initial)


def test_sft_lora_under_bf16_equals_the_hand_loop(tmp_path: Any) -> None:
    """``peft_config=`` and ``bf16=True``: SAM on the LoRA adapters equals, bit for bit, the
    hand loop of the plain SFTTrainer's loss under bf16 autocast on the same PeftModel (copied
    before training: TRL built its adapters), with TRL's normalisation by the window's token
    count. The fp32 loop ends about 2e-4 away, the loop without an ascent about 1e-2."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = tiny_llama()
    autocast = autocast_of_block(model.model.layers[0])
    trainer = TramSFTTrainer(
        model=model,
        args=sft_config(tmp_path, bf16=True),
        train_dataset=sft_dataset(),
        processing_class=tokenizer(),
        peft_config=config,
        method="sam",
        method_kwargs={"rho": 0.27},
    )
    initial = copy.deepcopy(trainer.model)
    windows = record_windows(trainer)
    train_quietly(trainer)
    assert autocast == [True] * (2 * 2 * 2)  # steps x micro-batches x passes
    assert all("lora_" in key for key, p in trainer.model.named_parameters() if p.requires_grad)
    reference = copy.deepcopy(initial)
    plain = plain_bf16_sft_trainer(reference, tmp_path / "plain")
    optimizer = tram.SAM(plain.create_optimizer(), rho=0.27)
    sft_loss_loop(plain, windows, optimizer, bf16=True)
    assert_same_parameters(trainer.model, reference, initial)


TRL_CHECKPOINTED = {
    "tram-noise": {"trust_region": "noise", "sigma": 0.3},
    "tram-fisher": {"trust_region": "fisher", "sigma": 0.3, "rho": 0.05, "fisher_eta": 0.5},
}


@pytest.mark.parametrize("use_reentrant", [None, True], ids=["default", "reentrant"])
@pytest.mark.parametrize("case", list(TRL_CHECKPOINTED))
def test_sft_gradient_checkpointing_trains_as_without_it(
    tmp_path: Any, case: str, use_reentrant: bool | None
) -> None:
    """SFTConfig checkpoints the layers by default (its ``gradient_checkpointing=True``): with
    dropout, TRAM's twin and reference forwards and TRAM-Fisher's noised forward train to the
    weights of the run without checkpointing, bit for bit."""
    runs = []
    for checkpointing in (False, True):
        model = tiny_llama(dropout=0.15)
        phases: list[Any] = []
        model.model.layers[0].self_attn.register_forward_hook(
            lambda module, args, output, phases=phases: phases.append(checkpoint_phase())
        )
        config = layer_checkpointing(
            checkpointing,
            {"use_reentrant": use_reentrant}
            if checkpointing and use_reentrant is not None
            else None,
        )
        train_sft(
            tmp_path / str(checkpointing),
            model,
            method="tram",
            method_kwargs=TRL_CHECKPOINTED[case],
            config=config,
        )
        recomputed = sum(phase is not None and phase[0] == "recomputation" for phase in phases)
        runs.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), recomputed))
    (expected, none), (got, recomputed) = runs
    assert none == 0
    assert recomputed == 2 * 2 * 2  # steps x micro-batches x passes (the twin has no backward)
    assert torch.equal(got, expected), f"max difference {(got - expected).abs().max()}"


def test_regularizers_are_refused_with_trl(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="regularizers are not supported with TRL"):
        TramSFTTrainer(
            model=tiny_llama(),
            args=sft_config(tmp_path),
            train_dataset=sft_dataset(),
            processing_class=tokenizer(),
            regularizers=[tram.R3F()],
        )


# ---------------------------------------------------------------------- other TRL trainers
# with_tram on TRL's other trainers. Each run is compared with a hand-written two-pass loop that
# calls a plain instance of the same trainer's compute_loss on the micro-batches the tram run's
# first pass trained on (as its _prepare_inputs returned them: for GRPO and RLOO, slices of a
# generated batch), with the base optimizer the trainer builds (its parameter groups set the
# order in which the ascent's norm is summed, so the same groups make the weights bit-equal).
def words(generator: torch.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=generator))


def prompt_dataset(rows: int = 8) -> Any:
    generator = torch.Generator().manual_seed(1)
    return datasets.Dataset.from_list([{"prompt": words(generator, 3)} for _ in range(rows)])


def preference_dataset(rows: int = 8) -> Any:
    generator = torch.Generator().manual_seed(1)
    return datasets.Dataset.from_list(
        [
            {
                "prompt": words(generator, 3),
                "chosen": words(generator, 3),
                "rejected": words(generator, 2),
            }
            for _ in range(rows)
        ]
    )


def kto_dataset(rows: int = 8) -> Any:
    generator = torch.Generator().manual_seed(2)
    return datasets.Dataset.from_list(
        [
            {"prompt": words(generator, 3), "completion": words(generator, 3), "label": bool(i % 2)}
            for i in range(rows)
        ]
    )


def distinct_words_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward that differs between completions, so that the advantages are not all zero."""
    return [0.37 * len(set(c.split())) + (0.11 if "w3" in c.split() else 0.0) for c in completions]


def tiny_reward_model(*, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, num_labels=1
    )
    return transformers.LlamaForSequenceClassification(config)


GENERATING = {
    # 4 prompts x 2 completions per optimizer step, in 2 micro-batches; beta=0: no reference
    # model to load by name (its log-probabilities would be inputs like the old ones).
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "num_generations": 2,
    "max_completion_length": 4,
    "beta": 0.0,
    "seed": 7,
}


DISTILLING = {
    # On-policy distillation: the student generates in _prepare_inputs, once per optimizer step.
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_completion_length": 4,
}


def trainer_class(name: str) -> type:
    if name in ("orpo", "cpo"):
        module = pytest.importorskip(f"trl.experimental.{name}")
        return getattr(module, f"{name.upper()}Trainer")
    return {
        "grpo": trl.GRPOTrainer,
        "rloo": trl.RLOOTrainer,
        "reward": trl.RewardTrainer,
        "kto": trl.KTOTrainer,
        "distillation": trl.DistillationTrainer,
        "dpo": trl.DPOTrainer,
    }[name]


def build_trainer(name: str, cls: Any, model: nn.Module, output_dir: Any, **options: Any) -> Any:
    """A trainer of kind ``name`` (cls: its class, or a tram subclass) on the tiny model."""
    kwargs: dict[str, Any] = {"model": model, "processing_class": tokenizer()}
    passed = ("method", "method_kwargs", "ref_model", "train_dataset")
    kwargs.update({key: options.pop(key) for key in passed if key in options})
    preset = {"grpo": GENERATING, "rloo": GENERATING, "distillation": DISTILLING}.get(name, {})
    args = {**TRAINER_ARGS, **preset, **options}
    if name == "distillation":
        config = trl.DistillationConfig
        kwargs.update(teacher_model=tiny_llama(seed=1))
        kwargs.setdefault("train_dataset", prompt_dataset())
    elif name in ("grpo", "rloo"):
        config = {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig}[name]
        kwargs.update(reward_funcs=distinct_words_reward)
        kwargs.setdefault("train_dataset", prompt_dataset())
        if args["beta"] != 0.0:
            # TRL loads the KL's reference model by the name in the model's config: the model
            # as it starts, saved here (no hub).
            reference = Path(output_dir) / "reference_model"
            model.save_pretrained(reference)
            model.config._name_or_path = str(reference)
    elif name == "kto":
        config = trl.KTOConfig
        kwargs.setdefault("ref_model", copy.deepcopy(model))
        kwargs.setdefault("train_dataset", kto_dataset())
    else:
        if name == "dpo":
            kwargs.setdefault("ref_model", copy.deepcopy(model))  # no hub name to load it from
        config = {"reward": trl.RewardConfig, "dpo": trl.DPOConfig}.get(name)
        if config is None:
            config = getattr(
                pytest.importorskip(f"trl.experimental.{name}"), f"{name.upper()}Config"
            )
        kwargs.setdefault("train_dataset", preference_dataset())
    return cls(args=config(output_dir=str(output_dir), **args), **kwargs)


def new_model(name: str, *, seed: int = 0) -> nn.Module:
    return tiny_reward_model(seed=seed) if name == "reward" else tiny_llama(seed=seed)


def record_prepared_windows(trainer: Any) -> list[list[dict[str, Any]]]:
    """Each optimizer step's micro-batches as the first pass's _prepare_inputs returned them."""
    windows: list[list[dict[str, Any]]] = []
    original = trainer._prepare_inputs

    def prepare(inputs: Any) -> Any:
        prepared = original(inputs)
        step = trainer._tram_step
        if step.phase == "first":
            if len(step.window) == 1:
                windows.append([])
            windows[-1].append(
                {k: v.clone() if torch.is_tensor(v) else v for k, v in prepared.items()}
            )
        return prepared

    trainer._prepare_inputs = prepare
    return windows


def hand_two_pass(
    plain: Any,
    windows: list[list[dict[str, Any]]],
    wrapper: Any,
    before_window: Any = None,
    *,
    bf16: bool = False,
) -> None:
    """The two-pass steps by hand with ``plain.compute_loss`` on ``plain.model``, scaled for the
    accumulation as the Trainer does (unless the trainer's loss is scaled already); with
    ``bf16``, on the model as the plain trainer's accelerator prepares it (its forward under CPU
    bf16 autocast, the outputs cast back to float32), as a trainer with ``bf16=True`` runs both
    passes. Autocast around all of ``compute_loss`` would be another computation: the reward,
    ORPO and CPO losses then end about 7e-4 away."""
    model = plain.model
    if bf16:
        model = plain.accelerator.prepare_model(model)
    model.train()
    optimizer = wrapper(plain.create_optimizer())
    for index, window in enumerate(windows):
        if before_window is not None:
            before_window(index)
        plain.current_gradient_accumulation_steps = len(window)
        divisor = 1 if plain.loss_is_scaled_for_ga else len(window)

        def closure(window: list[dict[str, Any]] = window, divisor: int = divisor) -> Tensor:
            optimizer.zero_grad()
            total = torch.zeros(())
            for batch in window:
                loss = plain.compute_loss(model, dict(batch)) / divisor
                loss.backward()
                total = total + loss.detach()
            return total

        optimizer.step(closure)


def train_quietly(trainer: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


EXACT_CASES = {
    "grpo-sam": ("grpo", "sam", {}),
    # One generation batch for two optimizer steps, each trained twice: the replay must not
    # regenerate, nor move on to the next slice.
    "grpo-sam-reused-generations": (
        "grpo",
        "sam",
        {
            "per_device_train_batch_size": 2,
            "steps_per_generation": 4,
            "num_iterations": 2,
            "max_steps": 3,
        },
    ),
    "grpo-tram-fisher": ("grpo", "tram-fisher", {}),
    # A KL to the reference model (beta > 0): its log-probabilities are computed with the
    # generation, once per batch, and the replay at θ+ε must reuse them.
    "grpo-sam-kl-to-the-reference": ("grpo", "sam", {"beta": 0.04}),
    "rloo-sam": ("rloo", "sam", {}),
    "distillation-sam": ("distillation", "sam", {}),
    "distillation-tram-fisher": ("distillation", "tram-fisher", {}),
    "reward-sam": ("reward", "sam", {}),
    "reward-tram-fisher": ("reward", "tram-fisher", {}),
    "kto-sam": ("kto", "sam", {}),
    "orpo-sam": ("orpo", "sam", {}),
    "cpo-sam": ("cpo", "sam", {}),
}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sam": ("sam", {"rho": 0.07}),
    "tram-fisher": (
        "tram",
        {"trust_region": "fisher", "sigma": 0.37, "rho": 0.21, "fisher_eta": 0.13},
    ),
}


def tram_class(name: str) -> type:
    """The tram trainer of kind ``name``: the library's ``TramDPOTrainer`` for DPO, else
    ``with_tram`` of TRL's class."""
    return TramDPOTrainer if name == "dpo" else with_tram(trainer_class(name))


def assert_exact_two_pass(
    tmp_path: Any, name: str, method: str, options: dict[str, Any], *, bf16: bool = False
) -> None:
    """The tram trainer's weights equal, bit for bit, the hand loop of the plain trainer's own
    loss on the micro-batches the tram run's first pass trained on; with ``bf16``, both under
    bf16 autocast, every training forward of both passes checked to run under it."""
    method_name, method_kwargs = METHODS[method]
    cls = trainer_class(name)
    model = new_model(name)
    initial = copy.deepcopy(model)
    precision = {"bf16": True} if bf16 else {}
    trainer = build_trainer(
        name,
        tram_class(name),
        model,
        tmp_path / "tram",
        method=method_name,
        method_kwargs=method_kwargs,
        **options,
        **precision,
    )
    autocast: list[bool] = []
    block = model.model.layers[0]  # inside accelerate's autocast wrapper of model.forward
    block.register_forward_hook(
        lambda module, args, output: (
            autocast.append(torch.is_autocast_enabled("cpu")) if torch.is_grad_enabled() else None
        )
    )
    windows = record_prepared_windows(trainer)
    train_quietly(trainer)
    steps = options.get("max_steps", 2)
    assert trainer.two_pass_optimizer.steps == steps
    assert len(windows) == steps
    micro_batches = sum(len(window) for window in windows)
    assert autocast == [bf16] * (2 * micro_batches)  # pass 1 and pass 2 (TRAM-Fisher: no twin)
    if options.get("beta"):  # the KL's reference log-probabilities came with the batches
        assert trainer.ref_model is not None
        assert all("ref_per_token_logps" in batch for window in windows for batch in window)
    reference = copy.deepcopy(initial)
    plain = build_trainer(name, cls, reference, tmp_path / "plain", **options, **precision)
    wrapper_class = {"sam": tram.SAM, "tram": tram.TRAM}[method_name]
    model_arg = (reference,) if method_name == "tram" else ()
    hand_two_pass(
        plain, windows, lambda base: wrapper_class(base, *model_arg, **method_kwargs), bf16=bf16
    )
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), f"{key}: max difference {(p - q).abs().max()}"
    moved = max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), initial.parameters())
    )
    assert moved > 1e-3


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_other_trl_trainers_take_the_exact_two_pass_step(tmp_path: Any, case: str) -> None:
    """with_tram(GRPO/RLOO/Reward/KTO/ORPO/CPO trainer): the weights equal, bit for bit, the hand
    loop of the trainer's own loss (at θ, ascent, at θ+ε on the same micro-batches, restore,
    base step)."""
    name, method, options = EXACT_CASES[case]
    assert_exact_two_pass(tmp_path, name, method, options)


BF16_CASES = {
    "dpo-sam": ("dpo", "sam"),
    "dpo-tram-fisher": ("dpo", "tram-fisher"),
    "grpo-sam": ("grpo", "sam"),
    "rloo-sam": ("rloo", "sam"),
    "reward-sam": ("reward", "sam"),
    "kto-sam": ("kto", "sam"),
    "orpo-sam": ("orpo", "sam"),
    "cpo-sam": ("cpo", "sam"),
    # Not DistillationTrainer: it calls the student's backbone (``base_model``) directly, outside
    # the autocast accelerate wraps around ``forward``, so bf16=True trains fp32 weights in fp32.
}


@pytest.mark.parametrize("case", some_fast(BF16_CASES, "dpo-tram-fisher", "grpo-sam"))
def test_trl_trainers_under_bf16_take_the_hand_loops_step(tmp_path: Any, case: str) -> None:
    """``bf16=True`` on CPU: accelerate runs every forward under bf16 autocast, the replay at
    θ+ε included; the weights equal the hand loop's under the same autocast, bit for bit (the
    bf16 run and the fp32 one differ by about 1e-4 on these models)."""
    name, method = BF16_CASES[case]
    assert_exact_two_pass(tmp_path, name, method, {}, bf16=True)


RESUME_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # TRAM-θ0 (its reference copy is checkpointed) through the logits twin; TRAM-Fisher (the
    # generator of its noise is checkpointed) where the trainer builds no logits.
    "dpo-tram": ("dpo", "tram", {"trust_region": "pretrained"}),
    "grpo-tram": ("grpo", "tram", {"trust_region": "pretrained"}),
    "rloo-tram-fisher": ("rloo", "tram", {**METHODS["tram-fisher"][1], "seed": 6}),
    "distillation-tram-fisher": ("distillation", "tram", {**METHODS["tram-fisher"][1], "seed": 6}),
    "reward-tram-fisher": ("reward", "tram", {**METHODS["tram-fisher"][1], "seed": 6}),
    "kto-tram": ("kto", "tram", {"trust_region": "pretrained"}),
    "orpo-tram": ("orpo", "tram", {"trust_region": "pretrained"}),
    "cpo-tram": ("cpo", "tram", {"trust_region": "pretrained"}),
}


@pytest.mark.parametrize(
    "case", some_fast(RESUME_CASES, "dpo-tram", "grpo-tram", "rloo-tram-fisher")
)
def test_trl_trainers_resume_bit_exactly(tmp_path: Any, case: str) -> None:
    """Four steps, or two, a checkpoint, and two more from it on a model built with other
    weights (all must come from the files: the weights, the optimizer's state with TRAM's
    reference or noise generator, the random state that generation samples from): the same
    weights, bit for bit."""
    name, method, method_kwargs = RESUME_CASES[case]
    method_options: dict[str, Any] = {"method": method, "method_kwargs": method_kwargs}
    if name in ("dpo", "kto"):  # TRL's reference model is the caller's, never checkpointed
        method_options["ref_model"] = tiny_llama()
    elif name in ("grpo", "rloo", "distillation"):
        # The four steps in one epoch: TRL's RepeatSampler (GRPO, RLOO, distillation) seeds its
        # own generator at construction, so a run resumed in its second epoch draws the first
        # epoch's order again (TRL's plain trainers resume so too).
        method_options["train_dataset"] = prompt_dataset(16)

    def trainer(model: nn.Module, output_dir: Any, **options: Any) -> Any:
        return build_trainer(
            name, tram_class(name), model, output_dir, max_steps=4, **method_options, **options
        )

    straight = new_model(name)
    train_quietly(trainer(straight, tmp_path / "straight"))
    interrupted = tmp_path / "interrupted"
    train_quietly(trainer(new_model(name), interrupted, save_strategy="steps", save_steps=2))
    resumed = new_model(name, seed=1)
    resuming = trainer(resumed, interrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resuming.train(resume_from_checkpoint=str(interrupted / "checkpoint-2"))
    assert resuming.two_pass_optimizer.steps == 4
    for (key, p), q in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q), f"{key}: max difference {(p - q).abs().max()}"


@pytest.mark.parametrize(
    "name",
    some_fast(["grpo", "rloo", "distillation", "reward", "kto", "orpo", "cpo"], "grpo", "orpo"),
)
def test_other_trl_trainers_log_the_first_pass_once(tmp_path: Any, name: str) -> None:
    """At learning rate 0 the weights never move, so everything TRL logs and counts must be what
    its plain trainer logs and counts: the replay at θ+ε goes through the trainer's training_step
    and compute_loss too (GRPO/RLOO: the micro-batch counter that picks the slice of the
    generation batch, which a replay must neither advance nor regenerate; ORPO/CPO:
    ``_stored_metrics``). Only grad_norm (the θ+ε gradient) and the timings may differ."""
    cls = trainer_class(name)
    runs = []
    for trainer_cls, extra in (
        (cls, {}),
        (with_tram(cls), {"method": "sam", "method_kwargs": {"rho": 0.5}}),
    ):
        trainer = build_trainer(
            name,
            trainer_cls,
            new_model(name),
            tmp_path / trainer_cls.__name__,
            learning_rate=0.0,
            **extra,
        )
        train_quietly(trainer)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        runs.append((trainer, logs))
    (plain, theirs), (ours_trainer, ours) = runs
    assert len(theirs) == len(ours) == 2
    ignored = ("grad_norm", "step_time")
    for mine, reference in zip(ours, theirs, strict=True):
        expected = {k: v for k, v in reference.items() if k not in ignored}
        assert {k: mine.get(k) for k in expected} == expected
    if name in ("grpo", "rloo", "distillation"):
        assert ours_trainer._step == plain._step == 4  # micro-batches trained, counted once


@pytest.mark.parametrize("name", ["GKDTrainer", "GOLDTrainer", "OnlineDPOTrainer"])
def test_with_tram_refuses_trainers_that_generate_in_training_step(name: str) -> None:
    """These trainers sample completions inside training_step, from the weights of the moment:
    a replay at θ+ε would train on other completions than the first pass (and GKD/GOLD draw
    Python's random to decide whether to generate), so no exact two-pass step exists."""
    module = pytest.importorskip(
        {
            "GKDTrainer": "trl.experimental.gkd",
            "GOLDTrainer": "trl.experimental.gold",
            "OnlineDPOTrainer": "trl.experimental.online_dpo",
        }[name]
    )
    cls = getattr(module, name)
    with pytest.raises(TypeError, match=rf"{name} generates .*inside training_step"):
        with_tram(cls)
    subclass = type("MyTrainer", (cls,), {})
    with pytest.raises(TypeError, match=rf"{name} generates"):
        with_tram(subclass)


def test_grpo_replays_with_the_adaptive_entropy_coefficient_of_the_first_pass(
    tmp_path: Any,
) -> None:
    """GRPO's adaptive entropy bonus updates its coefficient inside compute_loss, on the last
    micro-batch of each optimizer step, for the next step. Pass 2 runs after that update: it must
    still use the coefficient pass 1 used (0 at step 1, before any entropy was measured; then
    0.03 + 0.02), as the hand loop does with the coefficient fixed per step."""
    target = 5.0  # above the entropy of the tiny model (about ln 40): the coefficient grows
    adaptive = {"use_adaptive_entropy": True, "entropy_coef": 0.03, "entropy_coef_delta": 0.02}
    model = tiny_llama()
    initial = copy.deepcopy(model)
    trainer = build_trainer(
        "grpo",
        with_tram(trl.GRPOTrainer),
        model,
        tmp_path / "tram",
        method="sam",
        method_kwargs={"rho": 0.07},
        entropy_target=target,
        **adaptive,
    )
    windows = record_prepared_windows(trainer)
    applied: list[float] = []
    original = trainer._prepare_inputs

    def prepare(inputs: Any) -> Any:
        if trainer._tram_step.phase == "first" and len(trainer._tram_step.window) == 1:
            measured = trainer._last_world_entropy <= target
            applied.append(trainer.entropy_coef if measured else 0.0)
        return original(inputs)

    trainer._prepare_inputs = prepare
    train_quietly(trainer)
    assert applied == pytest.approx([0.0, 0.05])
    reference = copy.deepcopy(initial)
    plain = build_trainer("grpo", trl.GRPOTrainer, reference, tmp_path / "plain", entropy_coef=0.03)

    def set_coefficient(index: int) -> None:
        plain.entropy_coef = applied[index]

    hand_two_pass(plain, windows, lambda base: tram.SAM(base, rho=0.07), set_coefficient)
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), f"{key}: max difference {(p - q).abs().max()}"


def tram_theta0_trainer(name: str, cls: Any, model: nn.Module, output_dir: Any) -> Any:
    """:func:`build_trainer` with TRAM-θ0, the trust region whose first d is exactly 0."""
    return build_trainer(
        name,
        with_tram(cls),
        model,
        output_dir,
        method="tram",
        method_kwargs={"trust_region": "pretrained"},
    )


def test_grpo_tram_measures_the_exact_radius(tmp_path: Any) -> None:
    """GRPO's forward uses TRL's fused head too: the twin gives TRAM d over the prompt and
    completion tokens of the step's generated micro-batches, exactly (d = 0 at θ0)."""
    model = tiny_llama()
    theta0 = copy.deepcopy(model)
    trainer = tram_theta0_trainer("grpo", trl.GRPOTrainer, model, tmp_path)
    windows = record_prepared_windows(trainer)
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    train_quietly(trainer)
    radii = trainer.two_pass_optimizer.radius_history
    assert len(radii) == 2
    assert radii[0] == 0.0
    theta1 = copy.deepcopy(theta0)
    theta1.load_state_dict(snapshots.states[0])
    kl = get_divergence("forward_kl")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in windows[1]:
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            inputs = {"input_ids": ids, "attention_mask": attention}
            mask = attention != 0
            d = float(kl(theta0(**inputs).logits, theta1(**inputs).logits, mask=mask))
            total += d * int(mask.sum())
            tokens += int(mask.sum())
    assert radii[1] > 1e-5
    assert radii[1] == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.parametrize("name", ["kto", "orpo", "cpo"])
def test_preference_trainers_log_tram_radius(tmp_path: Any, name: str) -> None:
    """with_tram(KTO/ORPO/CPO trainer) with TRAM-θ0: d is 0 at θ0, positive once the weights
    moved, and each step's d reaches the trainer's log (``tram/radius``, logging_steps=1)."""
    trainer = tram_theta0_trainer(name, trainer_class(name), tiny_llama(), tmp_path)
    train_quietly(trainer)
    radii = trainer.two_pass_optimizer.radius_history
    assert len(radii) == 2
    assert radii[0] == 0.0
    assert radii[1] > 1e-5
    logged = [entry["tram/radius"] for entry in trainer.state.log_history if "tram/radius" in entry]
    assert logged == pytest.approx(radii, rel=1e-6)


def test_distillation_refuses_a_trust_region_on_logits_before_any_step(tmp_path: Any) -> None:
    """DistillationTrainer never builds the student's logits (its loss projects hidden states in
    chunks), so TRAM cannot measure d: the first training step raises, naming the methods that
    work, before any forward of the first pass and any optimizer step. TRAM-Fisher needs no
    logits and takes the exact step."""
    model = tiny_llama()
    initial = copy.deepcopy(model)
    trainer = tram_theta0_trainer("distillation", trl.DistillationTrainer, model, tmp_path)
    with pytest.raises(
        TypeError, match=r"DistillationTrainer computes its loss .*trust_region='fisher'"
    ):
        train_quietly(trainer)
    assert trainer.two_pass_optimizer.steps == 0
    for p, q in zip(model.parameters(), initial.parameters(), strict=True):
        assert torch.equal(p, q)


def test_reward_model_tram_refuses_a_divergence_of_one_logit(tmp_path: Any) -> None:
    """A reward model outputs one logit per sequence: every divergence of its softmax is 0 for
    any weights, so TRAM would ascend by radius 0 (the base optimizer under TRAM's name). Refused
    when d is first measured, before any optimizer step; TRAM-Fisher measures no divergence and
    takes the exact step (the hand loop of RewardTrainer.compute_loss)."""
    model = tiny_reward_model()
    initial = copy.deepcopy(model)
    trainer = tram_theta0_trainer("reward", trl.RewardTrainer, model, tmp_path / "kl")
    with pytest.raises(ValueError, match=r"at least 2 classes .*\(4, 1\)"):
        train_quietly(trainer)
    assert trainer.two_pass_optimizer.steps == 0
    for p, q in zip(model.parameters(), initial.parameters(), strict=True):
        assert torch.equal(p, q)
