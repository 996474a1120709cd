"""Query encoders of a trained run, one per VIEW (the names of eval/compat.py):

- `old`  the old model (what the retrieval system queries with today),
- `new`  the untouched new model (adapters off: the rollback model and the new/new index's encoder),
- `phi`  the stage-1 phi on the untouched new model,
- `xbt`  the trained phi on the adapted new model: the upgrade's query encoder.

Every view returns float32, L2-normalised numpy rows, computed exactly as `xbt eval` does
(normalise the tower output, apply phi, normalise again), so index and exact numbers agree.
The adapted model gets its own copy of the new model's weights: adapters are injected in place and
`new` must stay untouched.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xbt_dist.config import RunConfig
from xbt_dist.models.encoders import load_encoder

VIEWS = ("old", "new", "phi", "xbt")


class QueryEncoder:
    """Loads the models of `cfg` once; `texts(view, list[str])`, `images(view, list[PIL])`."""

    def __init__(self, cfg: RunConfig, device: str = "cpu", views=VIEWS, batch_size: int = 256):
        from xbt_dist.train.stage1 import PHI_FILE, load_phi
        from xbt_dist.train.stage2 import ADAPTERS_FILE, load_xbt
        self.cfg, self.device, self.bs = cfg, torch.device(device), batch_size
        self.bundles, self.heads = {}, {}
        self.adapters_path = Path(cfg.stage_dir("train")) / ADAPTERS_FILE
        self.phi_path = Path(cfg.stage_dir("phi")) / PHI_FILE
        need_new = any(v in views for v in ("new", "phi", "xbt"))
        if "old" in views:
            self.bundles["old"] = load_encoder(cfg.old, device)
        if need_new:
            self.bundles["new"] = load_encoder(cfg.new, device)
        if "phi" in views and self.phi_path.is_file():
            self.heads["phi"] = load_phi(self.phi_path).to(self.device).eval()
        self.xbt = None
        if "xbt" in views:
            if not self.adapters_path.is_file():
                raise FileNotFoundError(f"{self.adapters_path} not found: the XBT query encoder needs "
                                        "a trained run (`xbt train`), or drop 'xbt' from the views")
            new = self.bundles["new"]
            d_old = self._old_dim()
            base = dataclasses.replace(new, model=copy.deepcopy(new.model))
            self.xbt = load_xbt(cfg, base, d_old).to(self.device).eval()
        self.views = [v for v in views if v in ("old", "new") and v in self.bundles
                      or v == "phi" and "phi" in self.heads or v == "xbt" and self.xbt is not None]

    def _old_dim(self) -> int:
        if "old" in self.bundles:
            return self.bundles["old"].embed_dim
        from xbt_dist.train.stage1 import load_phi
        if self.phi_path.is_file():
            return load_phi(self.phi_path).d_old
        raise FileNotFoundError("cannot tell the old embedding dim: load the old model or run stage 1")

    def dim(self, view: str) -> int:
        if view == "new":
            return self.bundles["new"].embed_dim
        return self.bundles["old"].embed_dim if "old" in self.bundles else self._old_dim()

    def _check(self, view: str) -> None:
        if view not in self.views:
            raise ValueError(f"view {view!r} is not available (have {self.views}): 'phi' needs "
                             "the stage-1 phi, 'xbt' the trained adapters")

    def _encoders(self, view: str):
        """(bundle for preprocessing, image fn, text fn, head) of a view; fns return raw rows."""
        if view == "old":
            b = self.bundles["old"]
            return b, b.model.encode_image, b.model.encode_text, None
        b = self.bundles["new"]
        if view == "xbt":
            return (b, lambda x: self.xbt.new.encode_image(x, normalize=False),
                    lambda t: self.xbt.new.encode_text(t, normalize=False), self.xbt.phi)
        return b, b.model.encode_image, b.model.encode_text, self.heads.get(view)

    @torch.no_grad()
    def _run(self, view: str, items: list, modality: str) -> np.ndarray:
        self._check(view)
        bundle, enc_img, enc_txt, head = self._encoders(view)
        out = []
        for i in range(0, len(items), self.bs):
            chunk = items[i:i + self.bs]
            if modality == "image":
                x = torch.stack([bundle.preprocess(im.convert("RGB")) for im in chunk]).to(self.device)
                z = F.normalize(enc_img(x).float(), dim=-1)
            else:
                z = F.normalize(enc_txt(bundle.tokenizer(chunk).to(self.device)).float(), dim=-1)
            if head is not None:
                z = F.normalize(head(z), dim=-1)
            out.append(z.cpu().numpy())
        if not out:
            return np.zeros((0, self.dim(view)), np.float32)
        return np.concatenate(out).astype(np.float32)

    def texts(self, view: str, texts: list[str]) -> np.ndarray:
        return self._run(view, list(texts), "text")

    def images(self, view: str, images: list) -> np.ndarray:
        return self._run(view, list(images), "image")
