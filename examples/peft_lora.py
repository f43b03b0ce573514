"""LoRA fine-tuning with TRAM-θ0 whose reference is the adapter-off model: no weight copy.

For a LoRA model the pre-trained model θ0 is the model with its adapters switched off (LoRA's B
starts at zero), so TRAM's ``"pretrained"`` trust region can take its reference forward as
``with model.disable_adapter(): model(...)`` (the target ``tram.adapters.AdapterOff()``) instead
of copying the trainable weights (``--reference copied``: ``trust_region="pretrained"``). Both
give the same d and the same steps (tested in ``tests/test_peft.py``; measured in
``benchmarks/peft_reference.py``).

Two offline assets (pip packages, no model hub):

- ``--model smollm2`` (default): SmolLM2-135M-Instruct, LoRA (r=8) on the attention's q/v
  projections, trained as a language model on VADER's movie-review snippets and evaluated by
  perplexity on held-out movie reviews and, out of domain, on Amazon reviews. The first run
  dequantises the GGUF weights once (~1 minute, 540 MB cached under ``~/.cache/tram``).
- ``--model minilm``: all-MiniLM-L6-v2 for sentiment classification (LoRA on query/value, the
  classifier trained in full as PEFT's ``modules_to_save``), evaluated by accuracy.

    python examples/peft_lora.py --steps 20
    python examples/peft_lora.py --model minilm --steps 4 --train-size 32 --eval-size 32
    python examples/peft_lora.py --reference copied     # the same run with a copied θ0
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import math
import time

import torch
from peft import LoraConfig, get_peft_model

import tram
from tram.adapters import AdapterOff
from tram.experiments.assets import minilm_path, smollm2_path
from tram.experiments.data import load_vader, sentiment_examples, split


def parse_args() -> argparse.Namespace:
    options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    options.add_argument("--reference", choices=["adapter_off", "copied"], default="adapter_off")
    options.add_argument("--steps", type=int, default=20)
    options.add_argument("--batch-size", type=int, default=8)
    options.add_argument("--lr", type=float, default=1e-3)
    options.add_argument("--max-length", type=int, default=48)
    options.add_argument("--train-size", type=int, default=400)
    options.add_argument("--eval-size", type=int, default=100, help="per evaluation domain")
    options.add_argument("--seed", type=int, default=0)
    return options.parse_args()


def load(options: argparse.Namespace):
    """``(tokenizer, LoRA model, train texts/labels, {domain: eval examples})``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    vader = load_vader(domains=["movies", "amazon"])
    movies_train, _, movies_test = split(sentiment_examples(vader["movies"]), seed=options.seed)
    amazon = split(sentiment_examples(vader["amazon"]), seed=options.seed)[2]
    if options.model == "smollm2":
        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path)
        targets, task = ["q_proj", "v_proj"], "CAUSAL_LM"
    else:
        path = minilm_path()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        targets, task = ["query", "value"], "SEQ_CLS"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LoraConfig(
        task_type=task, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets
    )
    model = get_peft_model(model, config)
    evaluation = {
        "movies": movies_test[: options.eval_size],
        "amazon": amazon[: options.eval_size],
    }
    return tokenizer, model, movies_train[: options.train_size], evaluation


def encode(tokenizer, examples, options: argparse.Namespace) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        [text for text, _ in examples],
        truncation=True,
        max_length=options.max_length,
        padding=True,
        return_tensors="pt",
    )
    if options.model == "smollm2":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor([label for _, label in examples])
    return dict(batch)


@torch.no_grad()
def evaluate(model, tokenizer, examples, options: argparse.Namespace) -> float:
    """Perplexity (smollm2) or accuracy (minilm) on ``examples``."""
    model.eval()
    total = count = 0.0
    for start in range(0, len(examples), 32):
        batch = encode(tokenizer, examples[start : start + 32], options)
        output = model(**batch)
        if options.model == "smollm2":
            tokens = float((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(output.loss) * tokens, count + tokens
        else:
            total += float((output.logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
    model.train()
    return math.exp(total / count) if options.model == "smollm2" else total / count


def main() -> None:
    options = parse_args()
    torch.manual_seed(options.seed)
    tokenizer, model, train, evaluation = load(options)
    model.train()
    model.print_trainable_parameters()

    trainable = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.01)
    target = AdapterOff() if options.reference == "adapter_off" else "pretrained"
    optimizer = tram.TRAM(base, model, target=target)
    held = sum(
        t.numel() * t.element_size()
        for t in optimizer.target.state_dict().get("reference", {}).values()
    )
    print(f"TRAM-θ0 reference: {options.reference}, holds {held / 2**20:.2f} MiB of weights")

    metric = "perplexity" if options.model == "smollm2" else "accuracy"
    before = {domain: evaluate(model, tokenizer, ex, options) for domain, ex in evaluation.items()}
    started = time.perf_counter()
    for step in range(options.steps):
        start = (step * options.batch_size) % max(1, len(train) - options.batch_size)
        batch = encode(tokenizer, train[start : start + options.batch_size], options)

        def closure(batch=batch):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        print(f"step {step + 1:3d}  loss {float(loss.detach()):.4f}  d {optimizer.last_radius:.3g}")
    seconds = (time.perf_counter() - started) / max(1, options.steps)
    print(f"{seconds:.2f} s per step")
    for domain, examples in evaluation.items():
        after = evaluate(model, tokenizer, examples, options)
        print(f"{metric} on {domain:>6}: {before[domain]:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
