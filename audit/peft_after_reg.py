# ruff: noqa
"""A TRPO / MESA regularizer created before PEFT wraps the model."""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, tram, peft
from torch import nn
from tram.regularizers import TRPO, MESA

warnings.filterwarnings("ignore")
for cls in (TRPO, MESA):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    reg = cls(m, weight=0.3)
    pm = peft.get_peft_model(
        m, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    try:
        for i in range(3):
            opt.zero_grad()
            out = pm(x)
            pen = reg(pm, x, out)
            # the reference of a never-stepped model with LoRA B != 0 differs from the model: expected penalty > 0 at step 0 (pre-LoRA theta0)
            print(cls.__name__, i, "penalty", float(pen))
            (nn.functional.cross_entropy(out, y) + pen).backward()
            opt.step()
            reg.after_step(pm)
        print(cls.__name__, "reference keys", list(reg.reference.tensors)[:4])
    except Exception as e:
        import traceback

        traceback.print_exc(limit=-6)
