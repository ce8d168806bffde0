"""The basic filter, exact de-duplication and near-duplicate search, on hand-built tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from unclip import drops
from unclip.config import BasicFilterConfig
from unclip.data import filters


def _status(rows: list[tuple]) -> pa.Table:
    keys = ["key", "uid", "url", "caption", "original_width", "original_height", "sha256"]
    return pa.table({k: [r[i] for r in rows] for i, k in enumerate(keys)})


def _row(i: int, w=100, h=100, caption="a red circle", sha=None):
    return (f"{i:05d}", f"s/f/{i:010d}", f"http://h/{i}.jpg", caption, w, h, sha or f"{i:064x}")


CFG = BasicFilterConfig(min_side=32, max_aspect_ratio=3.0, min_caption_chars=3, max_caption_chars=40, dedup_buckets=4)


def test_each_check_gives_its_reason_and_keeps_the_rest():
    rows = [
        _row(0),
        _row(1, w=20, h=20),  # min_side
        _row(2, w=200, h=40),  # aspect 5
        _row(3, caption="   "),  # empty after stripping
        _row(4, caption=None),  # missing caption counts as empty
        _row(5, caption="ab"),  # shorter than min_caption_chars
        _row(6, caption="x" * 41),  # longer than max_caption_chars
        _row(7, w=20, h=200, caption=""),  # fails three checks: the first in order (min_side) is recorded
        _row(8, w=96, h=32),  # exactly at the limits: kept
    ]
    cand, drop = filters.basic_checks(_status(rows), CFG, source="s", source_rank=0, shard="shards/s/p/00000")
    assert cand.column("key").to_pylist() == ["00000", "00008"]
    got = dict(zip(drop.column("uid").to_pylist(), drop.column("reason").to_pylist()))
    assert got == {
        "s/f/0000000001": drops.MIN_SIDE,
        "s/f/0000000002": drops.ASPECT_RATIO,
        "s/f/0000000003": drops.CAPTION_EMPTY,
        "s/f/0000000004": drops.CAPTION_EMPTY,
        "s/f/0000000005": drops.CAPTION_TOO_SHORT,
        "s/f/0000000006": drops.CAPTION_TOO_LONG,
        "s/f/0000000007": drops.MIN_SIDE,
    }
    assert set(drop.column("stage").to_pylist()) == {"basic_filter"}
    assert cand.num_rows + drop.num_rows == len(rows)
    assert all(0 <= b < CFG.dedup_buckets for b in cand.column("bucket").to_pylist())


def test_hash_buckets_are_stable_and_spread():
    shas = pa.array([f"{i * 2654435761 % 2**32:08x}" + "0" * 56 for i in range(4000)])
    b = filters.hash_bucket(shas, 16).to_numpy()
    assert np.array_equal(b, filters.hash_bucket(shas, 16).to_numpy())
    counts = np.bincount(b, minlength=16)
    assert counts.min() > 150  # roughly uniform: 250 expected per bucket


def _cands(entries):
    return pa.table({
        "uid": [e[0] for e in entries], "url": [f"http://h/{e[0]}" for e in entries],
        "source": [e[0].split("/")[0] for e in entries], "source_rank": pa.array([e[1] for e in entries], pa.int32()),
        "shard": [f"shards/{e[0]}" for e in entries], "sha256": [e[2] for e in entries],
    })


def test_exact_duplicates_keep_the_first_by_source_rank_then_uid():
    t = _cands([
        ("dalle/f/0000000001", 1, "aa"),
        ("clip/f/0000000009", 0, "aa"),  # earlier source: this copy is kept
        ("dalle/f/0000000000", 1, "aa"),
        ("clip/f/0000000002", 0, "bb"),
        ("clip/f/0000000001", 0, "bb"),  # smaller uid within the source: kept
        ("clip/f/0000000003", 0, "cc"),  # unique
    ])
    d = filters.exact_duplicates(t)
    got = {u: det for u, det in zip(d.column("uid").to_pylist(), d.column("detail").to_pylist())}
    assert got == {
        "dalle/f/0000000000": "same bytes as clip/f/0000000009",
        "dalle/f/0000000001": "same bytes as clip/f/0000000009",
        "clip/f/0000000002": "same bytes as clip/f/0000000001",
    }
    assert set(d.column("reason").to_pylist()) == {drops.DUPLICATE_EXACT}
    assert d.column("shard").to_pylist()[0].startswith("shards/")
    # the answer does not depend on the order rows arrive in
    perm = np.random.default_rng(0).permutation(t.num_rows)
    d2 = filters.exact_duplicates(t.take(pa.array(perm)))
    assert sorted(d2.column("uid").to_pylist()) == sorted(got)


def _unit(x):
    x = np.atleast_2d(x)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk", [3, 2048])
def test_near_duplicates_greedy_keep_first(chunk):
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(6, 64)))
    a_twin = _unit(base[0] + 0.01 * rng.normal(size=64))
    c_twin = _unit(base[2] + 0.01 * rng.normal(size=64))
    emb = np.vstack([base[:3], a_twin, base[3:], c_twin, a_twin]).astype(np.float32)
    is_dup, match, sim = filters.near_duplicates(emb, threshold=0.99, chunk=chunk)
    assert np.flatnonzero(is_dup).tolist() == [3, 7, 8]
    assert match[3] == 0 and match[7] == 2 and match[8] == 0  # matched to the KEPT earlier row
    assert (sim[is_dup] >= 0.99).all()
    assert not is_dup[:3].any()


def test_near_duplicates_threshold_is_inclusive_of_exact_copies_only_at_one():
    x = _unit(np.random.default_rng(1).normal(size=(50, 32))).astype(np.float32)
    is_dup, _, _ = filters.near_duplicates(np.vstack([x, x[:5]]), threshold=1.0 - 1e-5)
    assert np.flatnonzero(is_dup).tolist() == [50, 51, 52, 53, 54]


def test_clip_score_threshold():
    t = pa.table({"clip_score": pa.array([0.1, 0.3, 0.25, -0.2], pa.float32())})
    assert filters.clip_score_drops(t, 0.25).tolist() == [True, False, False, True]
    assert not filters.clip_score_drops(t, None).any()
