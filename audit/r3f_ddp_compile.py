# ruff: noqa
"""R3F on DDP(compiled) and compiled(DDP), gloo, one process: penalty equal to eager, or loud?"""

import sys, os, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, torch.distributed as dist, tram
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tram.regularizers import R3F

warnings.filterwarnings("ignore")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29617")
dist.init_process_group("gloo", rank=0, world_size=1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)).mean(1))


def fresh():
    torch.manual_seed(0)
    return Net()


ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(2))


def pen(model):
    r = R3F(sigma=0.3, weight=1.0, seed=7)
    out = model(input_ids=ids)
    return float(r.penalty(model, {"input_ids": ids}, out))


eager = pen(fresh())
print("eager", eager)
cases = {
    "DDP(compile(model))": lambda: pen(DDP(torch.compile(fresh(), backend="aot_eager"))),
    "compile(DDP(model))": lambda: pen(torch.compile(DDP(fresh()), backend="aot_eager")),
}
for name, f in cases.items():
    try:
        v = f()
        print(f"{name}: {v} {'OK' if abs(v - eager) < 1e-6 else 'DIFFERENT'}")
    except Exception as e:
        print(f"{name}: raised {type(e).__name__}: {str(e)[:200]}")
dist.destroy_process_group()
