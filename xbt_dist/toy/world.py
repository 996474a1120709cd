"""Procedural image-caption world: scenes, rendering, captions, and the four shard sets.

A scene holds 1-3 described objects (shape, colour, size, texture, position) on a coloured
background, plus a few tiny unmentioned clutter specks. Captions are compositional and come from
several paraphrase templates; some templates leave attributes out (texture, background, the third
object), so a caption can fit several gallery images -- that, the near-neighbour colours (red /
orange, blue / navy, ...) and the per-image colour jitter keep retrieval unsaturated on a 1k gallery.

Everything is drawn from `numpy.random.Generator`s seeded from (seed, split name), so a world is
a pure function of its config: same seed -> same captions and the same JPEG bytes.

Shard sets written (formats in docs/architecture.md): `train/` (image-caption pairs), `text/`
(caption-only corpus for stage 1), `eval/` (gallery with `json["captions"]`), `zeroshot/`
(single-object images with `cls` and `classes.json`).
"""

from __future__ import annotations

import functools
import io
import math
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from xbt_dist.artifacts import (atomic_write_text, config_digest, is_complete, read_manifest,
                                write_manifest)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
# Near neighbours on purpose (red/orange/pink, blue/navy/cyan/purple, ...): fine distinctions.
COLOURS = {
    "red": (205, 40, 40), "orange": (235, 130, 30), "yellow": (230, 210, 40),
    "green": (50, 160, 60), "lime": (150, 220, 60), "cyan": (50, 200, 210),
    "blue": (45, 85, 215), "navy": (30, 35, 120), "purple": (135, 55, 180),
    "pink": (235, 120, 175), "brown": (120, 75, 35),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "medium", "large")
SIZE_RADIUS = {"small": (0.075, 0.10), "medium": (0.12, 0.15), "large": (0.17, 0.21)}  # x image size
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {"white": (238, 238, 238), "gray": (140, 140, 140), "black": (22, 22, 22),
               "beige": (225, 210, 175)}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLIT_KINDS = {"train": "image-text-shards", "eval": "multi-caption-eval-shards",
               "val": "multi-caption-eval-shards",
               "text": "text-shards", "zeroshot": "zeroshot-shards"}
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a rendering of a {}.",
                      "an image showing a {}.")


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    texture: str
    cx: float   # centre, as a fraction of the image side
    cy: float
    radius: float

    def phrase(self, texture: bool = True) -> str:
        """Noun phrase, adjectives in natural English order: size, colour, texture, shape."""
        tex = "" if (not texture or self.texture == "plain") else f" {self.texture}"
        return f"{self.size} {self.colour}{tex} {self.shape}"


@dataclass
class Scene:
    background: str
    objects: list[Obj]
    clutter: list[tuple[float, float, tuple[int, int, int]]] = field(default_factory=list)

    def relation(self) -> str:
        """Spatial relation of object 0 to object 1, from the dominant axis of their offset."""
        a, b = self.objects[0], self.objects[1]
        dx, dy = a.cx - b.cx, a.cy - b.cy
        if abs(dx) >= abs(dy):
            return "left of" if dx < 0 else "right of"
        return "above" if dy < 0 else "below"

    def meta(self) -> dict:
        return {"background": self.background,
                "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size,
                             "texture": o.texture, "cx": round(o.cx, 3), "cy": round(o.cy, 3)}
                            for o in self.objects]}


