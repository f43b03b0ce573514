# ruff: noqa
"""TRAM-x / TRAM-θ0 / TRAM-Fisher with a compiled model held by another module (as DDP(torch.compile(model)))."""

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


class Holder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.module = m

    def forward(self, input_ids):
        return self.module(input_ids)


ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(2))
y = torch.tensor([0, 1, 2, 1])
for target in ["noise", "pretrained", "fisher"]:
    res = {}
    for how in ("eager", "held compiled", "in-place compiled"):
        torch.manual_seed(0)
        net = Net()
        m = (
            Holder(torch.compile(net, backend="aot_eager"))
            if how == "held compiled"
            else Holder(net)
        )
        if how == "in-place compiled":
            net.compile(backend="aot_eager")
        base = torch.optim.SGD(m.parameters(), lr=0.1)
        if target == "fisher":
            opt = tram.TRAMFisher(
                base,
                m,
                rho=0.1,
                embeddings="module.emb" if how != "held compiled" else "module._orig_mod.emb",
            )
        else:
            opt = tram.TRAM(
                base,
                m,
                trust_region=target,
                **(
                    {
                        "sigma": 0.3,
                        "embeddings": "module.emb"
                        if how != "held compiled"
                        else "module._orig_mod.emb",
                    }
                    if target == "noise"
                    else {}
                ),
            )

        def closure():
            opt.zero_grad()
            l = nn.functional.cross_entropy(m(input_ids=ids), y)
            l.backward()
            return l

        try:
            for _ in range(2):
                opt.step(closure)
            res[how] = [p.detach().clone() for p in m.parameters()]
        except Exception as e:
            res[how] = f"{type(e).__name__}: {str(e)[:140]}"
    for how in ("held compiled", "in-place compiled"):
        r = res[how]
        print(
            target,
            how,
            ":",
            r
            if isinstance(r, str)
            else (
                "same steps as eager"
                if all(torch.equal(a, b) for a, b in zip(res["eager"], r))
                else "DIFFERENT steps"
            ),
        )
