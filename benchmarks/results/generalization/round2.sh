#!/usr/bin/env bash
# Round 2 of the generalization benchmark (PROTOCOL.md in cross_lingual/ and cross_domain_v2/):
# one thread per run, JOBS runs side by side (default 1), in order of importance. Every stage
# is resumable: rerunning this script skips the runs whose results exist. Run it from the repository root (or from a
# snapshot of a commit, with OUT pointing at the checkout's results directory):
#   OUT=$PWD/benchmarks/results/generalization nohup bash benchmarks/results/generalization/round2.sh > round2.log 2>&1 &
set -u
OUT=${OUT:-$PWD/benchmarks/results/generalization}
PYTHON=${PYTHON:-python}
JOBS=${JOBS:-1}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
run() { echo "=== $(date -u +%FT%TZ) $*"; "$PYTHON" -m tram.experiments.generalization run --jobs "$JOBS" --threads 1 "$@"; echo "=== exit $?"; }

LINGUAL=(--out "$OUT/cross_lingual" --task cross_lingual --tuning-seeds 101-103 --curve 50,100,200,400,800 --curve-doublings 0 --diagnose-seeds 1-5)
DOMAIN=(--out "$OUT/cross_domain_v2" --task cross_domain --tuning-seeds 101-103 --curve 80,160,320,640 --curve-doublings 0 --diagnose-seeds 1-5)

# The curves do not double past their end (deviation 2 in both protocols: compute).
# Stage A: every method, seeds 1-10.
run "${LINGUAL[@]}" --methods adamw,sam,asam,r3f,tram_theta0,tram_x,tram_prev,tram_fisher --seeds 1-10
run "${DOMAIN[@]}" --methods adamw,sam,asam,r3f,tram_theta0,tram_x --seeds 1-10
# Stage B: AdamW and the TRAM variants, seeds 11-20.
run "${LINGUAL[@]}" --methods adamw,tram_theta0,tram_x,tram_prev,tram_fisher --seeds 11-20
run "${DOMAIN[@]}" --methods adamw,tram_theta0,tram_x --seeds 11-20
echo "=== $(date -u +%FT%TZ) round 2 complete"
