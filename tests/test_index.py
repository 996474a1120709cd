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
    """Catches: a flat index that is not exact cosine search (gallery rows left unnormalised)."""
    x = _clustered()
    q = x[:50] + 0.05
    scale = np.random.default_rng(1).uniform(0.2, 5.0, size=(len(x), 1)).astype(np.float32)
    index, info = build_index(x * scale, "flat", IndexConfig())  # unnormalised rows: cosine inside
    _, rows = search(index, q, 10)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    want = np.argsort(-(qn @ x.T), axis=1, kind="stable")[:, :10]
    assert (rows == want).mean() > 0.99 and info["bytes"] >= x.nbytes


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_ann_indexes_find_most_exact_neighbours(kind, tmp_path):
    """Catches: the configured search parameters (nprobe, efSearch) not in force after build + save
    + load (FAISS defaults: nprobe=1, efSearch=16), or a broken ANN build."""
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
    from xbt_dist.index.evaluate import GalleryIndexes
    keys, rows = load_gallery(root / "gallery" / "old", "old")
    idx = GalleryIndexes(root)
    for view in ("old", "new", "xbt"):    # row i of every index is the embedding of keys.npy[i]
        gk, grows = load_gallery(root / "gallery" / view, view)
        for mod in ("image", "text"):
            by_key = {k: r / np.linalg.norm(r) for k, r in zip(gk.tolist(), grows[mod])}
            want = np.stack([by_key[k] for k in idx.keys(view).tolist()])
            np.testing.assert_allclose(idx.rows(view, mod), want, atol=1e-5)
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


def test_backfill_informed_order_beats_random_when_old_rows_are_bad():
    """Catches: a backfill ordering/merge that ignores which rows were re-embedded. Items whose old
    image and text rows disagree are exactly the ones whose old rows are noise; re-embedding them
    first must give a larger area under the curve than a random order."""
    from xbt_dist.index.backfill import auc, backfill_curves
    rng = np.random.default_rng(0)
    n, d = 200, 16
    truth = rng.normal(size=(n, d)).astype(np.float32)
    bad = np.zeros(n, bool)
    bad[rng.choice(n, 60, replace=False)] = True
    old = {"image": np.where(bad[:, None], rng.normal(size=(n, d)), truth),
           "text": np.where(bad[:, None], rng.normal(size=(n, d)), truth + 0.1 * rng.normal(size=(n, d)))}
    new = {"image": truth + 0.05 * rng.normal(size=(n, d)), "text": truth + 0.05 * rng.normal(size=(n, d))}
    keys = np.array([f"k{i}" for i in range(n)])
    q = truth + 0.2 * rng.normal(size=(n, d))
    queries = {"xbt": {"text": q, "image": q}, "new": {"text": q, "image": q},
               "caption_keys": list(keys), "image_keys": list(keys)}
    budgets = [0.0, 0.1, 0.2, 0.3, 0.5, 1.0]
    c = backfill_curves(queries, old, new, keys, budgets, (1,))
    r, o = c["random"]["t2i"], c["old_disagreement"]["t2i"]
    assert r[0]["R@1"] == o[0]["R@1"] and r[-1]["R@1"] == o[-1]["R@1"]  # same gallery at 0% and 100%
    assert o[3]["R@1"] > r[3]["R@1"] + 0.1          # at 30% the informed order re-embedded the bad rows
    assert c["old_disagreement"]["auc"]["t2i R@1"] > c["random"]["auc"]["t2i R@1"]
    assert auc([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)


def test_backfill_zscore_merge_survives_a_new_space_on_another_scale():
    """Catches: merging raw cosines of two spaces. The new model here shares one direction across
    all its embeddings (every new-space cosine is high), so under a raw merge the re-embedded
    non-matches outrank old-space positives and half a backfill is worse than none; the per-query
    z-score merge keeps the mixed gallery between its two ends, which both merges share."""
    from xbt_dist.index.backfill import backfill_curves
    rng = np.random.default_rng(1)
    n, d = 300, 16
    truth = rng.normal(size=(n, d))
    common = 6.0 * np.ones(d) / np.sqrt(d)
    old = {"image": truth + 0.6 * rng.normal(size=(n, d)), "text": truth + 0.6 * rng.normal(size=(n, d))}
    new = {m: truth + 0.2 * rng.normal(size=(n, d)) + common for m in ("image", "text")}
    keys = np.array([f"k{i}" for i in range(n)])
    q_old, q_new = truth + 0.6 * rng.normal(size=(n, d)), truth + 0.3 * rng.normal(size=(n, d)) + common
    queries = {"xbt": {"text": q_old, "image": q_old}, "new": {"text": q_new, "image": q_new},
               "caption_keys": list(keys), "image_keys": list(keys)}
    budgets = [0.0, 0.5, 1.0]
    raw = backfill_curves(queries, old, new, keys, budgets, (1,), policies=("random",), merge="raw")
    z = backfill_curves(queries, old, new, keys, budgets, (1,), policies=("random",), merge="zscore")
    for d in ("t2i", "i2t"):
        r, c = [p["R@1"] for p in raw["random"][d]], [p["R@1"] for p in z["random"][d]]
        assert r[0] == c[0] and r[-1] == c[-1]                 # same ends: one space each
        assert r[1] < min(r[0], r[-1]) - 0.1                  # raw: half a backfill is worse than none
        assert c[1] >= min(c[0], c[-1]) - 0.02 and c[1] > r[1] + 0.1
    with pytest.raises(ValueError, match="unknown backfill merge"):
        backfill_curves(queries, old, new, keys, budgets, (1,), merge="rank")


def test_backfill_plan_cli_endpoints_match_index_eval(run, tmp_path):
    """Catches: a mixed gallery whose 0% / 100% ends are not xbt/old and new/new."""
    from xbt_dist.cli import main
    from xbt_dist.config import dump_config
    root = Path(run.stage_dir("index"))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(run))
    if not (root / "index_eval.json").is_file():
        assert main(["index", "build", "--config", str(cfg_path)]) == 0
        assert main(["index", "eval", "--config", str(cfg_path)]) == 0
    ev = json.loads((root / "index_eval.json").read_text())["cases"]
    assert main(["backfill", "plan", "--config", str(cfg_path), "--gallery-items", "1000000"]) == 0
    out = Path(run.out_dir) / "backfill"
    res = json.loads((out / "backfill.json").read_text())
    for d in ("t2i", "i2t"):
        curve = res["policies"]["random"][d]
        assert curve[0]["R@5"] == pytest.approx(ev["xbt/old"]["flat"][d]["R@5"])
        assert curve[-1]["R@5"] == pytest.approx(ev["new/new"]["flat"][d]["R@5"])
    assert res["cost"][-1]["items"] == 1_000_000 and res["cost"][-1]["device_hours"] > 0
    assert (out / "backfill.png").stat().st_size > 0 and "AUC" in (out / "backfill.md").read_text()


