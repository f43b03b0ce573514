"""tram: sharpness-aware and trust-region fine-tuning as drop-in PyTorch optimizer wrappers.

``import tram`` needs torch alone. Integrations (Hugging Face, accelerate) and experiments live
in subpackages that import their dependencies lazily.
"""

from tram._fisher import FisherSAM
from tram._sam import ASAM, SAM
from tram._tram import TRAM, TRUST_REGIONS
from tram._tram_fisher import TRAMFisher
from tram._wrapper import MissingAscentError, TwoPassOptimizer
from tram.accumulation import accumulating_closure
from tram.amp import scaled_step
from tram.batchnorm import frozen_running_stats
from tram.divergence import get_divergence
from tram.factory import list_methods, register, wrap_optimizer
from tram.noise import find_input_embeddings, representation_noise
from tram.regularizers import MESA, R3F, R4F, TRPO
from tram.targets import ReferenceWeights

__version__ = "0.1.0.dev0"

__all__ = [
    "ASAM",
    "MESA",
    "R3F",
    "R4F",
    "SAM",
    "TRAM",
    "TRPO",
    "TRUST_REGIONS",
    "FisherSAM",
    "MissingAscentError",
    "ReferenceWeights",
    "TRAMFisher",
    "TwoPassOptimizer",
    "__version__",
    "accumulating_closure",
    "find_input_embeddings",
    "frozen_running_stats",
    "get_divergence",
    "list_methods",
    "register",
    "representation_noise",
    "scaled_step",
    "wrap_optimizer",
]
