# ruff: noqa
"""Is a ZeroRedundancyOptimizer resume exact without tram? (control for fsdp1_zero.py)"""

import sys, os

sys.path.insert(0, "/work/wt-audit6")
import torch, torch.distributed as dist, tram
from torch import nn

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29614")
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.optim import ZeroRedundancyOptimizer


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


g = torch.Generator().manual_seed(1)
data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]


def train(opt, m, data, wrap):
    for x, y in data:

        def closure():
            opt.zero_grad()
            l = nn.functional.cross_entropy(m(x), y)
            l.backward()
            return l

        if wrap:
            opt.step(closure)
        else:
            closure()
            opt.step()


for wrap in [False, True]:
    m = model()
    z = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=torch.optim.AdamW, lr=0.02)
    o = tram.SAM(z, rho=0.07) if wrap else z
    train(o, m, data[:2], wrap)
    z.consolidate_state_dict(0)
    sd = o.state_dict()
    m5 = model()
    m5.load_state_dict(m.state_dict())
    z5 = ZeroRedundancyOptimizer(m5.parameters(), optimizer_class=torch.optim.AdamW, lr=0.02)
    o5 = tram.SAM(z5, rho=0.07) if wrap else z5
    o5.load_state_dict(sd)
    print(
        "wrap",
        wrap,
        "local optim state step after load:",
        [s.get("step") for s in z5.optim.state.values()][:2],
        "vs",
        [s.get("step") for s in z.optim.state.values()][:2],
    )
    print(
        "   exp_avg equal:",
        all(
            torch.equal(a["exp_avg"], b["exp_avg"])
            for a, b in zip(z5.optim.state.values(), z.optim.state.values())
        ),
    )
    train(o, m, data[2:], wrap)
    train(o5, m5, data[2:], wrap)
    print(
        "   resume exact:", all(torch.equal(a, b) for a, b in zip(m.parameters(), m5.parameters()))
    )
dist.destroy_process_group()
