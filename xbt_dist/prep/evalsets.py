"""Eval shard sets: multi-caption retrieval sets and zero-shot class sets.

Retrieval: COCO and Flickr30k in the Karpathy-split JSON layout (`dataset_coco.json`,
`dataset_flickr30k.json`: images[] with filename, optional filepath, split, sentences[].raw) and
nocaps (images[] with id/file_name, annotations[] with image_id/caption). One sample per image:
the image bytes as stored (`jpg`/`png`/`webp`; other formats re-encoded to JPEG), `txt` = first
caption, `json["captions"]` = all captions, so retrieval eval can count a hit on any of an image's
captions (text->image) and score each caption as its own query. Missing image files are skipped,
counted and listed in the manifest, never fatal: public mirrors of these sets often lack a few.

Zero-shot: an image folder with one subdirectory per class (or a CSV mapping `path,class`), plus
class names and prompt templates -> samples with image + `cls` (class index as text) and
`classes.json` = {"classes": [...], "templates": [...]}.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from xbt_dist.artifacts import atomic_write_text, write_manifest
from xbt_dist.data.shards import ShardWriter

RETRIEVAL_FORMATS = ("coco", "flickr30k", "nocaps")
# the CLIP paper's short ensemble subset; pass --templates for the full 80 ImageNet prompts
DEFAULT_TEMPLATES = ["a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a cropped photo of a {}.", "itap of a {}.",
                     "art of the {}."]
_STORED_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _image_field(path: Path) -> tuple[str, bytes]:
    """(field, bytes): stored formats are copied byte for byte; others re-encoded as JPEG."""
    ext = _STORED_EXTS.get(path.suffix.lower())
    if ext:
        return ext, path.read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return "jpg", buf.getvalue()


def _safe_key(text: str) -> str:
    # keys may not contain '.' or '/' (webdataset splits at the first dot of the basename)
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def karpathy_records(ann: dict, split: str | None) -> Iterator[tuple[str, str, list[str], dict]]:
    """(key, relative image path, captions, meta) from a Karpathy-split JSON (COCO/Flickr30k)."""
    if "images" not in ann:
        raise ValueError("not a Karpathy-split JSON: no 'images' list (expected dataset_coco.json / "
                         "dataset_flickr30k.json from the Karpathy splits)")
    for i, img in enumerate(ann["images"]):
        s = img.get("split")
        # Karpathy's "restval" images are train images (the 5k val/test are held out)
        if split is not None and s != split and not (split == "train" and s == "restval"):
            continue
        rel = str(Path(img.get("filepath", "")) / img["filename"])
        caps = [s_["raw"].strip() for s_ in img.get("sentences", []) if s_.get("raw", "").strip()]
        ident = img.get("cocoid", img.get("imgid", i))
        meta = {"filename": img["filename"], "split": s, "image_id": ident}
        yield _safe_key(f"{ident}"), rel, caps, meta


def nocaps_records(ann: dict) -> Iterator[tuple[str, str, list[str], dict]]:
    """(key, relative image path, captions, meta) from nocaps' COCO-style JSON."""
    if "images" not in ann or "annotations" not in ann:
        raise ValueError("not a nocaps JSON: expected 'images' and 'annotations' lists "
                         "(nocaps_val_4500_captions.json)")
    caps: dict = defaultdict(list)
    for a in ann["annotations"]:
        if str(a.get("caption", "")).strip():
            caps[a["image_id"]].append(a["caption"].strip())
    for img in ann["images"]:
        meta = {"filename": img["file_name"], "image_id": img["id"]}
        if "domain" in img:
            meta["domain"] = img["domain"]  # in-domain / near-domain / out-domain
        yield _safe_key(str(img["id"])), img["file_name"], caps.get(img["id"], []), meta


