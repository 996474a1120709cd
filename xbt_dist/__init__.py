"""xbt_dist: distributed cross-modal backward-compatible training (XBT) of CLIP-style models.

Stage 1 pretrains a projection `phi` (new embedding space -> old) on text only; stage 2 (XBT)
tunes LoRA adapters, soft prompts and LayerNorms of the new model jointly with `phi`, so that
new queries retrieve an old gallery without re-embedding it.
"""

__version__ = "0.1.0"
