"""The cost of the BatchNorm guard per module call, against torch's own cost of a global hook.

    python benchmarks/guard_cost.py [--rounds 15] [--layers 12]

A SAM-family wrapper built without ``model=`` (or with a ``model=`` that does not hold every
perturbed weight) arms ``tram.batchnorm.refuse_running_stats_updates`` for its second pass: a
global module forward pre-hook that every module call runs. A global hook alone moves every
module call onto ``Module._call_impl``'s slow path; the guard's own work comes on top. This
times a forward of a BERT with tiny widths (so that per-module overhead dominates, as in a
launch-bound GPU step) three ways, interleaved round by round: no hook, a no-op global hook,
the armed guard. One intra-op thread, no gradients; the best of the rounds, and the cost per
module call over the plain forward.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from transformers import BertConfig, BertModel

from tram.batchnorm import disarm, refuse_running_stats_updates


class _Owner:
    """What a wrapper hands the guard: always armed, never replaying a closure."""

    def armed(self) -> bool:
        return True

    def replaying(self) -> bool:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--calls", type=int, default=20, help="forwards per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=args.layers, hidden_size=16, num_attention_heads=2, intermediate_size=16
    )
    model = BertModel(config).eval()
    inputs = torch.randint(0, config.vocab_size, (1, 4))
    owner = _Owner()

    def no_hook() -> Callable[[], None]:
        return lambda: None

    def no_op_hook() -> Callable[[], None]:
        return register_module_forward_pre_hook(lambda module, args: None).remove

    def guard() -> Callable[[], None]:
        armed = refuse_running_stats_updates(
            "SAM", owner.armed, list(model.parameters()), replaying=owner.replaying
        )
        return lambda: disarm(armed)

    setups = {"no hook": no_hook, "no-op global hook": no_op_hook, "armed guard": guard}
    best = dict.fromkeys(setups, float("inf"))
    with torch.no_grad():
        for _ in range(5):
            model(inputs)
        for _ in range(args.rounds):
            for name, setup in setups.items():
                undo = setup()
                start = time.perf_counter()
                for _ in range(args.calls):
                    model(inputs)
                best[name] = min(best[name], (time.perf_counter() - start) / args.calls)
                undo()
    modules = sum(1 for _ in model.modules())
    print(f"{modules} modules, best of {args.rounds} rounds of {args.calls} forwards")
    print("| forward | ms | per module call over no hook |")
    print("|---|---:|---:|")
    for name, seconds in best.items():
        extra = (seconds - best["no hook"]) / modules * 1e6
        print(f"| {name} | {seconds * 1e3:.2f} | {extra:+.2f} us |")


if __name__ == "__main__":
    main()
