"""Models: the encoder interface (encoders: open_clip and hf_blip backends), open_clip loading (clip),
the projection phi, adapters (LoRA, prompts, LN) and parameter counts."""

from xbt_dist.models.clip import ClipBundle, load_clip, register_model_configs
from xbt_dist.models.encoders import EncoderBundle, adapt, load_encoder
from xbt_dist.models.phi import Phi

__all__ = ["ClipBundle", "EncoderBundle", "adapt", "load_clip", "load_encoder", "register_model_configs", "Phi"]
