"""tram: sharpness-aware and trust-region fine-tuning as drop-in PyTorch optimizer wrappers."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
