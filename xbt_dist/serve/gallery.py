"""Gallery items for the web page: thumbnails and captions read straight from the shards by key.

At start-up each local shard's tar headers are scanned once (no payload is read) and the byte
offset of every sample's image and caption member is kept; a thumbnail is then one seek and one
read, whatever the shard size. Thumbnails are cached (LRU) because a page shows the same top items
for many queries. Only local shard sets are supported here (the page is a debugging aid; remote
galleries serve ids and scores without thumbnails).
"""

from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from xbt_dist.data.shards import IMAGE_EXTS, list_shards

THUMB_PX = 128


class GalleryStore:
    """key -> (shard, offset, size) of its image and caption members."""

    def __init__(self, spec: str):
        self.members: dict[str, dict[str, tuple[str, int, int]]] = {}
        self.local = True
        for shard in list_shards(spec):
            path = Path(shard.removeprefix("file://"))
            if not path.is_file():
                self.local = False
                continue
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    prefix, ext = base_plus_ext(info.name)
                    if prefix is None or (ext.lower() not in IMAGE_EXTS and ext != "txt"):
                        continue
                    kind = "txt" if ext == "txt" else "image"
                    self.members.setdefault(prefix, {})[kind] = (str(path), info.offset_data, info.size)

    def __contains__(self, key: str) -> bool:
        return key in self.members

    def _read(self, key: str, kind: str) -> bytes | None:
        entry = self.members.get(key, {}).get(kind)
        if entry is None:
            return None
        path, offset, size = entry
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def caption(self, key: str) -> str | None:
        raw = self._read(key, "txt")
        return None if raw is None else raw.decode("utf-8", errors="replace").strip()

    @functools.lru_cache(maxsize=4096)
    def thumbnail(self, key: str) -> bytes | None:
        """A JPEG of at most THUMB_PX on the long side, or None for an unknown key."""
        from PIL import Image
        raw = self._read(key, "image")
        if raw is None:
            return None
        im = Image.open(io.BytesIO(raw)).convert("RGB")
        im.thumbnail((THUMB_PX, THUMB_PX))
        if max(im.size) < THUMB_PX:  # toy images are 64 px: scale up so the page shows them
            scale = THUMB_PX / max(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
