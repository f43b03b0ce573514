"""Fine-tune on one domain and evaluate on every domain, from the Hydra configs in configs/.

The same entry point as the ``tram-finetune`` console command and ``python -m
tram.experiments.run``; every Hydra override works here too:

    python examples/finetune.py experiment=smoke                    # about a minute on CPU
    python examples/finetune.py experiment=smoke optimizer=tram_x
    python examples/finetune.py -m experiment=sentiment_default optimizer=adamw,sam,tram_x
    tram-report outputs/multirun/vader_sentiment_minilm/<time>     # table and plot of the sweep

Each run writes results.json and TensorBoard logs into its output directory.
"""

from tram.experiments.run import main

if __name__ == "__main__":
    main()