def test_cutover_gate_and_wilson():
    """Catches: a gate that says go with a failed check or a missing step."""
    from xbt_dist.index.card import cutover_gate, wilson
    ok = {"exact": {"verdict": {"compatible": True}, "on_off": {"equal": True}},
          "index": {"verdict": {"hnsw": {"compatible": True}}, "matches_run": True}}
    assert cutover_gate(ok, "hnsw", [])["decision"] == "go"
    assert cutover_gate(ok, "hnsw", ["xbt backfill plan"])["decision"] == "no-go"
    assert cutover_gate(ok, "ivfpq", [])["reasons"] == ["verdict on the served ivfpq index not compatible (or not evaluated)"]
    bad = {**ok, "exact": {"verdict": {"compatible": True}, "on_off": {"equal": False}}}
    assert cutover_gate(bad, "hnsw", [])["reasons"] == ["adapters off does not reproduce the untouched new model"]
    bad = {**ok, "index": {**ok["index"], "matches_run": False}}
    assert cutover_gate(bad, "hnsw", [])["decision"] == "no-go"
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_card_cli_collects_the_run(run, tmp_path):
    """Catches: a card whose identities or numbers are not the run's own."""
    from xbt_dist.cli import main
    from xbt_dist.config import dump_config
    from xbt_dist.eval.evaluate import run_eval
    from xbt_dist.index.identity import file_sha256
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(run))
    root = Path(run.stage_dir("index"))
    if not (root / "index_eval.json").is_file():
        assert main(["index", "build", "--config", str(cfg_path)]) == 0
        assert main(["index", "eval", "--config", str(cfg_path)]) == 0
    run_eval(run)
    assert main(["card", "--config", str(cfg_path)]) == 0
    card = json.loads((Path(run.out_dir) / "card" / "card.json").read_text())
    ids = card["identities"]
    assert ids["old"]["sha256"] == file_sha256(run.old.pretrained) == card["index"]["old_model"]["sha256"]
    assert ids["adapters_sha256"] == file_sha256(Path(run.stage_dir("train")) / "adapters.pt")
    ev = json.loads((Path(run.stage_dir("eval")) / "eval.json").read_text())["compat"]
    r = card["exact"]["cases"]["xbt/old"]["t2i"]["R@1"]
    assert r["value"] == ev["cases"]["xbt/old"]["t2i"]["R@1"] and r["ci95"][0] <= r["value"] <= r["ci95"][1]
    assert card["exact"]["on_off"]["equal"] is True and card["index"]["matches_run"] is True
    gate = card["cutover"]
    assert (gate["decision"] == "go") == (not gate["reasons"] and not gate["missing_steps"])
    assert "Rollback" in (Path(run.out_dir) / "card" / "card.md").read_text()
