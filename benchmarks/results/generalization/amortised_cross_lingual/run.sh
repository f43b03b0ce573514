#!/usr/bin/env bash
# Amortised TRAM-x (radius_every=4, and 8) against every-step TRAM-x on the cross-lingual budget of
# round 2 (800 steps; cross_lingual/budget.json), sigma = 0.1 (the config's value, not tuned
# here), paired by seed. Resumable: a run whose results.json exists is skipped. From the
# repository root:
#   bash benchmarks/results/generalization/amortised_cross_lingual/run.sh [SEEDS...]
# EVERY (default "1 4") lists the radius_every values to run for each seed.
set -eu
OUT=benchmarks/results/generalization/amortised_cross_lingual/results
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for seed in ${@:-1 2 3 4 5}; do
  for every in ${EVERY:-1 4}; do
    dir=$OUT/radius_every$every/seed$seed
    [ -f "$dir/results.json" ] && continue
    echo "=== $(date -u +%FT%TZ) seed $seed radius_every $every"
    ${PYTHON:-python} -m tram.experiments.run experiment=topics_default \
      task.max_eval_examples=null +trainer.train_sampling_strategy=group_by_length \
      train.max_steps=800 train.warmup_steps=80 optimizer=tram_x \
      +optimizer.method.radius_every=$every seed=$seed hydra.run.dir=$dir
    rm -rf "$dir/tensorboard" "$dir/.hydra" "$dir"/*.log "$dir/checkpoints"
  done
done
