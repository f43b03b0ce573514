# ruff: noqa
"""maximize=True under a GradScaler (explicit form with grad_scale=), each wrapper:
maximizing L must step exactly as minimizing -L."""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, tram
from torch import nn

warnings.filterwarnings("ignore")
g = torch.Generator().manual_seed(1)
data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


def build(maximize, method):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    base = torch.optim.AdamW(m.parameters(), lr=0.013, maximize=maximize)
    if method == "SAM":
        o = tram.SAM(base, rho=0.07)
    elif method == "ASAM":
        o = tram.ASAM(base, rho=0.4, eta=0.03)
    elif method == "FisherSAM":
        o = tram.FisherSAM(base, rho=0.2, eta=0.3)
    else:
        o = tram.TRAM(base, m, trust_region="pretrained")
    return m, o


for method in ["SAM", "ASAM", "FisherSAM", "TRAM-θ0"]:
    out = {}
    for maximize in (True, False):
        m, o = build(maximize, method)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7, growth_interval=1)
        sign = 1.0 if maximize else -1.0
        for x, y in data:
            o.zero_grad()
            with o.first_pass():
                scaler.scale(sign * nn.functional.cross_entropy(m(x), y)).backward()
            if o.first_step(grad_scale=scaler.get_scale()):
                scaler.scale(sign * nn.functional.cross_entropy(m(x), y)).backward()
            o.restore()
            scaler.step(o)
            scaler.update()
        out[maximize] = [p.detach().clone() for p in m.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(out[True], out[False]))
    close = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[True], out[False]))
    print(f"{method}: maximize L == minimize -L under GradScaler: bit-exact {same}, close {close}")
