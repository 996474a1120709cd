"""Models: open_clip loading (clip), the projection phi, adapters (LoRA, prompts, LN) and parameter counts."""

from xbt_dist.models.clip import ClipBundle, load_clip, register_model_configs
from xbt_dist.models.phi import Phi

__all__ = ["ClipBundle", "load_clip", "register_model_configs", "Phi"]
