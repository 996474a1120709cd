"""xbt_dist.eval.stats: known answers for spreads, paired (cluster) bootstrap, flip rates, ranks."""

import math

import numpy as np
import pytest
import torch

from xbt_dist.eval import stats


def test_mean_std():
    assert stats.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert stats.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert stats.mean_std([None, float("nan")])["n"] == 0
    assert stats.fmt_mean_std([0.1, 0.3]) == "0.200 ± 0.141"


def test_flip_rates_known_counts():
    ref = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    new = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0], bool)
    f = stats.flip_rates(new, ref)
    assert f["lost"] == 1 / 4 and f["gained"] == 2 / 6
    assert (f["n_lost"], f["n_gained"], f["n_ref_right"], f["n_ref_wrong"]) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match="same queries"):
        stats.flip_rates(new[:3], ref)


def test_bootstrap_degenerate_cases_are_exact():
    z = np.zeros(50)
    same = stats.paired_bootstrap(z, z)
    assert (same["gain"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    allwin = stats.paired_bootstrap(np.ones(50), z)
    assert (allwin["gain"], allwin["lo"], allwin["hi"]) == (1.0, 1.0, 1.0)


def test_bootstrap_matches_the_normal_interval():
    """Independent queries: the percentile interval ~ gain +- 1.96 sd/sqrt(n) and covers the gain."""
    rng = np.random.default_rng(1)
    n = 4000
    ref = rng.random(n) < 0.5
    new = ref.copy()
    flip = rng.random(n) < 0.2                 # 20% of queries change; among them 60% improve
    new[flip] = rng.random(flip.sum()) < 0.6
    b = stats.paired_bootstrap(new, ref, n_boot=4000, seed=0)
    diff = new.astype(float) - ref.astype(float)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(n)
    assert b["gain"] == pytest.approx(diff.mean())
    assert b["lo"] < b["gain"] < b["hi"]
    assert (b["hi"] - b["lo"]) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_is_paired():
    """Both encoders are resampled together: a constant +1 gain on every 10th query has an
    interval far narrower than an unpaired comparison of two recalls near 0.5 would give."""
    rng = np.random.default_rng(2)
    ref = (rng.random(2000) < 0.5).astype(float)
    new = ref.copy()
    new[::10] = 1.0
    b = stats.paired_bootstrap(new, ref)
    assert b["lo"] > 0.03     # unpaired, the 95% half-width alone would be ~0.031


def test_cluster_bootstrap_widens_by_sqrt_group_size():
    """Five identical captions per image carry one image's information: resampling groups gives
    the same interval as the per-image data, ~sqrt(5) wider than treating captions as independent."""
    rng = np.random.default_rng(3)
    n_img = 1500
    ref_img = rng.random(n_img) < 0.5
    new_img = ref_img.copy()
    new_img[rng.random(n_img) < 0.3] = True
    ref, new = np.repeat(ref_img, 5), np.repeat(new_img, 5)
    groups = np.repeat(np.arange(n_img), 5)
    flat = stats.paired_bootstrap(new, ref, n_boot=3000)
    clus = stats.paired_bootstrap(new, ref, groups=groups, n_boot=3000)
    per_img = stats.paired_bootstrap(new_img, ref_img, n_boot=3000)
    w = lambda b: b["hi"] - b["lo"]
    assert clus["gain"] == flat["gain"] == per_img["gain"]
    assert clus["n_groups"] == n_img and clus["n_queries"] == 5 * n_img
    assert w(clus) == pytest.approx(w(per_img), rel=0.1)
    assert w(clus) / w(flat) == pytest.approx(math.sqrt(5), rel=0.15)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same queries"):
        stats.paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="one entry per query"):
        stats.paired_bootstrap(np.ones(3), np.ones(3), groups=[0, 1])
    with pytest.raises(ValueError, match="1-d"):
        stats.paired_bootstrap(np.ones((3, 2)), np.ones((3, 2)))


def test_per_query_ranks_and_compare():
    # 3 images, captions 0,1 -> image 0, 2 -> image 1, 3 -> image 2; gallery = identity-ish
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 0, 1.0]])
    c2i = [0, 0, 1, 2]
    r = stats.per_query_ranks({"image": img, "text": txt}, {"image": img, "text": txt}, c2i)
    assert r["t2i"].tolist() == [0, 2, 0, 0]   # caption 1 points at image 2; image 1 ties image 0 (counts against)
    assert r["i2t"].tolist() == [0, 0, 1]     # image 2: caption 1 ties its own caption 3
    ref = {"t2i": np.array([0, 1, 0, 0]), "i2t": np.array([0, 0, 0])}
    new = {"t2i": np.array([0, 0, 0, 3]), "i2t": np.array([0, 0, 0])}
    c = stats.compare(new, ref, c2i, ks=(1,), n_boot=200)
    t = c["t2i"]["R@1"]
    assert (t["new"], t["ref"], t["gain"]) == (0.75, 0.75, 0.0)
    assert t["flips"]["lost"] == 1 / 3 and t["flips"]["gained"] == 1.0
    assert t["n_groups"] == 3
    v = stats.interval_verdict(c, ks=(1,))
    assert v["pass"] is False and "t2i R@1" in v["cells"]
