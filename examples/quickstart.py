"""Quickstart: fine-tune a small pre-trained classifier with SAM around AdamW.

A plain PyTorch loop. The model is first "pre-trained" on one synthetic task, then fine-tuned
on a shifted one (inputs moved, labelling rule perturbed) with ``tram.SAM`` wrapping AdamW and
driven by ``optimizer.step(closure)``: the closure runs at θ and again at θ+ε. Runs in a few
seconds on a CPU, prints the training loss (mean of the last 25 steps) and the ascent norm
‖∇L‖ as it goes, and exits with status 1 if the fine-tuning loss did not fall.

    python examples/quickstart.py
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import tram

torch.manual_seed(0)
DIM, CLASSES, STEPS = 16, 4, 150


def make_task(teacher: torch.Tensor, shift: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs around ``shift``; the label is the argmax of a fixed linear teacher."""
    x = torch.randn(n, DIM) + shift
    return x, (x @ teacher).argmax(dim=1)


teacher = torch.randn(DIM, CLASSES)
shifted_teacher = teacher + 0.8 * torch.randn(DIM, CLASSES)  # the fine-tuning task moved
pretrain_x, pretrain_y = make_task(teacher, shift=0.0, n=2048)
train_x, train_y = make_task(shifted_teacher, shift=0.5, n=512)
test_x, test_y = make_task(shifted_teacher, shift=0.5, n=1024)

model = nn.Sequential(nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, CLASSES))

# Pre-training: plain AdamW on the source task.
pretrain = torch.optim.AdamW(model.parameters(), lr=3e-3)
for _ in range(200):
    index = torch.randint(0, len(pretrain_x), (64,))
    pretrain.zero_grad()
    F.cross_entropy(model(pretrain_x[index]), pretrain_y[index]).backward()
    pretrain.step()


def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def closure() -> torch.Tensor:
    """Called twice per step by the optimizer: at θ, then at θ+ε."""
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


print(f"held-out accuracy before fine-tuning: {accuracy(test_x, test_y):.3f}")
# Fine-tuning: any optimizer instance, wrapped; rho is the radius of the ascent.
base = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
optimizer = tram.SAM(base, rho=0.05)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
losses = []
for step in range(1, STEPS + 1):
    index = torch.randint(0, len(train_x), (32,))
    x, y = train_x[index], train_y[index]
    losses.append(optimizer.step(closure).item())  # returns the loss at θ
    scheduler.step()
    if step % 25 == 0:
        mean = sum(losses[-25:]) / 25
        print(f"step {step:3d}  loss {mean:.4f}  ascent_norm {optimizer.last_ascent_norm:.4f}")

first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
print(f"loss over 25 steps: first {first:.4f}  final {last:.4f}")
print(f"held-out accuracy after fine-tuning: {accuracy(test_x, test_y):.3f}")
if not last < first:
    print("the loss did not fall", file=sys.stderr)
    sys.exit(1)
