# ruff: noqa
"""R3F on a tiny HF BERT: gradient checkpointing on (penalty as without), inputs_embeds (no
embedding forward: loud), eval-mode model."""

import sys, warnings

sys.path.insert(0, "/work/wt-audit6")
sys.path.insert(0, "/work/wt-audit6/tests")
import torch, tram
from helpers import tiny_bert

warnings.filterwarnings("ignore")
ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(3))
mask = torch.ones_like(ids)


def pen(model, inputs):
    out = model(**inputs).logits
    return float(tram.R3F(sigma=0.3, weight=1.0, seed=9)(model, inputs, out))


base = pen(tiny_bert(seed=0).train(), {"input_ids": ids, "attention_mask": mask})
print("plain", base)
m = tiny_bert(seed=0).train()
m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
print("gradient checkpointing", pen(m, {"input_ids": ids, "attention_mask": mask}))
m = tiny_bert(seed=0).train()
try:
    emb = m.get_input_embeddings()(ids)
    print("inputs_embeds", pen(m, {"inputs_embeds": emb, "attention_mask": mask}))
except Exception as e:
    print("inputs_embeds raised", type(e).__name__, str(e)[:160])
