#!/usr/bin/env bash
# The d trajectory of TRAM-x, every step against radius_every=4, on round 1's cross-domain
# budget (seeds 1 and 2; validation only, no test set). Run from the repository root:
#   bash benchmarks/results/generalization/cross_domain/amortised/trajectory.sh
# then `python benchmarks/results/generalization/amortised_trajectory.py \
#   benchmarks/results/generalization/cross_domain/amortised/trajectory \
#   benchmarks/results/generalization/cross_domain/amortised cross-domain`.
set -eu
OUT=benchmarks/results/generalization/cross_domain/amortised/trajectory
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for seed in 1 2; do
  for every in 1 4; do
    dir=$OUT/radius_every$every/seed$seed
    [ -f "$dir/results.json" ] && continue
    ${PYTHON:-python} -m tram.experiments.run experiment=sentiment_default train.max_steps=80 \
      train.lr=1e-4 train.warmup_steps=8 task.max_eval_examples=1000 evaluate.test=false \
      +trainer.train_sampling_strategy=group_by_length optimizer=tram_x \
      +optimizer.method.radius_every=$every seed=$seed hydra.run.dir=$dir
    rm -rf "$dir/tensorboard" "$dir/.hydra" "$dir"/*.log "$dir/checkpoints"
  done
done
