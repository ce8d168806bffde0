"""The AR prior's PCA and bucket quantiser (unclip.data.pca): agreement with scikit-learn, the
quantiser's round-trip guarantees, the one-pass fit and its quality against an exact in-memory
reference, the artifact and the Parquet sampler."""

from __future__ import annotations

import dataclasses
import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.decomposition import PCA

from unclip.data.embeddings import iter_embedding_batches
from unclip.data.pca import (
    CAST_BLOCK_BYTES,
    BucketQuantiser,
    PcaQuantiser,
    StreamingPCA,
    _cast_float32,
    _project,
    _project_sample,
    _Reservoir,
    _row_dots,
    explained_variance_plot_png,
    fit_pca_quantiser,
)
from unclip.data.prefetch import prefetch


def _decaying_data(n: int, d: int, *, offset: float, seed: int = 0) -> np.ndarray:
    """Rows with a power-law spectrum in a random basis and a non-zero mean."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = (np.arange(1, d + 1) ** -0.75).astype(np.float64)
    mean = offset * rng.uniform(0.5, 1.5, size=d)
    return ((rng.standard_normal((n, d)) * scales) @ basis.T + mean).astype(np.float32)


def _feed(pca: StreamingPCA, x: np.ndarray, cuts: list[int]) -> StreamingPCA:
    for a, b in zip([0, *cuts], [*cuts, len(x)]):
        pca.partial_fit(x[a:b])
    return pca


@pytest.fixture(scope="module")
def data_and_sklearn() -> tuple[np.ndarray, PCA]:
    x = _decaying_data(5000, 256, offset=3.0)
    return x, PCA(n_components=64, svd_solver="full").fit(x)


def _abs_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def test_streaming_pca_matches_sklearn(data_and_sklearn: tuple[np.ndarray, PCA]) -> None:
    x, sk = data_and_sklearn
    # Uneven batches and a chunk size that splits them: the sums must not depend on the batching.
    ours = _feed(StreamingPCA(chunk_rows=700), x, [1, 8, 1008, 4000]).finalize(64)
    assert ours.n_rows_ == 5000
    assert ours.components_.shape == (64, 256) and ours.components_.dtype == np.float32
    np.testing.assert_allclose(ours.explained_variance_ratio_, sk.explained_variance_ratio_, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.explained_variance_, sk.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.mean_, sk.mean_, rtol=1e-5)
    # The eigenvalues of the first 16 are well separated (power law), so their vectors are unique.
    assert _abs_cosines(ours.components_[:16], sk.components_[:16]).min() > 0.9999
    assert ours.spectrum_.shape == (256,) and np.all(np.diff(ours.spectrum_) <= 0)
    assert ours.total_variance_ == pytest.approx(float(x.astype(np.float64).var(axis=0, ddof=1).sum()), rel=1e-5)
    # Same sign convention as scikit-learn's svd_flip: the largest-|value| entry is positive.
    rows = np.arange(64)
    assert np.all(ours.components_[rows, np.abs(ours.components_).argmax(axis=1)] > 0)

    signs = np.sign(np.sum(ours.components_[:16] * sk.components_[:16], axis=1))
    np.testing.assert_allclose(ours.transform(x)[:, :16] * signs, sk.transform(x)[:, :16], atol=1e-3)
    # The projection onto the kept subspace does not depend on signs or near-equal eigenvalues.
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(x)), sk.inverse_transform(sk.transform(x)), atol=1e-3)


def test_streaming_pca_large_offset_keeps_precision() -> None:
    # Mean 30x the largest spread: without the shift, a float32 scatter X^T X loses the covariance.
    x = _decaying_data(4000, 64, offset=30.0, seed=1)
    sk = PCA(n_components=16, svd_solver="full").fit(x)
    ours = _feed(StreamingPCA(chunk_rows=1024), x, [2000]).finalize(16)
    np.testing.assert_allclose(ours.explained_variance_, sk.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_ratio_, sk.explained_variance_ratio_, atol=1e-5, rtol=0)


def test_streaming_pca_float16_batches() -> None:
    x16 = _decaying_data(3000, 128, offset=0.5, seed=2).astype(np.float16)
    sk = PCA(n_components=32, svd_solver="full").fit(x16.astype(np.float32))
    ours = _feed(StreamingPCA(chunk_rows=512), x16, [1500]).finalize(32)
    np.testing.assert_allclose(ours.explained_variance_ratio_, sk.explained_variance_ratio_, atol=1e-4, rtol=0)
    assert ours.transform(x16).dtype == np.float32
    assert _abs_cosines(ours.components_[:8], sk.components_[:8]).min() > 0.9999


def test_streaming_pca_float64_gemm_matches_float32() -> None:
    x = _decaying_data(2000, 64, offset=1.0, seed=3)
    a = StreamingPCA(gemm_dtype=np.float32).partial_fit(x).finalize(8)
    b = StreamingPCA(gemm_dtype=np.float64).partial_fit(x).finalize(8)
    np.testing.assert_allclose(a.explained_variance_, b.explained_variance_, rtol=1e-5)


def test_cast_float32_is_numpys_cast_bit_for_bit() -> None:
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # zeros, subnormals, inf and NaN included
    finite = every[np.isfinite(every)]
    rows = np.resize(finite, (640, 1000))  # several blocks of finite values only: the fast path
    assert rows.shape[0] * rows.shape[1] * 4 > 2 * CAST_BLOCK_BYTES
    for src in (rows, every.reshape(64, 1024), finite[:10, None], every.reshape(64, 1024)[:, ::2]):
        got = _cast_float32(src, np.empty(src.shape, np.float32))
        np.testing.assert_array_equal(got.view(np.uint32), src.astype(np.float32).view(np.uint32))
    minus = np.linspace(-1, 1, 1000, dtype=np.float32)
    got = _cast_float32(rows, np.empty(rows.shape, np.float32), minus=minus)
    np.testing.assert_array_equal(got, np.subtract(rows, minus, dtype=np.float32))
    x32 = np.random.default_rng(0).standard_normal((5, 1000)).astype(np.float32)
    np.testing.assert_array_equal(_cast_float32(x32, np.empty_like(x32), minus=minus), x32 - minus)


def test_streaming_pca_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        StreamingPCA().partial_fit(np.zeros((1, 4), np.float32)).finalize(2)
    with pytest.raises(ValueError, match="columns"):
        StreamingPCA().partial_fit(np.zeros((3, 4), np.float32)).partial_fit(np.zeros((3, 5), np.float32))


# --------------------------------------------------------------------------------------- quantiser


def test_quantiser_known_values_1d() -> None:
    q = BucketQuantiser.fit(np.arange(8, dtype=np.float32), 4)
    # Linear quantiles of 0..7 at 1/4, 1/2, 3/4 and the bucket medians at 1/8, 3/8, 5/8, 7/8.
    np.testing.assert_allclose(q.edges, [[1.75, 3.5, 5.25]])
    np.testing.assert_allclose(q.values, [[0.875, 2.625, 4.375, 6.125]])
    codes = q.encode(np.array([-5.0, 0.0, 1.75, 3.49, 3.5, 7.0, 100.0]))
    assert codes.dtype == np.int16
    assert codes.tolist() == [0, 0, 1, 1, 2, 3, 3]
    np.testing.assert_allclose(q.decode(np.array([3, 0])), [6.125, 0.875])


def test_quantiser_round_trip_and_equal_occupancy() -> None:
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((16000, 5)).astype(np.float32) * np.array([1, 2, 0.1, 5, 1e-3], np.float32)
    q = BucketQuantiser.fit(sample, 16)
    assert q.edges.shape == (5, 15) and q.values.shape == (5, 16)
    assert np.all(np.diff(q.edges, axis=1) > 0)
    codes = q.encode(sample)
    assert codes.min() == 0 and codes.max() == 15
    # Quantile edges: each bucket holds 1/16 of the fitted sample, give or take one row.
    for j in range(5):
        assert np.abs(np.bincount(codes[:, j], minlength=16) - 1000).max() <= 1
    # decode(encode(z)) lies in z's bucket ...
    z = rng.standard_normal((3000, 5)).astype(np.float32) * 3
    c = q.encode(z)
    np.testing.assert_array_equal(q.encode(q.decode(c)), c)
    # ... and every code decodes into its own bucket.
    all_codes = np.tile(np.arange(16)[:, None], (1, 5))
    np.testing.assert_array_equal(q.encode(q.decode(all_codes)), all_codes)


def test_quantiser_paper_size_319_dims_1024_buckets() -> None:
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((4096, 319)).astype(np.float32) / np.arange(1, 320, dtype=np.float32)
    q = BucketQuantiser.fit(sample, 1024)
    assert q.edges.shape == (319, 1023) and q.values.shape == (319, 1024)
    assert np.all(np.diff(q.edges, axis=1) > 0)
    z = rng.standard_normal((2000, 319)).astype(np.float32) / np.arange(1, 320, dtype=np.float32)
    codes = q.encode(z)
    assert codes.dtype == np.int16 and codes.shape == (2000, 319)
    assert codes.min() >= 0 and codes.max() <= 1023
    np.testing.assert_array_equal(q.encode(q.decode(codes)), codes)
    all_codes = np.tile(np.arange(1024, dtype=np.int16)[:, None], (1, 319))
    np.testing.assert_array_equal(q.encode(q.decode(all_codes)), all_codes)


def test_quantiser_ties_still_give_non_empty_buckets() -> None:
    sample = np.repeat(np.arange(4, dtype=np.float32), 50)  # 4 distinct values, 16 buckets
    q = BucketQuantiser.fit(sample, 16)
    assert np.all(np.diff(q.edges[0]) > 0)
    codes = np.arange(16)
    np.testing.assert_array_equal(q.encode(q.decode(codes)), codes)


def test_quantiser_rejects_bad_codes_and_shapes() -> None:
    q = BucketQuantiser.fit(np.random.default_rng(0).standard_normal((100, 3)), 8)
    with pytest.raises(ValueError, match="codes must be in"):
        q.decode(np.full((2, 3), 8))
    with pytest.raises(ValueError, match="codes must be in"):
        q.decode(np.full((2, 3), -1))
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        q.encode(np.zeros((2, 4)))


def test_sum_squared_error_equals_decoding() -> None:
    rng = np.random.default_rng(4)
    sample = rng.standard_normal((5000, 40)).astype(np.float32) * np.linspace(0.1, 3, 40, dtype=np.float32)
    q = BucketQuantiser.fit(sample, 64)
    # Fresh rows, rows of the sample (values equal to an edge or tied) and values far outside.
    z = np.concatenate([rng.standard_normal((3000, 40)).astype(np.float32) * 2, sample[:500], q.edges[:, :40].T * 1.0])
    z[0] = 1e6
    z[1] = -1e6
    direct = float(np.sum((z.astype(np.float64) - q.decode(q.encode(z))) ** 2))
    assert q.sum_squared_error(z) == pytest.approx(direct, rel=1e-9)
    assert q.sum_squared_error(z, column_chunk=7) == pytest.approx(direct, rel=1e-9)
    q1 = BucketQuantiser.fit(sample[:, 0], 16)
    z1 = z[:, 0]
    assert q1.sum_squared_error(z1) == pytest.approx(float(np.sum((z1.astype(np.float64) - q1.decode(q1.encode(z1))) ** 2)), rel=1e-9)


@pytest.mark.parametrize("dtype, k", [(np.float16, 128), (np.float16, 200), (np.float32, 256), (np.float16, 13)])
def test_project_sample_matches_projecting_each_row(dtype, k) -> None:
    # float16 rows of 256 dims hold up to 128 components in their own memory, float32 ones any;
    # 200 components of float16 rows do not fit and go to a new array. An odd byte count cannot be
    # viewed as float32 at all.
    rng = np.random.default_rng(5)
    d = 256 if k != 13 else 3
    k = min(k, d)
    rows = rng.standard_normal((1001 if d == 3 else 1000, d)).astype(dtype)
    mean = rng.standard_normal(d).astype(np.float32)
    comps = np.linalg.qr(rng.standard_normal((d, d)))[0][:k].astype(np.float32)
    expected = _project(rows, mean, comps)
    buffer = rows.copy()
    got = _project_sample(buffer, mean, comps, chunk_rows=97)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # GEMMs of other shapes round otherwise
    in_place = np.shares_memory(got, buffer)
    assert in_place == (4 * k <= d * buffer.itemsize and buffer.nbytes % 4 == 0)


@pytest.mark.parametrize("txt_dtype", [np.float16, np.float32])
def test_row_dots_from_shifted_rows(txt_dtype) -> None:
    rng = np.random.default_rng(6)
    img = rng.standard_normal((1000, 64)).astype(np.float32)
    txt = rng.standard_normal((1000, 64)).astype(txt_dtype)
    shift = rng.standard_normal(64).astype(np.float32)
    got = _row_dots(img - shift, shift, txt, np.empty((37, 64), np.float32))  # blocks of 37 rows, a short last one
    expected = np.sum(img.astype(np.float64) * txt.astype(np.float64), axis=1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_reservoir_equals_sequential_algorithm_r() -> None:
    def one_at_a_time(seed: int, n: int, capacity: int) -> np.ndarray:
        rng, data = np.random.default_rng(seed), np.zeros(capacity, np.float32)
        for t in range(n):
            if t < capacity:
                data[t] = t
            elif (j := rng.integers(0, t + 1)) < capacity:
                data[j] = t
        return data

    expected = one_at_a_time(3, 3000, 50)
    for batch in (1000, 97, 7):  # large batches aim several rows at one slot: the last must win
        res = _Reservoir(50, (), np.random.default_rng(3))
        for start in range(0, 3000, batch):
            res.add(np.arange(start, min(start + batch, 3000), dtype=np.float32))
        np.testing.assert_array_equal(res.sample, expected)


def test_reservoir_is_uniform_and_seeded() -> None:
    def draw(seed: int) -> np.ndarray:
        res = _Reservoir(100, (), np.random.default_rng(seed))
        for start in range(0, 10000, 333):
            res.add(np.arange(start, min(start + 333, 10000), dtype=np.float32))
        return res.sample

    a, b = draw(0), draw(0)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 100
    assert not np.array_equal(np.sort(a), np.sort(draw(1)))
    # Over many seeds each tenth of the stream gets a tenth of the sample.
    hits = np.concatenate([draw(s) for s in range(40)])
    counts = np.bincount((hits // 1000).astype(int), minlength=10)
    assert np.abs(counts - 400).max() < 80


def test_prefetch_keeps_order_raises_and_closes() -> None:
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))

    def failing():
        yield 1
        raise OSError("shard gone")

    got = []
    with pytest.raises(OSError, match="shard gone"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]

    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    for item in prefetch(endless(), depth=3):
        if item == 10:
            break
    assert closed == [True]  # the consumer stopped early: the producer (and its files) was closed


# ---------------------------------------------------------------------------------------- fitting


N_FIT, D_FIT = 6000, 1024


def _embeddings(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm 1024-d image/text pairs: a 48-dim power-law subspace plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((D_FIT, 48)))
    common = rng.standard_normal(D_FIT)
    latent = rng.standard_normal((n, 48)) * np.arange(1, 49) ** -0.5
    img = 0.6 * common / np.linalg.norm(common) + latent @ basis.T + 0.004 * rng.standard_normal((n, D_FIT))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.05 * rng.standard_normal((n, D_FIT))
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float16), txt.astype(np.float16)


@pytest.fixture(scope="module")
def embeddings() -> tuple[np.ndarray, np.ndarray]:
    return _embeddings(N_FIT, seed=0)


class _Factory:
    """Uneven batches of fixed arrays; counts how often it is called."""

    def __init__(self, img: np.ndarray, txt: np.ndarray) -> None:
        self.img, self.txt, self.calls = img, txt, 0

    def __call__(self):
        self.calls += 1
        for a, b in ((0, 1000), (1000, 1999), (1999, N_FIT)):
            yield self.img[a:b], self.txt[a:b]


FIT_KW = dict(n_components=64, n_buckets=64, dot_buckets=32, quantile_rows=4096, seed=7, chunk_rows=2048)


@pytest.fixture(scope="module")
def fitted(embeddings: tuple[np.ndarray, np.ndarray]) -> tuple[PcaQuantiser, dict, _Factory]:
    factory = _Factory(*embeddings)
    model, report = fit_pca_quantiser(factory, **FIT_KW)
    return model, report, factory


def test_fit_pca_quantiser_report(fitted, embeddings) -> None:
    model, report, factory = fitted
    img, _ = embeddings
    assert factory.calls == 1  # one pass over the data
    assert report["rows"] == N_FIT and report["n_components"] == 64
    assert report["quantiser_sample_rows"] == 4096  # reservoir full, fewer than the rows
    assert report["dot_sample_rows"] == N_FIT  # every dot product kept
    assert report["quantisation_error_rows"] == 4096
    kept = report["explained_variance_ratio_kept"]
    assert 0.95 < kept < 1.0
    assert report["relative_mse_pca_centred"] == pytest.approx(1 - kept)
    assert 0.0 < report["relative_mse_pca"] < report["relative_mse_pca_quantised"] < 0.05
    # Pass 2's on-the-fly residual equals the PCA's unexplained variance over the same rows.
    x = img.astype(np.float64)
    expected = (N_FIT - 1) * model.total_variance * (1 - kept) / np.sum(x * x)
    assert report["relative_mse_pca"] == pytest.approx(expected, rel=1e-4)
    # And the quantised figure agrees with decoding the codes directly (the estimate uses 4096 rows).
    xq = model.decode(model.encode(img)).astype(np.float64)
    direct = np.sum((x - xq) ** 2) / np.sum(x * x)
    assert report["relative_mse_pca_quantised"] == pytest.approx(direct, rel=0.05)
    # Dot products of near-identical unit vectors: close to 1, edges inside [-1, 1].
    assert 0.3 < report["dot_edges_min"] < report["dot_median"] < report["dot_edges_max"] <= 1.0
    assert report["fingerprint"] == model.fingerprint()


def test_quantisation_error_estimated_on_a_subsample(embeddings, monkeypatch) -> None:
    import unclip.data.pca as pca_module

    img, txt = embeddings
    monkeypatch.setattr(pca_module, "QUANT_ERROR_ROWS", 1500)
    model, report = fit_pca_quantiser(_Factory(img, txt), **FIT_KW)
    assert report["quantisation_error_rows"] == 1500
    x = img.astype(np.float64)
    direct = np.sum((x - model.decode(model.encode(img))) ** 2) / np.sum(x * x)
    assert report["relative_mse_pca_quantised"] == pytest.approx(direct, rel=0.05)


def test_fitted_model_encodes_and_decodes(fitted, embeddings) -> None:
    model, _, _ = fitted
    img, txt = embeddings
    codes = model.encode(img[:100])
    assert codes.shape == (100, 64) and codes.dtype == np.int16
    approx = model.decode(codes)
    assert approx.shape == (100, D_FIT) and approx.dtype == np.float32
    assert np.mean(np.sum((approx - img[:100].astype(np.float32)) ** 2, axis=1)) < 0.05
    dots = np.sum(img[:100].astype(np.float32) * txt[:100].astype(np.float32), axis=1)
    dcodes = model.encode_dot(dots)
    assert dcodes.shape == (100,) and 0 <= dcodes.min() and dcodes.max() < 32
    np.testing.assert_array_equal(model.encode_dot(model.decode_dot(dcodes)), dcodes)


def test_sample_dot_bucket_upper_half(fitted) -> None:
    model, _, _ = fitted
    # 6000 dot products in 32 equally populated buckets: half the mass below the edge opening 16.
    assert model.median_dot_bucket == 16
    draws = model.sample_dot_bucket_upper_half(np.random.default_rng(0), 20000)
    assert draws.min() == 16 and draws.max() == 31
    counts = np.bincount(draws, minlength=32)[16:]
    assert np.abs(counts / 20000 - 1 / 16).max() < 0.01
    np.testing.assert_array_equal(draws, model.sample_dot_bucket_upper_half(np.random.default_rng(0), 20000))

    # Uneven training frequencies are kept: cumulative 0.1, 0.3, 0.7, ... -> median bucket 2.
    uneven = dataclasses.replace(model, dot_bucket_counts=np.array([10, 20, 40, 20, 10] + [0] * 27))
    assert uneven.median_dot_bucket == 2
    draws = uneven.sample_dot_bucket_upper_half(np.random.default_rng(1), 7000)
    assert set(np.unique(draws).tolist()) == {2, 3, 4}
    np.testing.assert_allclose(np.bincount(draws, minlength=5)[2:] / 7000, [4 / 7, 2 / 7, 1 / 7], atol=0.02)
    # Exactly half below bucket 5: only bucket 5 is in the upper half.
    split = dataclasses.replace(model, dot_bucket_counts=np.array([10, 0, 30, 5, 5, 50] + [0] * 26))
    assert split.median_dot_bucket == 5
    assert set(split.sample_dot_bucket_upper_half(np.random.default_rng(2), 100).tolist()) == {5}


def test_save_load_round_trip(fitted, embeddings, tmp_path) -> None:
    model, _, _ = fitted
    img, _ = embeddings
    buf = io.BytesIO()
    model.save(buf)
    buf.seek(0)
    from_buf = PcaQuantiser.load(buf)
    path = tmp_path / "pca.npz"
    model.save(str(path))
    from_path = PcaQuantiser.load(str(path))
    for loaded in (from_buf, from_path):
        assert loaded.fingerprint() == model.fingerprint()
        np.testing.assert_array_equal(loaded.encode(img[:500]), model.encode(img[:500]))
        assert loaded.config == model.config
        assert loaded.config["n_components"] == 64 and loaded.config["n_rows"] == N_FIT
        assert loaded.median_dot_bucket == model.median_dot_bucket
    # The fingerprint covers the arrays: one changed value changes it.
    arrays = model.to_arrays()
    arrays["bucket_values"] = arrays["bucket_values"].copy()
    arrays["bucket_values"][0, 0] += 1e-3
    assert PcaQuantiser.from_arrays(arrays).fingerprint() != model.fingerprint()
    arrays["format_version"] = np.asarray(99)
    with pytest.raises(ValueError, match="format 99"):
        PcaQuantiser.from_arrays(arrays)


def test_fit_is_deterministic(embeddings) -> None:
    img, txt = embeddings
    small = dict(FIT_KW, n_components=16)
    a, _ = fit_pca_quantiser(_Factory(img, txt), **small)
    b, _ = fit_pca_quantiser(_Factory(img, txt), **small)
    assert a.fingerprint() == b.fingerprint()
    c, _ = fit_pca_quantiser(_Factory(img, txt), **dict(small, seed=8))
    assert c.fingerprint() != a.fingerprint()  # another reservoir, other bucket edges


def test_fit_reads_once(embeddings) -> None:
    img, txt = embeddings
    factory = _Factory(img, txt)
    _, report = fit_pca_quantiser(factory, **dict(FIT_KW, n_components=16))
    assert factory.calls == 1 and report["rows"] == N_FIT


def test_fit_quality_against_an_exact_reference() -> None:
    """Same kept variance as an exact in-memory PCA, and bucket edges from the reservoir as good, on
    held-out rows, as edges from every projected row: rows are fed sorted by their first principal
    coordinate, so a reservoir that favoured any part of the stream would show (edges from the first
    4,096 rows of that stream are 4.9x worse; uniform reservoirs of five seeds, 0.6-1.1%)."""
    img, txt = _embeddings(N_FIT + 2000, seed=3)
    fit_img, fit_txt, held = img[:N_FIT], txt[:N_FIT], img[N_FIT:].astype(np.float32)
    exact = PCA(n_components=64, svd_solver="covariance_eigh").fit(fit_img.astype(np.float32))
    order = np.argsort(exact.transform(fit_img.astype(np.float32))[:, 0])

    def sorted_batches():
        for a in range(0, N_FIT, 1000):
            yield fit_img[order[a : a + 1000]], fit_txt[order[a : a + 1000]]

    model, report = fit_pca_quantiser(sorted_batches, **FIT_KW)
    kept = report["explained_variance_ratio_kept"]
    assert kept == pytest.approx(float(exact.explained_variance_ratio_.sum()), rel=1e-5)

    def relative_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
        x = x.astype(np.float64)
        return float(np.sum((x - x_hat.astype(np.float64)) ** 2) / np.sum(x * x))

    ref_quantiser = BucketQuantiser.fit(exact.transform(fit_img.astype(np.float32)), FIT_KW["n_buckets"])
    ref = relative_mse(held, exact.inverse_transform(ref_quantiser.decode(ref_quantiser.encode(exact.transform(held)))))
    codes = model.encode(held)
    ours = relative_mse(held, model.decode(codes))
    assert ours <= 1.03 * ref
    assert relative_mse(held, exact.inverse_transform(exact.transform(held))) < 0.7 * ours  # buckets matter here
    np.testing.assert_array_equal(model.quantiser.encode(model.quantiser.decode(codes)), codes)
    # The report's estimate is in-sample (edges and error from the same reservoir), a little lower.
    assert 0.9 * ours < report["relative_mse_pca_quantised"] < 1.02 * ours


# ---------------------------------------------------------------------------------------- reading


def _write_files(tmp_path, sizes: list[int], dim: int = 16) -> list[tuple[str, int]]:
    """Parquet files whose image rows hold their global row id (float16) and text rows -id (float32)."""
    files, start = [], 0
    for i, n in enumerate(sizes):
        ids = np.arange(start, start + n)
        img = np.repeat(ids[:, None], dim, axis=1).astype(np.float16)
        txt = -np.repeat(ids[:, None], dim, axis=1).astype(np.float32)
        table = pa.table(
            {
                "key": pa.array([f"{k:06d}" for k in ids]),
                "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(img.ravel()), dim),
                "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(txt.ravel()), dim),
            }
        )
        path = tmp_path / f"shard-{i:02d}.parquet"
        pq.write_table(table, path, row_group_size=4)  # several row groups per file
        files.append((str(path), n))
        start += n
    return files


def _read(files, **kw) -> tuple[np.ndarray, np.ndarray, list[int]]:
    batches = list(iter_embedding_batches(files, **kw))
    img = np.concatenate([b[0] for b in batches])
    txt = np.concatenate([b[1] for b in batches])
    return img, txt, [len(b[0]) for b in batches]


def test_iter_embedding_batches_reads_everything(tmp_path) -> None:
    files = _write_files(tmp_path, [5, 7, 3, 9])
    img, txt, sizes = _read(files, batch_rows=4, max_rows=1000, seed=0)
    assert img.dtype == np.float16 and txt.dtype == np.float32
    assert img.shape == (24, 16) and txt.shape == (24, 16)
    assert max(sizes) <= 4
    assert sorted(img[:, 0].astype(int).tolist()) == list(range(24))
    np.testing.assert_array_equal(txt, -img.astype(np.float32))
    assert np.all(img == img[:, :1])  # rows intact after the reshape


def test_iter_embedding_batches_takes_whole_files_then_trims(tmp_path) -> None:
    sizes = [5, 7, 3, 9, 6, 4]
    files = _write_files(tmp_path, sizes)
    starts = np.cumsum([0, *sizes])
    img, _, batch_sizes = _read(files, batch_rows=4, max_rows=13, seed=3)
    assert img.shape[0] == 13 and max(batch_sizes) <= 4
    ids = img[:, 0].astype(int)
    # Contiguous runs of whole files in some order, the last one cut short.
    file_of = np.searchsorted(starts, ids, side="right") - 1
    runs = [int(f) for k, f in enumerate(file_of) if k == 0 or f != file_of[k - 1]]
    assert len(set(runs)) == len(runs)
    for f in runs[:-1]:
        assert sorted(ids[file_of == f].tolist()) == list(range(starts[f], starts[f + 1]))
    last = ids[file_of == runs[-1]]
    assert last.tolist() == list(range(starts[runs[-1]], starts[runs[-1]] + len(last)))

    again, _, _ = _read(files, batch_rows=4, max_rows=13, seed=3)
    np.testing.assert_array_equal(img, again)
    other, _, _ = _read(files, batch_rows=4, max_rows=13, seed=4)
    assert other.shape[0] == 13
    assert not np.array_equal(img, other)
    only_img = list(iter_embedding_batches(files, batch_rows=100, max_rows=13, seed=3, columns=("image_emb",)))
    assert all(len(b) == 1 for b in only_img)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in only_img]), img)


def test_iter_embedding_batches_checks_row_counts(tmp_path) -> None:
    files = _write_files(tmp_path, [5, 7])
    wrong = [(files[0][0], 6), files[1]]
    with pytest.raises(ValueError, match="has 5 rows"):
        list(iter_embedding_batches(wrong, batch_rows=4, max_rows=100, seed=0))


def test_fit_from_parquet_files(tmp_path, embeddings) -> None:
    img, txt = embeddings
    files = []
    for i, (a, b) in enumerate(((0, 2500), (2500, 4000), (4000, N_FIT))):
        table = pa.table(
            {
                "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(img[a:b].ravel()), D_FIT),
                "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(txt[a:b].ravel()), D_FIT),
            }
        )
        pq.write_table(table, tmp_path / f"emb-{i}.parquet", use_dictionary=False)
        files.append((str(tmp_path / f"emb-{i}.parquet"), b - a))

    def factory():
        return iter_embedding_batches(files, batch_rows=1024, max_rows=5000, seed=0)

    _, report = fit_pca_quantiser(factory, **FIT_KW)
    assert report["rows"] == 5000
    assert 0.95 < report["explained_variance_ratio_kept"] < 1.0
    assert 0.0 < report["relative_mse_pca"] < report["relative_mse_pca_quantised"] < 0.05


# ------------------------------------------------------------------------------------------- plot


def test_explained_variance_plot_png(fitted) -> None:
    model, _, _ = fitted
    png = explained_variance_plot_png(model.spectrum_ratio, 64)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (640, 400)
