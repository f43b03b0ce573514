# ruff: noqa
"""Lightning, automatic optimization, accumulate_grad_batches=3, SAM via TramCallback, TRPO with
after_step in on_train_batch_end: after each optimizer step, TRPO's reference must equal the weights
before that step (θt−1), exactly."""

import sys, warnings, logging

sys.path.insert(0, "/work/wt-audit6")
import torch, tram, lightning.pytorch as pl
from torch import nn
from tram.integrations.lightning import TramCallback

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
g = torch.Generator().manual_seed(1)
X = torch.randint(0, 20, (24, 5), generator=g)
Y = torch.randint(0, 3, (24,), generator=g)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


class M(pl.LightningModule):
    def __init__(self, manual):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()
        self.trpo = tram.TRPO(self.net, weight=0.4)
        self.before = []
        self.checks = []
        self.manual = manual
        if manual:
            self.automatic_optimization = False

    def training_step(self, batch, i):
        x, y = batch
        if self.manual:
            opt = self.optimizers()
            if i % 2 == 0:
                self.before.append({k: v.detach().clone() for k, v in self.net.named_parameters()})
            out = self.net(x)
            loss = nn.functional.cross_entropy(out, y) + self.trpo(self.net, x, out)
            self.manual_backward(loss / 2)
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
                self.trpo.after_step(self.net)
                self.record()
            return
        out = self.net(x)
        return nn.functional.cross_entropy(out, y) + self.trpo(self.net, x, out)

    def on_train_batch_start(self, batch, i):
        if not self.manual and i % 3 == 0:
            self.before.append({k: v.detach().clone() for k, v in self.net.named_parameters()})

    def on_train_batch_end(self, outputs, batch, i):
        if not self.manual:
            self.trpo.after_step(self.net)
            if i % 3 == 2:
                self.record()

    def record(self):
        self.checks.append(
            all(torch.equal(self.trpo.reference.tensors[k], v) for k, v in self.before[-1].items())
        )

    def configure_optimizers(self):
        base = torch.optim.AdamW(self.parameters(), lr=0.05)
        return base if self.manual else tram.SAM(base, rho=0.07, model=self)


for manual in (False, True):
    m = M(manual)
    t = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=1 if manual else 3,
        callbacks=[] if manual else [TramCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    t.fit(m, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4))
    print(
        "manual" if manual else "automatic+accumulate 3+SAM",
        "reference == θ before each step:",
        m.checks,
    )
