# ruff: noqa
"""Which real optimizers does tram's closure check refuse? Only closure-only ones should be."""

import sys, inspect, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch
from tram._validation import _step_needs_a_closure

warnings.filterwarnings("ignore")
p = [torch.nn.Parameter(torch.randn(3, 3))]
refused, accepted, failed = [], [], []


def probe(name, make):
    try:
        opt = make()
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {str(e)[:60]}")
        return
    (refused if _step_needs_a_closure(opt) else accepted).append(name)


for name in dir(torch.optim):
    cls = getattr(torch.optim, name)
    if (
        inspect.isclass(cls)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    ):
        probe("torch.optim." + name, lambda cls=cls: cls(p, lr=0.01))
from transformers.optimization import Adafactor

probe(
    "transformers.Adafactor",
    lambda: Adafactor(p, lr=1e-3, relative_step=False, scale_parameter=False),
)
import pytorch_optimizer

for name in pytorch_optimizer.get_supported_optimizers():

    def make(name=name):
        cls = pytorch_optimizer.load_optimizer(name)
        return cls(p)

    probe("pytorch_optimizer." + name, make)
print("REFUSED:", refused)
print("accepted:", len(accepted))
print("could not construct:", len(failed))
print("\n".join(failed))
