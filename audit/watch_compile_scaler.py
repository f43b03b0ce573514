# ruff: noqa
"""TRPO/MESA step watch: torch.compile'd optimizer step, GradScaler skipping the first step,
two optimizers, PEFT applied after the regularizer."""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, tram
from torch import nn
from tram.regularizers import TRPO, MESA

warnings.filterwarnings("ignore")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


g = torch.Generator().manual_seed(1)
data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]

# 1. compiled optimizer step
m = model()
reg = TRPO(m, weight=0.3)
opt = torch.optim.AdamW(m.parameters(), lr=0.02)
step = torch.compile(opt.step, backend="aot_eager")
res = []
for x, y in data:
    opt.zero_grad()
    out = m(x)
    loss = nn.functional.cross_entropy(out, y) + reg(m, x, out)
    loss.backward()
    step()
    res.append(reg._steps.stepped)
    reg.after_step(m)
print("compiled step seen by the watch:", res, "observed", reg._steps.observed)

# 2. forget after_step with compiled step: must raise at next penalty
m = model()
reg = TRPO(m, weight=0.3)
opt = torch.optim.AdamW(m.parameters(), lr=0.02)
step = torch.compile(opt.step, backend="aot_eager")
x, y = data[0]
opt.zero_grad()
out = m(x)
(nn.functional.cross_entropy(out, y) + reg(m, x, out)).backward()
step()
try:
    reg(m, x, m(x))
    print("compiled: forgotten after_step NOT refused")
except RuntimeError as e:
    print("compiled: forgotten after_step refused")

# 3. MESA + GradScaler('cpu') skipping the first step (inf grad), then a real step
m = model()
reg = MESA(m, weight=0.3, decay=0.9)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
for i, (x, y) in enumerate(data[:3]):
    opt.zero_grad()
    out = m(x)
    loss = nn.functional.cross_entropy(out, y) + reg(m, x, out)
    if i == 0:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    before = {k: v.clone() for k, v in reg.reference.tensors.items()}
    reg.after_step(m)
    moved = any(not torch.equal(before[k], v) for k, v in reg.reference.tensors.items())
    print(f"GradScaler step {i}: skipped={i == 0} reference moved={moved}")