def build_retrieval_set(annotations: str | os.PathLike, image_root: str | os.PathLike,
                        out_dir: str | os.PathLike, fmt: str = "coco", split: str | None = "test",
                        samples_per_shard: int = 1000) -> dict:
    """Convert a COCO/Flickr30k (Karpathy) or nocaps annotation JSON into eval shards."""
    if fmt not in RETRIEVAL_FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {RETRIEVAL_FORMATS}")
    ann = json.loads(Path(annotations).read_text())
    records = nocaps_records(ann) if fmt == "nocaps" else karpathy_records(ann, split)
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory; pass --image-root DIR holding "
                                "the images named in the annotation file")
    counts = {"images": 0, "captions": 0, "missing_images": 0, "no_captions": 0}
    missing: list[str] = []
    with ShardWriter(out_dir, prefix=fmt, samples_per_shard=samples_per_shard) as w:
        for key, rel, caps, meta in records:
            if not caps:
                counts["no_captions"] += 1
                continue
            path = root / rel
            if not path.is_file() and (root / Path(rel).name).is_file():
                path = root / Path(rel).name  # flat folder without the COCO split subfolders
            if not path.is_file():
                counts["missing_images"] += 1
                missing.append(rel)
                continue
            field, data = _image_field(path)
            w.write({"__key__": key, field: data, "txt": caps[0], "json": {**meta, "captions": caps}})
            counts["images"] += 1
            counts["captions"] += len(caps)
    if counts["images"] == 0:
        raise RuntimeError(f"no eval samples written from {annotations}: {counts}; check --image-root "
                           f"and --split (first missing: {missing[:3]})")
    if missing:
        print(f"[prep evalset] {len(missing)} image files missing under {root}, e.g. {missing[:3]}")
    write_manifest(out_dir, "eval_shards", config={"format": fmt, "split": split,
                                                   "samples_per_shard": samples_per_shard},
                   inputs={"annotations": str(annotations), "image_root": str(root)},
                   counts={**counts, "per_shard": w.sizes}, missing_images=missing[:10000])
    return counts


def _read_list(path: str | os.PathLike) -> list[str]:
    """A JSON list, or one item per non-empty line."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [str(x) for x in json.loads(text)]
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _folder_items(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise ValueError(f"{root} has no class subdirectories; use one folder per class or pass "
                         "--mapping CSV with path,class columns")
    items = [(p, ci) for ci, d in enumerate(dirs) for p in sorted(d.rglob("*"))
             if p.suffix.lower() in _IMAGE_SUFFIXES]
    return [d.name for d in dirs], items


def _mapping_items(root: Path, mapping: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    with open(mapping, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][:2] == ["path", "class"]:
        rows = rows[1:]
    labels = sorted({r[1] for r in rows}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else c))
    if all(c.isdigit() for c in labels):  # already indices
        n = int(labels[-1]) + 1 if labels else 0
        return [str(i) for i in range(n)], [(root / r[0], int(r[1])) for r in rows]
    index = {c: i for i, c in enumerate(labels)}
    return labels, [(root / r[0], index[r[1]]) for r in rows]


def build_zeroshot_set(image_root: str | os.PathLike, out_dir: str | os.PathLike,
                       class_names: str | os.PathLike | None = None,
                       templates: str | os.PathLike | Iterable[str] | None = None,
                       mapping: str | os.PathLike | None = None, samples_per_shard: int = 1000) -> dict:
    """Image folder (class subdirs, or `mapping` CSV) -> zero-shot shards + classes.json.

    `class_names` (file, one per line or JSON list, in class-index order) replaces folder names
    such as WordNet ids with readable names used in the prompts."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory")
    classes, items = _mapping_items(root, Path(mapping)) if mapping else _folder_items(root)
    if class_names is not None:
        names = _read_list(class_names)
        if len(names) != len(classes):
            raise ValueError(f"{class_names} has {len(names)} class names but the images define "
                             f"{len(classes)} classes ({classes[:5]}...); give one name per class, in order")
        classes = names
    if templates is None:
        tmpl = list(DEFAULT_TEMPLATES)
    elif isinstance(templates, (str, os.PathLike)):
        tmpl = _read_list(templates)
    else:
        tmpl = list(templates)
    bad = [t for t in tmpl if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' where the class name goes; bad: {bad}")
    counts = {"images": 0, "missing_images": 0, "classes": len(classes)}
    per_class = [0] * len(classes)
    with ShardWriter(out_dir, prefix="zeroshot", samples_per_shard=samples_per_shard) as w:
        for i, (path, ci) in enumerate(items):
            if not path.is_file():
                counts["missing_images"] += 1
                continue
            field, data = _image_field(path)
            w.write({"__key__": f"{i:08d}", field: data, "cls": ci,
                     "json": {"class_name": classes[ci], "filename": str(path.relative_to(root))}})
            counts["images"] += 1
            per_class[ci] += 1
    atomic_write_text(Path(out_dir) / "classes.json",
                      json.dumps({"classes": classes, "templates": tmpl}, indent=1) + "\n")
    write_manifest(out_dir, "zeroshot_shards", config={"samples_per_shard": samples_per_shard,
                                                       "templates": tmpl},
                   inputs={"image_root": str(root), "mapping": str(mapping) if mapping else None,
                           "class_names": str(class_names) if class_names else None},
                   counts={**counts, "per_class": per_class, "per_shard": w.sizes})
    return counts
