"""hybrid-vlm: training-free visual token reduction for LLaVA-1.5 on modern transformers.

    from hybrid_vlm import HybridConfig, apply_hybrid
    model = apply_hybrid(model, HybridConfig(fastv_k=64, fastv_layer=2))
"""

from .config import HybridConfig, parse_fastv_k, visual_keep_count
from .model import HybridLlavaForConditionalGeneration, HybridLlavaOutput, apply_hybrid, inputs_for, remove_hybrid

__all__ = [
    "HybridConfig",
    "HybridLlavaForConditionalGeneration",
    "HybridLlavaOutput",
    "apply_hybrid",
    "inputs_for",
    "parse_fastv_k",
    "remove_hybrid",
    "visual_keep_count",
]
__version__ = "0.1.0"
