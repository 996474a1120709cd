"""Old-gallery FAISS indexes: real faiss-cpu indexes, real tiny open_clip models, `xbt index` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xbt_dist.config import ConfigError, IndexConfig, load_config
from xbt_dist.index.evaluate import ranks_of_positives
from xbt_dist.index.faiss_index import build_index, effective_params, load_index, save_index, search

from upgrade_run import other_old_checkpoint, train_tiny_run


def _clustered(n=3000, d=32, centers=30, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_is_exact_inner_product():
    """Catches: a flat index that is not exact cosine search (wrong metric, unnormalised rows)."""
    x = _clustered()
    q = x[:50] + 0.05
    index, info = build_index(x * 3.0, "flat", IndexConfig())  # scaled rows: normalised inside
    _, rows = search(index, q, 10)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    want = np.argsort(-(qn @ x.T), axis=1, kind="stable")[:, :10]
    assert (rows == want).mean() > 0.99 and info["bytes"] >= x.nbytes


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_ann_indexes_find_most_exact_neighbours(kind, tmp_path):
    """Catches: search parameters (nprobe, efSearch) lost on save/load, or a broken ANN build."""
    x = _clustered()
    cfg = IndexConfig(nprobe=8, hnsw_ef_search=64)
    index, info = build_index(x, kind, cfg)
    save_index(index, tmp_path / "i.faiss")
    again = load_index(tmp_path / "i.faiss", kind, info["params"])
    q = x[:200]
    exact, _ = build_index(x, "flat", cfg)
    _, truth = search(exact, q, 10)
    _, rows = search(again, q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    assert overlap > (0.9 if kind == "hnsw" else 0.3)
    if kind == "ivfpq":
        import faiss
        assert faiss.extract_index_ivf(again).nprobe == 8
        assert info["bytes"] < x.nbytes / 4   # 8 B codes instead of 128 B rows
    else:
        assert again.hnsw.efSearch == 64


def test_effective_params_shrink_for_small_galleries():
    """Catches: IVF-PQ asked to train more lists/codes than a small gallery has points."""
    p = effective_params("ivfpq", 12, 24, IndexConfig(pq_m=5, pq_bits=8))
    assert p["nlist"] == 1 and p["nbits"] == 3 and 24 % p["m"] == 0 and len(p["notes"]) == 3
    p = effective_params("ivfpq", 1_000_000, 512, IndexConfig())
    assert (p["nlist"], p["m"], p["nbits"], p["notes"]) == (4000, 8, 8, [])


def test_missing_positive_is_a_miss_at_every_k():
    """Catches: a query whose positive is not returned counted as a hit when K > list length."""
    rows = np.array([[3, 1], [0, 2]])
    ranks = ranks_of_positives(rows, np.array([1, 5]))
    assert ranks[0] == 1 and (ranks[1] >= 50)


def test_index_config_validated():
    with pytest.raises(ConfigError, match="index.types"):
        load_config(None, ["index.types=[flat, annoy]"])
    with pytest.raises(ConfigError, match="index.views"):
        load_config(None, ["index.views=[new]"])
    with pytest.raises(ConfigError, match="serve.index_type"):
        load_config(None, ["serve.index_type=lsh"])


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    return train_tiny_run(tiny, tmp_path_factory.mktemp("index_run"))


def test_index_build_and_eval_cli(run, tmp_path):
    """End to end through `xbt index build/eval`: six cases on flat, IVF-PQ and HNSW; flat R@K is
    the exact recall over the same gallery (catches: row/key misalignment between index and keys)."""
    from xbt_dist.cli import main
    from xbt_dist.config import dump_config
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(run))
    assert main(["index", "build", "--config", str(cfg_path)]) == 0
    root = Path(run.stage_dir("index"))
    m = json.loads((root / "manifest.json").read_text())
    assert m["kind"] == "index" and m["old_model"]["sha256"]
    assert set(m["indexes"]) == {f"{v}/{mod}.{t}" for v in ("old", "new", "xbt")
                                 for mod in ("image", "text") for t in ("flat", "ivfpq", "hnsw")}
    assert m["indexes"]["old/image.ivfpq"]["params"]["notes"]  # 12 items: parameters lowered, recorded
    assert main(["index", "eval", "--config", str(cfg_path)]) == 0
    res = json.loads((root / "index_eval.json").read_text())
    assert set(res["cases"]) == {"old/old", "new/old", "phi/old", "xbt/old", "new/new", "xbt/xbt"}
    for case in res["cases"].values():
        assert set(case) == {"flat", "ivfpq", "hnsw"}
        assert case["flat"]["t2i"]["ann_recall@10"] == pytest.approx(1.0)
    assert "note" in res["cases"]["new/old"]["flat"]["t2i"]  # 24-d new queries truncated to 16
    assert "| xbt/old | hnsw |" in (root / "index_eval.md").read_text()

    # flat R@K against a brute-force recall over the gallery set's own rows and keys
    from xbt_dist.index.build import load_gallery
    from xbt_dist.index.encoders import QueryEncoder
    from xbt_dist.index.evaluate import load_queries
    keys, rows = load_gallery(root / "gallery" / "old", "old")
    qs = load_queries(run.eval.eval_shards)
    q = QueryEncoder(run, views=("xbt",)).texts("xbt", qs["captions"])
    scores = q @ (rows["image"] / np.linalg.norm(rows["image"], axis=1, keepdims=True)).T
    pos = np.array([list(keys).index(k) for k in qs["caption_keys"]])
    rank = (scores > scores[np.arange(len(pos)), pos][:, None]).sum(1)
    for k in (1, 5):
        assert res["cases"]["xbt/old"]["flat"]["t2i"][f"R@{k}"] == pytest.approx((rank < k).mean(), abs=1e-9)


def test_old_embeddings_of_another_old_model_refused(run, tiny, tmp_path):
    """Catches: indexing a gallery embedded by another old model than the run's (wrong space)."""
    import copy

    from xbt_dist.data.embed import embed_shards
    from xbt_dist.config import ModelRef
    from xbt_dist.index.build import build_indexes
    other = ModelRef(tiny["old_arch"], other_old_checkpoint(tiny, tmp_path), tiny["models_dir"])
    emb = tmp_path / "other_old_gallery"
    embed_shards(run.eval.eval_shards, emb, {"old": other}, ["image_old", "text_old"], 16, progress=None)
    cfg = copy.deepcopy(run)
    cfg.index.old_embeddings, cfg.index.dir = str(emb), str(tmp_path / "idx")
    cfg.index.views, cfg.index.types = ("old",), ("flat",)
    with pytest.raises(ValueError, match="made by .* but the run's old model is"):
        build_indexes(cfg)
