# ruff: noqa
"""R3F / representation_noise under other compilation layouts (backend aot_eager).
Expected for each: the penalty equals the eager model's (same seed), or a loud error."""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, tram
from torch import nn
from tram.regularizers import R3F

warnings.filterwarnings("ignore")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(self.body(self.emb(input_ids)).mean(1))


def fresh():
    torch.manual_seed(0)
    return Net()


ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(2))


def pen(model, emb_name="emb"):
    r = R3F(sigma=0.3, weight=1.0, seed=7, embeddings=emb_name)
    out = model(input_ids=ids)
    return float(r.penalty(model, {"input_ids": ids}, out))


eager = pen(fresh())
print("eager", eager)
cases = {}
m = fresh()
cases["compile(model)"] = lambda: pen(torch.compile(m, backend="aot_eager"))
m2 = fresh()
m2.forward = torch.compile(m2.forward, backend="aot_eager")
cases["model.forward = compile(model.forward)"] = lambda: pen(m2)
m3 = fresh()
m3.body = torch.compile(m3.body, backend="aot_eager")
cases["compiled body submodule"] = lambda: pen(m3)
m4 = fresh()
m4.emb = torch.compile(m4.emb, backend="aot_eager")
cases["compiled embedding submodule"] = lambda: pen(m4)
m5 = fresh()
m5.compile(backend="aot_eager")
cases["model.compile() (in place)"] = lambda: pen(m5)
for name, f in cases.items():
    try:
        v = f()
        print(f"{name}: {v} {'OK' if abs(v - eager) < 1e-6 else 'DIFFERENT'}")
    except Exception as e:
        print(f"{name}: raised {type(e).__name__}: {str(e)[:150]}")
