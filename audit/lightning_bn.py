# ruff: noqa
"""Lightning + TramCallback + a BatchNorm model: without model= (refused?) and with model=self
(statistics those of the first pass?)."""

import sys, warnings, copy, logging

sys.path.insert(0, "/work/wt-audit6")
import torch, tram, lightning.pytorch as pl
from torch import nn
from tram.integrations.lightning import TramCallback

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
g = torch.Generator().manual_seed(1)
X = torch.randn(8, 5, generator=g)
Y = torch.randint(0, 3, (8,), generator=g)


class M(pl.LightningModule):
    def __init__(self, pass_model):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
        self.pass_model = pass_model

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return tram.SAM(
            torch.optim.SGD(self.parameters(), lr=0.1),
            rho=0.3,
            model=self if self.pass_model else None,
        )


for pass_model in (False, True):
    m = M(pass_model)
    ref = copy.deepcopy(m.net)
    with torch.no_grad():
        ref(X)
    t = pl.Trainer(
        max_steps=1,
        callbacks=[TramCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    try:
        t.fit(m, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8))
        print(
            "model=self" if pass_model else "no model=",
            "ran; running_mean as one forward at θ:",
            torch.equal(m.net[1].running_mean, ref[1].running_mean),
            "num_batches_tracked",
            int(m.net[1].num_batches_tracked),
        )
    except RuntimeError as e:
        print("model=self" if pass_model else "no model=", "raised:", str(e)[:200])
