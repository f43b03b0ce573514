"""What ``torch.compile(model)`` gives each method's step, with the graph breaks tram's hooks add.

    python benchmarks/compile_cost.py [--rounds 7] [--steps 5] [--layers 4] [--hidden 256]

tram runs its hooks (TRAM's recording of the first forward and its reference forward, the noise
hook, the BatchNorm guard) around a compiled model's forward, and some of them eagerly inside
it, so dynamo splits the forward into several graphs. This times one ``step(closure)`` of AdamW,
SAM, TRAM-x and TRAM-Fisher on a BERT for sequence classification built from its config (no
download, dropout 0, one fixed batch of 16 x 64 tokens), eager and compiled in place
(``model.compile()``, inductor; TRAM-Fisher refuses a ``torch.compile(model)`` wrapper, whose
graph skips its noise), and counts the graphs dynamo compiled for each. The first steps (the
compilation) are left out; then ``--rounds`` rounds, each timing ``--steps`` steps of every
configuration in turn, so that the load of a shared machine hits them alike. Reported: the best
round's time per step and the compiled/eager ratio of each method. One intra-op thread.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import tram


def build_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8000,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def make_optimizer(method: str, model: nn.Module) -> Any:
    base = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    if method == "adamw":
        return base
    if method == "sam":
        return tram.SAM(base, rho=0.05, model=model)
    if method == "tram_x":
        return tram.TRAM(base, model=model, trust_region="noise", sigma=0.1)
    if method == "tram_fisher":
        return tram.TRAMFisher(base, model)
    raise ValueError(method)


class Configuration:
    """One method on its own model, eager or compiled, and its closure."""

    def __init__(self, method: str, compiled: bool, args: argparse.Namespace) -> None:
        self.model = build_model(args)
        if compiled:
            # In place: the form TRAM-Fisher needs (its noise hook is on the training forward,
            # which a torch.compile(model) graph skips, and the ascent refuses that).
            self.model.compile()
        self.optimizer = make_optimizer(method, self.model)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 8000, (16, 64), generator=generator)
        mask = torch.ones_like(ids)
        mask[::2, 48:] = 0  # padding on every other example
        self.batch = {"input_ids": ids, "attention_mask": mask}
        self.labels = torch.randint(0, 3, (16,), generator=generator)

    def closure(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(**self.batch).logits, self.labels)
        loss.backward()
        return loss

    def step(self) -> None:
        self.optimizer.step(self.closure)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)

    methods = ("adamw", "sam", "tram_x", "tram_fisher")
    configurations: dict[tuple[str, bool], Configuration] = {}
    graphs: dict[str, int] = {}
    compile_seconds: dict[str, float] = {}
    for method in methods:
        for compiled in (False, True):
            configuration = Configuration(method, compiled, args)
            before, start = graphs_compiled(), time.perf_counter()
            for _ in range(args.warmup):
                configuration.step()
            if compiled:
                graphs[method] = graphs_compiled() - before
                compile_seconds[method] = time.perf_counter() - start
            configurations[(method, compiled)] = configuration

    best = dict.fromkeys(configurations, float("inf"))
    for _ in range(args.rounds):
        for key, configuration in configurations.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                configuration.step()
            best[key] = min(best[key], (time.perf_counter() - start) / args.steps)

    recompiled = graphs_compiled() - sum(graphs.values())
    parameters = sum(p.numel() for p in build_model(args).parameters())
    print(
        f"BERT, {args.layers} layers, hidden {args.hidden}, {parameters / 1e6:.1f}M parameters; "
        f"batch 16 x 64; best of {args.rounds} rounds of {args.steps} steps; torch "
        f"{torch.__version__}; graphs compiled after the warm-up: {recompiled}"
    )
    print("| method | eager ms/step | compiled ms/step | compiled / eager | graphs | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in methods:
        eager, compiled = best[(method, False)], best[(method, True)]
        print(
            f"| {method} | {eager * 1e3:.1f} | {compiled * 1e3:.1f} | {compiled / eager:.2f} | "
            f"{graphs[method]} | {compile_seconds[method]:.0f} |"
        )


if __name__ == "__main__":
    main()
