"""Mixer: MLP-Mixer research code in JAX/Flax (train, fine-tune, evaluate, sweep)."""
from mixer.models import (SIZES, MlpMixer, count_params, create_model, features,
                          parse_variant)

__all__ = ["SIZES", "MlpMixer", "count_params", "create_model", "features", "parse_variant"]
__version__ = "0.1.0"
