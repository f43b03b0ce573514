"""Fine-tune all-MiniLM-L6-v2 for sentiment with TRAM-x in a hand-written accelerate loop.

The same task as ``examples/hf_trainer.py`` (train on VADER movie reviews, evaluate on held-out
movie reviews and on Amazon reviews), written as an ordinary accelerate loop. The tram-specific
parts are three:

1. wrap the base optimizer *before* ``accelerator.prepare`` (TRAM needs the unwrapped model);
2. replace ``loss = loss_fn(model, batch); accelerator.backward(loss)`` with
   ``loss = backward(batch)``, where ``backward = TwoPassBackward(accelerator, model,
   optimizer, loss_fn)``. On the micro-batch that closes an accumulation window it takes one
   ascent from the accumulated gradient, replays the window at θ+ε and restores θ before
   ``optimizer.step()`` (accelerate's ``AcceleratedOptimizer`` steps only on that micro-batch,
   does not forward ``first_step``, and under fp16 lets a ``GradScaler`` skip the step);
3. read the radius from the tram wrapper (``unwrap_optimizer(optimizer).last_radius``).

Clipping, ``optimizer.step()``, the scheduler and ``zero_grad()`` stay as they are.

    python examples/accelerate_loop.py                  # ~2-4 minutes on 2 CPU cores
    python examples/accelerate_loop.py --steps 4 --train-size 64 --eval-size 64   # smoke run
    torchrun --nproc_per_node=2 examples/accelerate_loop.py                      # DDP (gloo)

Offline: ``HF_HUB_OFFLINE=1`` is set; the assets come from pip packages cached under
``~/.cache/tram`` (see ``tram.experiments.assets``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _sentiment import load_model_and_data, method_kwargs, parser
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from tram.factory import wrap_optimizer
from tram.integrations.accelerate import TwoPassBackward, unwrap_optimizer


def parse_args():
    options = parser(__doc__.split("\n\n")[0], batch_size_help="per process, per micro-batch")
    options.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    return options.parse_args()


def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        logits = model(**batch).logits
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        correct += int((predictions == labels).sum())
        total += len(labels)
    model.train()
    return correct / total


def main() -> None:
    options = parse_args()
    accelerator = Accelerator(
        gradient_accumulation_steps=options.accumulation,
        mixed_precision=options.mixed_precision,
        cpu=not torch.cuda.is_available(),  # without it, CPU processes under torchrun run alone
    )
    set_seed(options.seed)
    tokenizer, model, train, evaluation = load_model_and_data(options)
    collate = DataCollatorWithPadding(tokenizer)

    def loader(data, batch_size, shuffle):
        return torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate
        )

    train_loader = loader(train, options.batch_size, True)
    eval_loaders = {domain: loader(data, 64, False) for domain, data in evaluation.items()}

    # 1. Wrap the base optimizer before prepare(): TRAM hooks the unwrapped model.
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)]},
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    base = torch.optim.AdamW(groups, lr=options.lr, weight_decay=0.01)
    optimizer = wrap_optimizer(options.method, base, model=model, **method_kwargs(options))
    # accelerate's prepared scheduler steps once per process at each optimizer step.
    processes = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(
        optimizer, max(1, options.steps // 10) * processes, options.steps * processes
    )
    model, optimizer, train_loader, scheduler, *eval_prepared = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, eval_prepared, strict=True))
    before = {domain: evaluate(accelerator, model, dl) for domain, dl in eval_loaders.items()}

    # 2. The two passes, in place of loss = loss_fn(...); accelerator.backward(loss).
    backward = TwoPassBackward(accelerator, model, optimizer, loss_fn)
    wrapper = unwrap_optimizer(optimizer)
    model.train()
    step, window_losses = 0, []
    while step < options.steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                window_losses.append(backward(batch))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                loss = accelerator.reduce(torch.stack(window_losses).mean(), "mean").item()
                window_losses = []
                # 3. The radius of this step (TRAM only).
                radius = getattr(wrapper, "last_radius", None)
                radius_text = f"  radius d {radius:.3g}" if radius is not None else ""
                accelerator.print(
                    f"step {step:3d}  loss {loss:.4f}  lr {scheduler.get_last_lr()[0]:.2e}"
                    f"{radius_text}"
                )
                if step >= options.steps:
                    break

    after = {domain: evaluate(accelerator, model, dl) for domain, dl in eval_loaders.items()}
    accelerator.print(
        f"method: {options.method} ({type(wrapper).__name__}), steps: {wrapper.steps}, "
        f"skipped ascents: {wrapper.skipped_ascents}"
    )
    for domain in eval_loaders:
        accelerator.print(f"accuracy on {domain:>6}: {before[domain]:.3f} -> {after[domain]:.3f}")


if __name__ == "__main__":
    main()
