# ruff: noqa
"""FSDP1 FSDP.optim_state_dict / optim_state_dict_to_load with a tram wrapper (gloo, 1 process, CPU),
and ZeroRedundancyOptimizer as a base optimizer."""

import sys, os, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, torch.distributed as dist, tram
from torch import nn

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29613")
dist.init_process_group("gloo", rank=0, world_size=1)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def train(opt, m, data):
    for x, y in data:

        def closure():
            opt.zero_grad()
            l = nn.functional.cross_entropy(m(x), y)
            l.backward()
            return l

        opt.step(closure)


data = batches(5)
try:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for kind in ["sam", "pretrained"]:

        def build():
            m = FSDP(model(), device_id=torch.device("cpu"), use_orig_params=True)
            base = torch.optim.AdamW(m.parameters(), lr=0.02)
            o = (
                tram.SAM(base, rho=0.07, ascent_every=3)
                if kind == "sam"
                else tram.TRAM(base, m, trust_region="pretrained")
            )
            return m, o

        m1, o1 = build()
        train(o1, m1, data)
        m2, o2 = build()
        train(o2, m2, data[:2])
        osd = FSDP.optim_state_dict(m2, o2)
        print(kind, "FSDP1 osd group0 has tram:", "tram" in osd["param_groups"][0])
        msd = {k: v.clone() for k, v in m2.state_dict().items()}
        m3, o3 = build()
        m3.load_state_dict(msd)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            o3.load_state_dict(FSDP.optim_state_dict_to_load(m3, o3, osd))
        print(kind, "warnings:", [str(x.message)[:100] for x in w])
        print(kind, "steps", o3.steps)
        train(o3, m3, data[2:])
        print(
            kind,
            "FSDP1 resume exact:",
            all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters())),
        )
except Exception as e:
    import traceback

    traceback.print_exc()
try:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    m = model()
    z = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=torch.optim.AdamW, lr=0.02)
    o = tram.SAM(z, rho=0.07)
    train(o, m, data[:2])
    mr = model()
    orf = tram.SAM(torch.optim.AdamW(mr.parameters(), lr=0.02), rho=0.07)
    train(orf, mr, data[:2])
    print(
        "ZeRO steps equal plain:",
        all(torch.equal(a, b) for a, b in zip(m.parameters(), mr.parameters())),
    )
    z.consolidate_state_dict(0)
    sd = o.state_dict()
    print("ZeRO sd group0 tram:", "tram" in sd["param_groups"][0])
    m5 = model()
    m5.load_state_dict(m.state_dict())
    z5 = ZeroRedundancyOptimizer(m5.parameters(), optimizer_class=torch.optim.AdamW, lr=0.02)
    o5 = tram.SAM(z5, rho=0.07)
    o5.load_state_dict(sd)
    print("ZeRO load steps", o5.steps)
    train(o, m, data[2:])
    train(o5, m5, data[2:])
    print(
        "ZeRO resume exact:",
        all(torch.equal(a, b) for a, b in zip(m.parameters(), m5.parameters())),
    )
except Exception:
    import traceback

    traceback.print_exc()
dist.destroy_process_group()
