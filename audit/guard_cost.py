# ruff: noqa
"""Cost of the bookkeeping added to first_step: _any_outside (model= holds every perturbed weight?)
on a 12-layer BERT-shaped model's parameter list (tiny widths; the cost is per parameter)."""

import sys, time

sys.path.insert(0, "/work/wt-audit6")
sys.path.insert(0, "/work/wt-audit6/tests")
import torch, transformers
from tram._wrapper import _any_outside

torch.set_num_threads(1)
m = transformers.BertForSequenceClassification(
    transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
)
params = [p for p in m.parameters()]
print("parameters:", len(params))
for _ in range(3):
    _any_outside(params, m)
n = 200
t = time.perf_counter()
for _ in range(n):
    _any_outside(params, m)
print(f"_any_outside: {(time.perf_counter() - t) / n * 1e6:.0f} us per call")
import tram

opt = tram.SAM(torch.optim.SGD(params, lr=0.1), rho=0.05, model=m)
opt._perturbs_outside_the_model(params)
t = time.perf_counter()
for _ in range(n):
    opt._perturbs_outside_the_model(params)
print(f"cached, per ascent step: {(time.perf_counter() - t) / n * 1e6:.0f} us per call")
