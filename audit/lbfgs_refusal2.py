# ruff: noqa
import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
import torch, pytorch_optimizer
from tram._validation import _step_needs_a_closure

warnings.filterwarnings("ignore")
m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
tries = {
    "muon": lambda c: c(m.parameters()),
    "adamuon": lambda c: c(m.parameters()),
    "normuon": lambda c: c(m.parameters()),
    "adago": lambda c: c(m.parameters()),
    "muonclip": lambda c: c(m),
    "distributedmuon": lambda c: c(m.parameters()),
    "adalomo": lambda c: c(m),
    "lomo": lambda c: c(m),
    "adammini": lambda c: c(m),
    "ranger21": lambda c: c(m.parameters(), num_iterations=10),
    "bsam": lambda c: c(m.parameters(), num_data=10),
}
for name, make in tries.items():
    try:
        opt = make(pytorch_optimizer.load_optimizer(name))
        print(
            name,
            type(opt).__mro__[1].__name__,
            isinstance(opt, torch.optim.Optimizer),
            "refused" if _step_needs_a_closure(opt) else "accepted",
        )
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:100])
