# ruff: noqa
"""BatchNorm guard of a wrapper built without model=: BN variants whose running statistics are
updated at θ+ε. Expected: RuntimeError (or stats identical to model=). Prints what happens."""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, tram
from torch import nn

warnings.filterwarnings("ignore")


def make(kind):
    torch.manual_seed(0)
    if kind == "affine=False":
        bn = nn.BatchNorm1d(7, affine=False)
    else:
        bn = nn.BatchNorm1d(7)
    m = nn.Sequential(nn.Linear(5, 7), bn, nn.Tanh(), nn.Linear(7, 3))
    if kind == "frozen affine":
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    if kind == "lazy":
        m = nn.Sequential(nn.Linear(5, 7), nn.LazyBatchNorm1d(), nn.Tanh(), nn.Linear(7, 3))
        m(torch.randn(4, 5))
        torch.manual_seed(0)
    return m


g = torch.Generator().manual_seed(1)
x = torch.randn(8, 5, generator=g)
y = torch.randint(0, 3, (8,), generator=g)
for kind in ["plain", "affine=False", "frozen affine", "lazy"]:
    stats = {}
    for with_model in (True, False):
        m = make(kind)
        base = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        opt = tram.SAM(base, rho=0.3, model=m if with_model else None)

        def closure():
            opt.zero_grad()
            l = nn.functional.cross_entropy(m(x), y)
            l.backward()
            return l

        try:
            opt.step(closure)
            stats[with_model] = m[1].running_mean.clone()
        except RuntimeError as e:
            stats[with_model] = "RuntimeError"
    same = isinstance(stats[False], str) or torch.equal(stats[True], stats[False])
    print(
        f"{kind:14s} without model=: {'refused' if isinstance(stats[False], str) else 'ran'}; running stats as with model=: {same}"
    )