def split_rng(seed: int, split: str) -> np.random.Generator:
    """Independent stream per (seed, split): splits never share scenes by construction of the
    stream, and adding a split does not change the others."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


# ---------------------------------------------------------------- scenes

def _place(rng: np.random.Generator, radius: float, placed: list[Obj]) -> tuple[float, float]:
    """Rejection-sample a centre inside the frame that does not overlap placed objects much."""
    for _ in range(50):
        cx, cy = (float(v) for v in rng.uniform(radius, 1 - radius, size=2))
        if all(math.hypot(cx - o.cx, cy - o.cy) > 0.85 * (radius + o.radius) for o in placed):
            return cx, cy
    return cx, cy   # crowded frame: accept the overlap rather than loop forever


def sample_object(rng: np.random.Generator, placed: list[Obj], shape: str | None = None,
                  colour: str | None = None, sizes: tuple[str, ...] = SIZES) -> Obj:
    # One vectorised draw for the categorical attributes: numpy calls dominate scene sampling.
    i_shape, i_colour, i_size, i_tex = rng.integers(0, (len(SHAPES), len(COLOURS), len(sizes),
                                                        len(TEXTURES)))
    shape = shape or SHAPES[i_shape]
    colour = colour or COLOUR_NAMES[i_colour]
    size = sizes[i_size]
    radius = float(rng.uniform(*SIZE_RADIUS[size]))
    cx, cy = _place(rng, radius, placed)
    return Obj(shape, colour, size, TEXTURES[i_tex], cx, cy, radius)


def _clutter(rng: np.random.Generator) -> list:
    """0-3 tiny unmentioned specks: distractors the encoders must learn to ignore."""
    k = int(rng.integers(0, 4))
    xy, rgb = rng.uniform(0.03, 0.97, (k, 2)), rng.integers(0, 256, (k, 3))
    return [(float(x), float(y), tuple(int(v) for v in c)) for (x, y), c in zip(xy, rgb)]


def sample_scene(rng: np.random.Generator) -> Scene:
    u = rng.random()
    n = 1 if u < 0.15 else (2 if u < 0.75 else 3)      # 15% / 60% / 25%
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUNDS))]
    objects: list[Obj] = []
    for _ in range(n):
        objects.append(sample_object(rng, objects))
    return Scene(background, objects, _clutter(rng))


# ---------------------------------------------------------------- captions

def _caption_templates(scene: Scene) -> list[str]:
    """All paraphrases of a scene. Templates marked 'partial' drop attributes on purpose."""
    objs, bg = scene.objects, scene.background
    if len(objs) == 1:
        a = objs[0]
        return [f"a {a.phrase()} on a {bg} background",
                f"a photo of a {a.phrase()}",                                   # partial: no bg
                f"a single {a.phrase()} against {bg}",
                f"there is one {a.phrase()} in the picture, the background is {bg}",
                f"a {a.phrase(texture=False)} alone on {bg}"]                   # partial: no texture
    a, b = objs[0], objs[1]
    rel = scene.relation()
    third = f" and a {objs[2].phrase()}" if len(objs) == 3 else ""
    third_short = f", plus a {objs[2].shape}" if len(objs) == 3 else ""
    return [f"a {a.phrase()} {rel} a {b.phrase()}{third} on a {bg} background",
            f"a {b.phrase()} {RELATIONS[rel]} a {a.phrase()}{third}, {bg} background",
            f"a photo of a {a.phrase()} and a {b.phrase()}{third}; the {a.shape} is {rel} "
            f"the {b.shape}",                                                   # partial: no bg
            f"on a {bg} background there is a {a.phrase(False)} {rel} a {b.phrase(False)}"
            f"{third_short}",                                                   # partial
            f"{bg} scene: {a.phrase()} {rel} {b.phrase()}{third}"]


def captions(scene: Scene, rng: np.random.Generator, k: int) -> list[str]:
    """k distinct paraphrases in random order (k <= number of templates)."""
    templates = _caption_templates(scene)
    order = rng.permutation(len(templates))[:k]
    return [templates[i] for i in order]


# ---------------------------------------------------------------- rendering

def _shape_mask(draw: ImageDraw.ImageDraw, o: Obj, s: int) -> None:
    cx, cy, r = o.cx * s, o.cy * s, o.radius * s
    box = [cx - r, cy - r, cx + r, cy + r]
    if o.shape == "circle":
        draw.ellipse(box, fill=255)
    elif o.shape == "ring":
        draw.ellipse(box, fill=255)
        q = 0.5 * r
        draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    elif o.shape == "square":
        q = 0.85 * r
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.93 * r, cy + 0.7 * r), (cx - 0.93 * r, cy + 0.7 * r)],
                     fill=255)
    elif o.shape == "hexagon":
        ang = np.arange(6) * np.pi / 3
        draw.polygon([(cx + r * np.cos(t), cy + r * np.sin(t)) for t in ang], fill=255)
    elif o.shape == "star":
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + q * np.cos(t), cy + q * np.sin(t)) for t, q in zip(ang, rad)], fill=255)
    elif o.shape == "cross":
        w = 0.33 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")


@functools.lru_cache(maxsize=32)
def _texture_mask(texture: str, s: int) -> np.ndarray:
    """Where the object's colour is darkened (1) for the texture; 'plain' darkens nowhere."""
    yy, xx = np.mgrid[0:s, 0:s]
    period = max(4, s // 12)
    if texture == "striped":
        return ((xx + yy) // (period // 2)) % 2 == 0
    if texture == "dotted":
        return ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2 + 1
    if texture == "checkered":
        return ((xx // (period // 2)) + (yy // (period // 2))) % 2 == 0
    return np.zeros((s, s), bool)


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw at 2x and downsample (cheap anti-aliasing), jitter colours, add pixel noise."""
    s = 2 * size
    bg = np.array(BACKGROUNDS[scene.background], np.float32) + rng.normal(0, 8, 3)
    canvas = np.empty((s, s, 3), np.float32)
    canvas[:] = bg
    for o in scene.objects:
        mask_img = Image.new("L", (s, s), 0)
        _shape_mask(ImageDraw.Draw(mask_img), o, s)
        mask = np.asarray(mask_img) > 127
        # Per-object jitter: two reds are never the same pixel value, and red/orange get closer.
        rgb = np.array(COLOURS[o.colour], np.float32) + rng.normal(0, 12, 3)
        tex = _texture_mask(o.texture, s) & mask
        canvas[mask] = rgb
        canvas[tex] = rgb * 0.45 + 20   # darker copy of the colour: texture keeps the hue
    for (x, y, rgb) in scene.clutter:
        px, py, q = int(x * s), int(y * s), max(1, s // 40)
        canvas[max(0, py - q):py + q, max(0, px - q):px + q] = rgb
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize(
        (size, size), Image.BILINEAR)
    arr = np.asarray(img, np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- shard sets

def _write_shards(out_dir: Path, samples: Iterator[dict], per_shard: int) -> dict[str, int]:
    """Write samples to shard-000000.tar, ... and sizes.json with the project's one shard writer
    (fixed mtime and modes: the same seed gives byte-identical tars)."""
    from xbt_dist.data.shards import ShardWriter

    with ShardWriter(out_dir, prefix="shard", samples_per_shard=per_shard) as writer:
        for sample in samples:
            writer.write(sample)
    return dict(writer.sizes)


def _pair_samples(seed: int, split: str, n: int, image_size: int, k_captions: int) -> Iterator[dict]:
    rng = split_rng(seed, split)
    for i in range(n):
        scene = sample_scene(rng)
        caps = captions(scene, rng, k_captions)
        meta = scene.meta()
        if k_captions > 1:
            meta["captions"] = caps
        yield {"__key__": f"{split}{i:07d}", "jpg": jpeg_bytes(render(scene, rng, image_size)),
               "txt": caps[0], "json": json.dumps(meta).encode()}


def _text_samples(seed: int, n: int) -> Iterator[dict]:
    rng = split_rng(seed, "text")
    for i in range(n):
        yield {"__key__": f"text{i:07d}", "txt": captions(sample_scene(rng), rng, 1)[0]}


def zeroshot_classes() -> list[str]:
    """Class names: '<colour> <shape>' for every colour and shape (88 classes)."""
    return [f"{c} {s}" for s in SHAPES for c in COLOURS]


def _zeroshot_samples(seed: int, n: int, image_size: int) -> Iterator[dict]:
    rng = split_rng(seed, "zeroshot")
    classes = zeroshot_classes()
    for i in range(n):
        label = i % len(classes)   # balanced classes
        colour, shape = classes[label].split(" ")
        obj = sample_object(rng, [], shape=shape, colour=colour, sizes=("medium", "large"))
        scene = Scene(BACKGROUND_NAMES[rng.integers(len(BACKGROUNDS))], [obj], _clutter(rng))
        yield {"__key__": f"zeroshot{i:07d}", "jpg": jpeg_bytes(render(scene, rng, image_size)),
               "txt": f"a photo of a {classes[label]}.", "cls": str(label),
               "json": json.dumps(scene.meta()).encode()}


def write_split(out_dir: str | Path, split: str, n: int, seed: int, image_size: int = 64,
                per_shard: int = 2000, eval_captions: int = 5) -> dict:
    """Write one shard set (`train`, `text`, `eval`, `val` or `zeroshot`) with sizes.json and
    manifest.json; returns the manifest."""
    out_dir = Path(out_dir)
    kind = SPLIT_KINDS.get(split)
    if kind is None:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_KINDS)}")
    config = {"split": split, "n": n, "seed": seed, "image_size": image_size,
              "per_shard": per_shard, "eval_captions": eval_captions}
    if is_complete(out_dir, kind, config_digest(config)):
        return read_manifest(out_dir)     # same config already written: rerun is a no-op
    # A different config's shards (and its manifest) must not linger next to the new ones.
    for stale in [*out_dir.glob("*.tar"), out_dir / "manifest.json"]:
        stale.unlink(missing_ok=True)
    if split == "train":
        # Train samples carry all paraphrases in json too: base-CLIP training draws one per epoch.
        sizes = _write_shards(out_dir, _pair_samples(seed, "train", n, image_size, eval_captions),
                              per_shard)
    elif split in ("eval", "val"):
        # val: a gallery of its own (its own random stream, keys "val..."), disjoint from the test
        # gallery `eval`, so that defaults tuned on it say nothing optimistic about the test numbers.
        sizes = _write_shards(out_dir, _pair_samples(seed, split, n, image_size, eval_captions),
                              per_shard)
    elif split == "text":
        sizes = _write_shards(out_dir, _text_samples(seed, n), per_shard)
    elif split == "zeroshot":
        sizes = _write_shards(out_dir, _zeroshot_samples(seed, n, image_size), per_shard)
        atomic_write_text(out_dir / "classes.json", json.dumps(
            {"classes": zeroshot_classes(), "templates": list(ZEROSHOT_TEMPLATES)}, indent=1) + "\n")
    return write_manifest(out_dir, kind, config=config, inputs={"generator": "xbt_dist.toy.world"},
                          counts={"samples": sum(sizes.values()), "shards": len(sizes)})
