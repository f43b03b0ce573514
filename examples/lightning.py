"""Fine-tune all-MiniLM-L6-v2 for sentiment with TRAM-x in PyTorch Lightning.

A standard ``LightningModule``; the tram-specific lines are the optimizer that
``configure_optimizers`` returns and ``TramCallback()`` in the ``Trainer``'s callbacks. The
callback takes the exact two-pass step with ``accumulate_grad_batches`` (one ascent from the
accumulated gradient, every micro-batch replayed at θ+ε), clips the descent gradient
(``gradient_clip_val``), works under ``precision="bf16-mixed"``/``"16-mixed"``, logs the loss at
θ (not at θ+ε) and ``tram/radius`` / ``tram/ascent_grad_norm`` to the logger
(``tensorboard --logdir OUTPUT_DIR``). The data and model are those of ``examples/hf_trainer.py``:
the real all-MiniLM-L6-v2 from a pip package (no model hub), VADER's movie reviews for training,
held-out movie reviews and Amazon reviews (out of domain) for evaluation.

    python examples/lightning.py                        # ~2-4 minutes on 2 CPU cores
    python examples/lightning.py --steps 4 --train-size 64 --eval-size 64   # smoke run
    python examples/lightning.py --precision bf16-mixed
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
import tempfile
import warnings

# This file is called lightning.py: while its directory is first on sys.path, `import lightning`
# would import it instead of the package. Import the package without it, then put it back.
_examples_dir = sys.path.pop(0)
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from tram.integrations.lightning import TramCallback  # noqa: E402

sys.path.insert(0, _examples_dir)

import torch  # noqa: E402
from _sentiment import load_model_and_data, method_kwargs, parser  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from tram.factory import wrap_optimizer  # noqa: E402


class SentimentModule(pl.LightningModule):
    def __init__(self, model, *, method: str, method_kwargs: dict, lr: float) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.method_kwargs = method_kwargs
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)  # the loss at θ, with TramCallback
        return loss

    def configure_optimizers(self):
        base = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01)
        # Any tram method; TRAM measures its trust region on self.model's forward (the network
        # whose output has the logits), so that is the model it is given.
        return wrap_optimizer(self.method, base, model=self.model, **self.method_kwargs)


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        predictions = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
        correct += int((predictions == batch["labels"]).sum())
        total += len(predictions)
    model.train()
    return correct / total


def main() -> None:
    options = parser(__doc__.split("\n\n")[0], batch_size_help="per micro-batch")
    options.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    options.add_argument("--output-dir", default=None, help="default: a temporary directory")
    options = options.parse_args()
    pl.seed_everything(options.seed, verbose=False)
    tokenizer, model, train, evaluation = load_model_and_data(options)
    collate = DataCollatorWithPadding(tokenizer)
    train_loader = DataLoader(
        train, batch_size=options.batch_size, shuffle=True, collate_fn=collate
    )
    eval_loaders = {
        domain: DataLoader(examples, batch_size=64, collate_fn=collate)
        for domain, examples in evaluation.items()
    }
    before = {domain: accuracy(model, loader) for domain, loader in eval_loaders.items()}

    module = SentimentModule(
        model, method=options.method, method_kwargs=method_kwargs(options), lr=options.lr
    )
    output_dir = options.output_dir or tempfile.mkdtemp(prefix="tram-lightning-")
    trainer = pl.Trainer(
        max_steps=options.steps,
        accumulate_grad_batches=options.accumulation,
        gradient_clip_val=1.0,
        precision=options.precision,
        callbacks=[TramCallback()],
        logger=TensorBoardLogger(output_dir, name="lightning"),
        log_every_n_steps=max(1, options.steps // 10),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train_loader)

    optimizer = trainer.optimizers[0]
    print(f"method: {options.method} ({type(optimizer).__name__}), steps: {optimizer.steps}")
    radii = getattr(optimizer, "radius_history", [])
    if radii:
        print(f"TRAM radius d: first {radii[0]:.3g}, last {radii[-1]:.3g}")
    for domain, loader in eval_loaders.items():
        print(f"accuracy on {domain:>6}: {before[domain]:.3f} -> {accuracy(model, loader):.3f}")
    print(f"TensorBoard logs: {output_dir}")


if __name__ == "__main__":
    main()
