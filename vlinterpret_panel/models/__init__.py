"""Small vision-language models trained on a synthetic scene world with ground-truth masks.

``load_builtin_model(name)`` returns a committed model ("single_stream", "dual_stream" or
"dual_encoder") with its config; ``world`` draws scenes, questions and captions.
"""

from vlinterpret_panel.models.layers import AttentionMap, ModelConfig, VLModelOutput
from vlinterpret_panel.models.registry import BUILTIN_MODELS, load_builtin_model

__all__ = [
    "BUILTIN_MODELS",
    "AttentionMap",
    "ModelConfig",
    "VLModelOutput",
    "load_builtin_model",
]
