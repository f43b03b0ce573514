"""tram: sharpness-aware and trust-region fine-tuning as drop-in PyTorch optimizer wrappers.

``import tram`` needs torch alone. Integrations (Hugging Face, accelerate) and experiments live
in subpackages that import their dependencies lazily.
"""

from tram._fisher import FisherSAM
from tram._sam import ASAM, SAM
from tram._wrapper import TwoPassOptimizer
from tram.accumulation import accumulating_closure
from tram.amp import scaled_step
from tram.batchnorm import frozen_running_stats

__version__ = "0.1.0.dev0"

__all__ = [
    "ASAM",
    "SAM",
    "FisherSAM",
    "TwoPassOptimizer",
    "__version__",
    "accumulating_closure",
    "frozen_running_stats",
    "scaled_step",
]
