# ruff: noqa
"""TRAM-x and TRAM-Fisher on a model compiled in place (Module.compile()): d equal to eager, or loud?"""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, tram
from torch import nn

warnings.filterwarnings("ignore")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)).mean(1))


ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(2))
y = torch.tensor([0, 1, 2, 1])
for target in ["noise", "fisher"]:
    res = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        m = Net()
        if compiled:
            m.compile(backend="aot_eager")
        base = torch.optim.SGD(m.parameters(), lr=0.1)
        opt = (
            tram.TRAMFisher(base, m, rho=0.1)
            if target == "fisher"
            else tram.TRAM(base, m, trust_region="noise", sigma=0.3, embeddings="emb")
        )

        def closure():
            opt.zero_grad()
            l = nn.functional.cross_entropy(m(input_ids=ids), y)
            l.backward()
            return l

        try:
            opt.step(closure)
            res[compiled] = [p.detach().clone() for p in m.parameters()]
            print(
                target,
                "compiled" if compiled else "eager",
                "last_radius",
                getattr(opt, "last_radius", None),
            )
        except Exception as e:
            res[compiled] = f"{type(e).__name__}: {str(e)[:160]}"
    print(
        target,
        "in-place compiled:",
        res[True]
        if isinstance(res[True], str)
        else (
            "same step as eager"
            if all(torch.equal(a, b) for a, b in zip(res[False], res[True]))
            else "DIFFERENT step"
        ),
    )
