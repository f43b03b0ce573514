#!/usr/bin/env bash
# Amortised TRAM-x on round 1's cross-domain budget, seeds 1-8, paired with round 1's every-step
# TRAM-x and AdamW runs of the same seeds (../results/test/). Resumable: a run whose
# results.json exists is skipped. From the repository root:
#   EVERY="4 8" bash benchmarks/results/generalization/cross_domain/amortised/run.sh [SEEDS...]
# EVERY (default "4") lists the radius_every values; then compare.py prints the table.
set -eu
OUT=benchmarks/results/generalization/cross_domain/amortised/results
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for seed in ${@:-1 2 3 4 5 6 7 8}; do
  for every in ${EVERY:-4}; do
    dir=$OUT/tram_x_radius$every/seed$seed
    [ -f "$dir/results.json" ] && continue
    echo "=== $(date -u +%FT%TZ) seed $seed radius_every $every"
    ${PYTHON:-python} -m tram.experiments.run experiment=sentiment_default train.max_steps=80 \
      train.lr=1e-4 train.warmup_steps=8 task.max_eval_examples=1000 \
      +trainer.train_sampling_strategy=group_by_length optimizer=tram_x \
      +optimizer.method.radius_every=$every optimizer.name=tram_x_radius$every seed=$seed \
      hydra.run.dir=$dir
    rm -rf "$dir/tensorboard" "$dir/.hydra" "$dir"/*.log "$dir/checkpoints"
  done
done
