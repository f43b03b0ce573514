"""The main job: the default offline experiment, then its report.

    python -m tram.experiments.main_job [--optimizers adamw,sam,tram_x] [--seeds 1]
        [--experiment sentiment_default] [--out DIR] [extra Hydra overrides ...]

Runs the sweep ``tram-finetune -m experiment=<experiment> optimizer=<optimizers> seed=<seeds>``
in a subprocess (all-MiniLM-L6-v2 fine-tuned on VADER movie-review snippets with AdamW, SAM and
TRAM-x, evaluated on movies, Amazon, tweets and NYT editorials; offline on CPU), writes its runs
under ``DIR`` (default ``outputs/main_job/<time>``), then prints the table of
:mod:`tram.experiments.report` and writes ``DIR/report.md`` and ``DIR/report.png``. With one seed
the table has no confidence intervals or tests; pass ``--seeds 1,2,3`` for them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tram.experiments import report

__all__ = ["main", "sweep_command"]


def sweep_command(
    experiment: str, optimizers: str, seeds: str, out: Path, overrides: Sequence[str] = ()
) -> list[str]:
    """The ``python -m tram.experiments.run -m ...`` command line of the sweep."""
    return [
        sys.executable,
        "-m",
        "tram.experiments.run",
        "-m",
        f"experiment={experiment}",
        f"optimizer={optimizers}",
        f"seed={seeds}",
        f"hydra.sweep.dir={out}",
        *overrides,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tram.experiments.main_job", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--experiment", default="sentiment_default")
    parser.add_argument("--optimizers", default="adamw,sam,tram_x", help="comma-separated")
    parser.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--out", help="sweep directory (default: outputs/main_job/<time>)")
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. train.max_steps=50"
    )
    args = parser.parse_args(argv)
    out = Path(args.out or Path("outputs") / "main_job" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    command = sweep_command(args.experiment, args.optimizers, args.seeds, out, args.overrides)
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command)
    if code != 0:
        print(f"main_job: the sweep failed (exit code {code})", file=sys.stderr)
        return code
    print(f"\nSweep finished in {time.perf_counter() - start:.0f} s: {out}\n", flush=True)
    return report.main([str(out)])


if __name__ == "__main__":
    raise SystemExit(main())
