#!/usr/bin/env bash
# The step-cost benchmark on one CUDA GPU, in under ten minutes (see benchmarks/README.md).
#
#   bash benchmarks/cuda.sh [--dry-run] [--blocks N] [--rounds N] [--out DIR]
#   make bench-cuda
#
# Runs benchmarks/test_step_cost.py (every model, every method, time and memory) with the
# rounds timed by CUDA events and the memory from torch.cuda.max_memory_allocated, and writes
# step_cost.json, step_cost_summary.json and step_cost.md to benchmarks/results/<date>-cuda/.
# Installs nothing: it needs torch with CUDA, transformers, pytest and pytest-benchmark; a row
# whose package is missing (peft: the LoRA model; pytorch_optimizer: the peer SAM) is left out
# and the plan says so. --dry-run prints the plan and the selected tests, and needs no GPU.
# $PYTHON chooses the interpreter (default: .venv/bin/python if there is one, else python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry_run=0
blocks=10  # interleaved blocks per model; each times every method for --rounds rounds
rounds=3
out="benchmarks/results/$(date -u +%Y-%m-%d)-cuda"
budget_s=540  # the whole pytest run is stopped after this: ten minutes with start-up to spare

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --blocks) blocks="$2"; shift ;;
        --rounds) rounds="$2"; shift ;;
        --out) out="$2"; shift ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "cuda.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi

has() { "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

for module in torch transformers pytest pytest_benchmark; do
    if ! has "$module"; then
        echo "cuda.sh: $python cannot import $module, which the benchmark needs" >&2
        exit 2
    fi
done

# Rows whose package is missing are deselected, not failed.
deselect=()
if ! has peft; then
    deselect+=("small_llama_lora")
fi
if ! has pytorch_optimizer; then
    deselect+=("peer_sam")
fi
select="test_step_time or test_step_memory"
for name in "${deselect[@]+"${deselect[@]}"}"; do
    select="($select) and not $name"
done

command=(
    "$python" -m pytest benchmarks --benchmark-only -p no:cacheprovider -q
    -k "$select"
    --step-cost-blocks "$blocks" --step-cost-rounds "$rounds" --step-cost-out "$out"
)

echo "tram step-cost benchmark on CUDA"
echo "  python:   $python"
echo "  output:   $out/ (step_cost.json, step_cost_summary.json, step_cost.md)"
echo "  timing:   CUDA events per round ($blocks blocks x $rounds rounds per method), memory: torch.cuda.max_memory_allocated"
echo "  budget:   stopped after ${budget_s} s"
if [[ ${#deselect[@]} -gt 0 ]]; then
    echo "  left out: ${deselect[*]} (package missing)"
fi
echo "  command:  $(printf '%q ' "${command[@]}")"

if [[ $dry_run -eq 1 ]]; then
    # Collected, not run: checks the selection and counts the tests (the timing blocks of every
    # method of every model, then the memory tests). The output directory is a scratch one.
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    "$python" -m pytest benchmarks --collect-only -q -p no:cacheprovider --benchmark-disable \
        -k "$select" --step-cost-blocks "$blocks" --step-cost-rounds "$rounds" \
        --step-cost-out "$scratch" | tail -n 1
    echo "dry run: nothing was timed"
    exit 0
fi

if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "cuda.sh: torch.cuda.is_available() is False: no GPU to benchmark (--dry-run prints the plan)" >&2
    exit 2
fi
"$python" -c "import torch; print('  device:  ', torch.cuda.get_device_name(), '| torch', torch.__version__)"

mkdir -p "$out"
# Interrupting pytest (SIGINT) still writes the JSON and the summary of what was measured.
timeout --signal=INT --kill-after=30 "$budget_s" "${command[@]}" 2>&1 | tee "$out/run.log"
status=${PIPESTATUS[0]}
if [[ $status -eq 124 ]]; then
    echo "cuda.sh: stopped after ${budget_s} s; $out holds what was measured" >&2
fi
exit "$status"
