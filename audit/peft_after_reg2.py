# ruff: noqa
"""TRPO created before PEFT, with modules_to_save: does its reference forward silently run the
current model (penalty 0 after steps)?"""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, tram, peft
from torch import nn
from tram.regularizers import TRPO

warnings.filterwarnings("ignore")
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
reg = TRPO(m, weight=0.3)
pm = peft.get_peft_model(
    m, peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"], init_lora_weights=False)
)
opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
g = torch.Generator().manual_seed(1)
x = torch.randn(8, 5, generator=g)
y = torch.randint(0, 3, (8,), generator=g)
try:
    for i in range(3):
        opt.zero_grad()
        out = pm(x)
        pen = reg(pm, x, out)
        print("step", i, "penalty", float(pen))
        (nn.functional.cross_entropy(out, y) + pen).backward()
        opt.step()
        reg.after_step(pm)
except Exception as e:
    print("raised", type(e).__name__, str(e)[:200])
