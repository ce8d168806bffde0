"""The AR prior's target representation: PCA of the CLIP image embeddings and its bucket quantiser.

unCLIP (Ramesh et al. 2022), section 2.1, "Prior": the autoregressive prior predicts the CLIP image
embedding reduced by PCA to 319 of its 1,024 dimensions (nearly all of the information is kept),
principal components ordered by decreasing eigenvalue, each dimension quantised into 1,024 discrete
buckets. The prior is also conditioned on a quantised text-image dot product, which at sampling time
is drawn from the upper half of its training distribution.

Everything here is fitted out of core, in one pass over the data, in memory bounded by the dimension,
the batch size and the sample sizes, never by the row count (the paper-scale run has 650M rows): the
pass accumulates the scatter matrix for the PCA and keeps seeded uniform reservoirs of image rows and
of text-image dot products; the bucket edges are quantiles of the reservoir's rows once projected.
Numpy (the rows come from ``unclip.data.embeddings``), and threadpoolctl, which scikit-learn installs,
to run the eigendecomposition on one BLAS thread; fsspec in ``PcaQuantiser.save``/``load``;
matplotlib only in the plot helper.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from unclip.data.prefetch import prefetch

FORMAT_VERSION = 1
# Rows per BLAS call: large enough for GEMM to run near peak, small enough that the float32 work
# buffer (64 MiB at d=1024) and not the caller's batch size bounds the extra memory.
DEFAULT_CHUNK_ROWS = 16384
# Dot products are scalars (4 bytes each), so a few million of them are kept outright; beyond that
# they are reservoir-sampled like the projected rows.
DEFAULT_DOT_ROWS = 1 << 22
# Rows on which the quantisation error is estimated: its standard error is already far below 1%.
QUANT_ERROR_ROWS = 65536

# Bytes of float32 per block of the float16 cast: a block stays in a core's L2 cache between passes.
CAST_BLOCK_BYTES = 1 << 19
_F16_SIGN_AND_BITS = np.int32(-0x70000001)  # 0x8FFFFFFF: the sign and the 15 bits shifted under it
_F16_SCALE = np.float32(2.0**112)  # 2^(127 - 15), float32's exponent bias over float16's

BatchesFactory = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def _row_chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _cast_float32(src: np.ndarray, out: np.ndarray, minus: np.ndarray | None = None) -> np.ndarray:
    """``out[...] = src - minus`` in float32 (``minus`` [d] optional), fast where ``src`` is float16 [n, d].

    Numpy converts float16 one value at a time (its x86 wheels do not assume F16C), 2.2-3 ns a value
    here: a quarter of the PCA's pass. A finite float16's bits, sign-extended, shifted left by 13 and
    masked to the sign and the 15 bits below it, are that number as a float32 divided by 2^112,
    subnormals included; those three integer passes and a multiply, over blocks of rows that stay in
    cache, are about twice as fast and bitwise equal (tested on every float16). An infinity or NaN
    would come out finite, 2^16 or more in size, so a block with one is cast by numpy instead.
    """
    if not (src.dtype == np.float16 and src.ndim == 2 and src.flags.c_contiguous and out.flags.c_contiguous):
        if minus is None:
            np.copyto(out, src, casting="same_kind")
        else:
            np.subtract(src, minus, out=out, dtype=np.float32, casting="same_kind")
        return out
    for rows in _row_chunks(src.shape[0], max(1, CAST_BLOCK_BYTES // (4 * max(1, src.shape[1])))):
        block = out[rows]
        bits = block.view(np.int32)
        np.left_shift(src[rows].view(np.int16), 13, out=bits, dtype=np.int32)
        np.bitwise_and(bits, _F16_SIGN_AND_BITS, out=bits)
        np.multiply(block, _F16_SCALE, out=block)
        if block.size and (block.max() >= 65536 or block.min() <= -65536):
            np.copyto(block, src[rows], casting="same_kind")
        if minus is not None:
            np.subtract(block, minus, out=block)
    return out


# --------------------------------------------------------------------------------------------- PCA


class StreamingPCA:
    """PCA from one pass over batches: row count, column sum and scatter matrix in float64.

    The sums are taken over ``x - shift`` with ``shift`` the first chunk's mean, not over ``x``: the
    covariance is the scatter minus n * mean * mean^T, and when the mean is large next to the spread
    (CLIP embeddings have a strong common direction) that difference cancels most digits. Near the
    mean the products are small and the correction term is tiny, so the result stays accurate.

    The per-chunk product runs as a float32 GEMM (``gemm_dtype``) summed into float64 across chunks:
    on shifted data its rounding error (about 1e-6 relative) is far below what the explained-variance
    ratios need, and it is twice as fast as float64 on the CPUs measured. Pass ``np.float64`` for a
    float64 product.
    """

    def __init__(self, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, gemm_dtype: type = np.float32) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        self.chunk_rows = chunk_rows
        self.gemm_dtype = np.dtype(gemm_dtype)
        self.n_rows_ = 0
        self._shift: np.ndarray | None = None  # [d], gemm_dtype: subtracted before the sums
        self._sum: np.ndarray | None = None  # [d] float64: sum of (x - shift)
        self._scatter: np.ndarray | None = None  # [d, d] float64: sum of (x - shift)^T (x - shift)
        self._buf: np.ndarray | None = None  # [chunk_rows, d] work buffer, reused across chunks
        self._ones: np.ndarray | None = None  # [chunk_rows]: the column sum as a BLAS product
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.explained_variance_: np.ndarray | None = None
        self.explained_variance_ratio_: np.ndarray | None = None
        self.spectrum_: np.ndarray | None = None
        self.total_variance_: float | None = None
        self.sum_sq_norm_: float | None = None  # sum over the rows of ||x||^2

    @property
    def dim(self) -> int | None:
        return None if self._sum is None else int(self._sum.shape[0])

    def partial_fit(self, x: np.ndarray) -> StreamingPCA:
        """Add a batch of rows [n, d] (float16 or float32) to the sums."""
        for _ in self.accumulate(x):
            pass
        return self

    def accumulate(self, x: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """Add a batch like ``partial_fit``, chunk by chunk, yielding each chunk's ``rows`` of ``x`` and
        its shifted copy ``x[rows] - shift`` [m, d] in ``gemm_dtype``.

        The copy is a reused buffer, valid until the next chunk: a caller that needs more from the same
        rows (the one-pass fit's dot products) reads it there instead of casting the rows again. A chunk
        is in the sums by the time it is yielded.
        """
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D batch [n, d], got shape {x.shape}")
        if x.shape[0] == 0:
            return
        d = x.shape[1]
        if self._sum is None:
            self._shift = x[: self.chunk_rows].mean(axis=0, dtype=np.float64).astype(self.gemm_dtype)
            self._sum = np.zeros(d, np.float64)
            self._scatter = np.zeros((d, d), np.float64)
        elif d != self.dim:
            raise ValueError(f"batch has {d} columns, earlier batches had {self.dim}")
        if self._buf is None:  # first batch, or more rows after finalize
            self._buf = np.empty((self.chunk_rows, d), self.gemm_dtype)
            self._ones = np.ones(self.chunk_rows, self.gemm_dtype)
        for rows in _row_chunks(x.shape[0], self.chunk_rows):
            m = rows.stop - rows.start
            buf = self._buf[:m]
            # Cast (float16 -> float32) and shift into the reused buffer.
            if self.gemm_dtype == np.float32:
                _cast_float32(x[rows], buf, minus=self._shift)
            else:
                np.subtract(x[rows], self._shift, out=buf, dtype=self.gemm_dtype, casting="same_kind")
            self._scatter += buf.T @ buf
            self._sum += self._ones[:m] @ buf
            self.n_rows_ += m
            yield rows, buf

    @property
    def shift(self) -> np.ndarray | None:
        """[d] the vector subtracted from every row before the sums (the first chunk's mean)."""
        return self._shift

    def finalize(self, n_components: int) -> StreamingPCA:
        """Eigendecompose the covariance and keep the top ``n_components`` components."""
        if self._sum is None or self.n_rows_ < 2:
            raise ValueError(f"need at least 2 rows to fit a PCA, got {self.n_rows_}")
        d = self.dim
        if not 1 <= n_components <= d:
            raise ValueError(f"n_components must be in [1, {d}], got {n_components}")
        n = self.n_rows_
        centre = self._sum / n  # mean of the shifted rows
        # Unbiased (n - 1) covariance, as scikit-learn's PCA, so the explained variances agree.
        cov = (self._scatter - n * np.outer(centre, centre)) / (n - 1)
        cov = 0.5 * (cov + cov.T)  # a float32 GEMM is not exactly symmetric; eigh reads one triangle
        # On one BLAS thread: the eigensolver's many small steps each synchronise the threads, and with
        # another process on the cores each synchronisation waits for a time slice (a 1,024-d eigh took
        # 14-15 s on two threads against 0.6 s on one, measured on 2 shared cores).
        with threadpool_limits(limits=1, user_api="blas"):
            eigvals, eigvecs = np.linalg.eigh(cov)
        eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
        self.total_variance_ = float(np.trace(cov))
        self.spectrum_ = np.clip(eigvals, 0.0, None)  # rounding can leave tiny negative eigenvalues
        mean = self._shift.astype(np.float64) + centre
        self.mean_ = mean.astype(np.float32)
        # sum ||x||^2 = sum ||x - mean||^2 + n ||mean||^2, as the centred rows sum to zero.
        self.sum_sq_norm_ = (n - 1) * self.total_variance_ + n * float(mean @ mean)
        self.components_ = _sign_flip(eigvecs[:, :n_components].T).astype(np.float32)
        self.explained_variance_ = self.spectrum_[:n_components].copy()
        self.explained_variance_ratio_ = self.explained_variance_ / self.total_variance_
        self._buf = self._ones = None  # 64 MiB at d=1,024, freed for what follows the fit (reallocated if rows come)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project rows [n, d] to [n, k] float32."""
        self._check_fitted()
        return _project(x, self.mean_, self.components_)

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Map projections [n, k] back to [n, d] float32."""
        self._check_fitted()
        return np.asarray(z, np.float32) @ self.components_ + self.mean_

    def _check_fitted(self) -> None:
        if self.components_ is None:
            raise RuntimeError("call finalize(n_components) first")


def _sign_flip(components: np.ndarray) -> np.ndarray:
    """Make each component's largest-|value| entry positive: eigenvectors have no sign of their own.

    This is scikit-learn's ``svd_flip(..., u_based_decision=False)`` convention.
    """
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def _project(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    centred = _cast_float32(x, np.empty(np.broadcast_shapes(x.shape, mean.shape), np.float32), minus=mean)
    return centred @ components.T


# --------------------------------------------------------------------------------------- quantiser


def _code_dtype(n_buckets: int) -> np.dtype:
    return np.dtype(np.int16) if n_buckets <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def _columns_as_rows(a: np.ndarray, cols: slice, tile_rows: int = 4096) -> np.ndarray:
    """``a[:, cols].T`` [c, m] as a new C-contiguous float32 array, copied a tile of rows at a time.

    Copied whole from a row-major [m, k] array, a column is read at a time, one cache line and often
    one page per value; a tile's rows stay in cache until all its columns are read (0.5 s against
    1.0-1.2 s for the 319 columns of 262,144 rows here).
    """
    out = np.empty((cols.stop - cols.start, a.shape[0]), np.float32)
    for rows in _row_chunks(a.shape[0], tile_rows):
        out[:, rows] = a[rows, cols].T
    return out


def _sorted_quantiles(sorted_rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """numpy's default ("linear") quantiles of each row of an ascending-sorted [c, m] array: [c, len(q)]."""
    m = sorted_rows.shape[1]
    pos = q * (m - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, m - 1)
    frac = pos - lo
    a = sorted_rows[:, lo].astype(np.float64)
    b = sorted_rows[:, hi].astype(np.float64)
    return a + frac * (b - a)


@dataclass(frozen=True, eq=False)
class BucketQuantiser:
    """Per-dimension quantile buckets: ``n_buckets`` equally populated buckets per column.

    Bucket ``c`` of a column is ``[edges[c-1], edges[c])`` (unbounded at both ends). Edges are made
    strictly increasing, so no bucket is empty even where the sample has ties, and each bucket's value
    (the sample median of the bucket, clipped into it) lies inside the bucket: decoding then encoding
    gives back the same code, and a decoded value is in the bucket of the value that was encoded.
    """

    edges: np.ndarray  # [k, n_buckets - 1] float32, strictly increasing along the last axis
    values: np.ndarray  # [k, n_buckets] float32, values[j, c] inside bucket c of column j
    scalar: bool = False  # fitted on a 1-D sample: encodes/decodes 1-D arrays

    @property
    def n_buckets(self) -> int:
        return int(self.values.shape[1])

    @property
    def n_dims(self) -> int:
        return int(self.values.shape[0])

    @property
    def code_dtype(self) -> np.dtype:
        return _code_dtype(self.n_buckets)

    @classmethod
    def fit(cls, sample: np.ndarray, n_buckets: int, *, column_chunk: int = 32) -> BucketQuantiser:
        """Bucket edges at quantiles i/n_buckets of each column of ``sample`` ([m] or [m, k])."""
        sample = np.asarray(sample)
        scalar = sample.ndim == 1
        if scalar:
            sample = sample[:, None]
        if sample.ndim != 2 or sample.shape[0] < 1:
            raise ValueError(f"expected a non-empty [m] or [m, k] sample, got shape {sample.shape}")
        if n_buckets < 2:
            raise ValueError("n_buckets must be >= 2")
        if not np.isfinite(sample).all():
            raise ValueError("the sample has non-finite values")
        k = sample.shape[1]
        q_edges = np.arange(1, n_buckets) / n_buckets
        q_values = (np.arange(n_buckets) + 0.5) / n_buckets
        q_all = np.concatenate([q_edges, q_values])
        edges = np.empty((k, n_buckets - 1), np.float32)
        values = np.empty((k, n_buckets), np.float32)
        # A few columns at a time: the sorted copy stays small whatever the number of dimensions.
        for cols in _row_chunks(k, column_chunk):
            block = _columns_as_rows(sample, cols)
            block.sort(axis=1)
            quant = _sorted_quantiles(block, q_all).astype(np.float32)
            edges[cols] = quant[:, : n_buckets - 1]
            values[cols] = quant[:, n_buckets - 1 :]
        edges = _strictly_increasing(edges)
        lower = np.concatenate([np.full((k, 1), -np.inf, np.float32), edges], axis=1)
        upper = np.concatenate([np.nextafter(edges, np.float32(-np.inf)), np.full((k, 1), np.inf, np.float32)], axis=1)
        values = np.clip(values, lower, upper)
        return cls(edges=edges, values=values, scalar=scalar)

    def encode(self, z: np.ndarray) -> np.ndarray:
        """Bucket codes of ``z`` ([n] if scalar, else [n, k]), int16 for up to 32768 buckets."""
        z2 = self._as_2d(z, "z")
        z2 = np.asarray(z2, np.float32)  # the edges are float32: compare in float32, as decode returns
        codes = np.empty(z2.shape, self.code_dtype)
        for j in range(self.n_dims):
            # side="right": a value equal to an edge belongs to the bucket that the edge opens.
            codes[:, j] = np.searchsorted(self.edges[j], z2[:, j], side="right")
        return codes[:, 0] if self.scalar else codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Each code's bucket value, float32, same shape as ``codes``."""
        c2 = self._as_2d(codes, "codes")
        if c2.size and (c2.min() < 0 or c2.max() >= self.n_buckets):
            raise ValueError(f"codes must be in [0, {self.n_buckets}), got [{c2.min()}, {c2.max()}]")
        out = self.values[np.arange(self.n_dims)[None, :], c2]
        return out[:, 0] if self.scalar else out

    def sum_squared_error(self, z: np.ndarray, *, column_chunk: int = 32) -> float:
        """``sum((z - decode(encode(z)))**2)`` in float64, without encoding row by row.

        Each column is sorted, so that its codes are runs: bucket c's run starts at the first value
        not below ``edges[c - 1]``, as ``encode`` assigns them. Encoding searches the edges once per
        value and mispredicts a branch at most of the ten levels (2.4 s for 65,536 x 319 values here);
        one search per edge into the sorted column costs little next to the sort (0.45 s in all).
        """
        z2 = np.asarray(self._as_2d(z, "z"), np.float32)
        total = 0.0
        for cols in _row_chunks(self.n_dims, column_chunk):
            block = _columns_as_rows(z2, cols)
            block.sort(axis=1)
            for j, col in zip(range(cols.start, cols.stop), block):
                starts = np.searchsorted(col, self.edges[j], side="left")
                counts = np.diff(starts, prepend=0, append=col.shape[0])
                err = np.subtract(col, np.repeat(self.values[j], counts), dtype=np.float64)
                total += float(np.einsum("i,i->", err, err))  # not BLAS: its threads cost more than 64K products
        return total

    def _as_2d(self, a: np.ndarray, name: str) -> np.ndarray:
        a = np.asarray(a)
        if self.scalar:
            if a.ndim != 1:
                raise ValueError(f"this quantiser is 1-D: {name} must be [n], got shape {a.shape}")
            return a[:, None]
        if a.ndim != 2 or a.shape[1] != self.n_dims:
            raise ValueError(f"{name} must be [n, {self.n_dims}], got shape {a.shape}")
        return a


def _strictly_increasing(edges: np.ndarray) -> np.ndarray:
    """Raise tied edges (ties in the sample) to the next float, so that every bucket is non-empty."""
    out = edges.copy()
    for i in range(1, out.shape[1]):
        np.maximum(out[:, i], np.nextafter(out[:, i - 1], np.float32(np.inf)), out=out[:, i])
    return out


# ------------------------------------------------------------------------------------ the artifact


@dataclass(frozen=True, eq=False)
class PcaQuantiser:
    """The fitted representation the AR prior trains on: PCA, per-dimension and dot-product buckets."""

    mean: np.ndarray  # [d] float32
    components: np.ndarray  # [k, d] float32, rows orthonormal, by decreasing eigenvalue
    explained_variance: np.ndarray  # [k] float64
    spectrum: np.ndarray  # [d] float64, every eigenvalue of the covariance, descending
    total_variance: float
    quantiser: BucketQuantiser  # k dims
    dot_quantiser: BucketQuantiser  # scalar
    dot_bucket_counts: np.ndarray  # [dot_buckets] int64, training dot products per bucket
    config: dict[str, int] = field(default_factory=dict)  # n_rows, seed, quantile_rows, ...

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / self.total_variance

    @property
    def spectrum_ratio(self) -> np.ndarray:
        return self.spectrum / self.total_variance

    def project(self, img_emb: np.ndarray) -> np.ndarray:
        """[n, d] -> [n, k] float32 principal-component coordinates."""
        return _project(img_emb, self.mean, self.components)

    def encode(self, img_emb: np.ndarray) -> np.ndarray:
        """[n, d] image embeddings -> [n, k] bucket codes (the AR prior's target tokens)."""
        return self.quantiser.encode(self.project(img_emb))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[n, k] codes -> [n, d] float32 approximate embeddings (not renormalised)."""
        return self.quantiser.decode(codes) @ self.components + self.mean

    def encode_dot(self, dots: np.ndarray) -> np.ndarray:
        """[n] text-image dot products -> [n] bucket codes (the prior's conditioning token)."""
        return self.dot_quantiser.encode(np.asarray(dots))

    def decode_dot(self, codes: np.ndarray) -> np.ndarray:
        return self.dot_quantiser.decode(codes)

    @property
    def median_dot_bucket(self) -> int:
        """The first bucket whose cumulative training frequency exceeds one half.

        Where half the mass lies exactly below a bucket edge (the usual case for quantile buckets), the
        bucket that edge opens, so that "at or above the median bucket" is exactly the upper half.
        """
        cdf = np.cumsum(self.dot_bucket_counts) / self.dot_bucket_counts.sum()
        return int(np.searchsorted(cdf, 0.5, side="right"))

    def sample_dot_bucket_upper_half(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` dot-product buckets from the upper half of the training distribution.

        The paper samples with the dot product drawn from the upper half of its distribution (higher
        text-image similarity). Buckets at or above the median bucket are drawn with their training
        frequencies, so that an uneven distribution (ties) is kept as it was.
        """
        lo = self.median_dot_bucket
        counts = self.dot_bucket_counts[lo:].astype(np.float64)
        draws = rng.choice(counts.shape[0], size=n, p=counts / counts.sum())
        return (lo + draws).astype(self.dot_quantiser.code_dtype)

    # -- persistence: one .npz, the arrays below and nothing pickled

    def to_arrays(self) -> dict[str, np.ndarray]:
        cfg = {f"config_{k}": np.asarray(v, np.int64) for k, v in self.config.items()}
        return {
            "format_version": np.asarray(FORMAT_VERSION, np.int64),
            "mean": self.mean,
            "components": self.components,
            "explained_variance": self.explained_variance,
            "spectrum": self.spectrum,
            "total_variance": np.asarray(self.total_variance, np.float64),
            "bucket_edges": self.quantiser.edges,
            "bucket_values": self.quantiser.values,
            "dot_edges": self.dot_quantiser.edges,
            "dot_values": self.dot_quantiser.values,
            "dot_bucket_counts": self.dot_bucket_counts,
            **cfg,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PcaQuantiser:
        version = int(arrays["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"PCA artifact format {version}, this code reads {FORMAT_VERSION}")
        return cls(
            mean=arrays["mean"],
            components=arrays["components"],
            explained_variance=arrays["explained_variance"],
            spectrum=arrays["spectrum"],
            total_variance=float(arrays["total_variance"]),
            quantiser=BucketQuantiser(arrays["bucket_edges"], arrays["bucket_values"], scalar=False),
            dot_quantiser=BucketQuantiser(arrays["dot_edges"], arrays["dot_values"], scalar=True),
            dot_bucket_counts=arrays["dot_bucket_counts"],
            config={k[len("config_") :]: int(v) for k, v in arrays.items() if k.startswith("config_")},
        )

    def save(self, dest: str | os.PathLike[str] | BinaryIO) -> None:
        """Write one ``.npz`` to a path/URI (through fsspec) or a binary file object."""
        if isinstance(dest, (str, os.PathLike)):
            import fsspec

            with fsspec.open(os.fspath(dest), "wb") as f:
                np.savez(f, **self.to_arrays())
        else:
            np.savez(dest, **self.to_arrays())

    @classmethod
    def load(cls, src: str | os.PathLike[str] | BinaryIO) -> PcaQuantiser:
        if isinstance(src, (str, os.PathLike)):
            import fsspec

            with fsspec.open(os.fspath(src), "rb") as f:
                data = f.read()
            src = io.BytesIO(data)
        with np.load(src, allow_pickle=False) as npz:
            return cls.from_arrays({k: npz[k] for k in npz.files})

    def fingerprint(self) -> str:
        """sha256 over every saved array (name, dtype, shape, bytes): the artifact's version id."""
        h = hashlib.sha256()
        for name, arr in sorted(self.to_arrays().items()):
            arr = np.ascontiguousarray(arr)
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------------- fitting


class _Reservoir:
    """A uniform sample of at most ``capacity`` rows of a stream (Algorithm R), seeded, batch-wise."""

    def __init__(
        self, capacity: int, row_shape: tuple[int, ...], rng: np.random.Generator, dtype: type = np.float32
    ) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        # np.empty: pages are only committed as rows are written, so a small stream stays small.
        self.data = np.empty((capacity, *row_shape), dtype)

    def add(self, rows: np.ndarray) -> None:
        m = rows.shape[0]
        fill = max(0, min(m, self.capacity - self.seen))
        self.data[self.seen : self.seen + fill] = rows[:fill]
        rest = rows[fill:]
        if rest.shape[0]:
            # Row number t (0-based) replaces slot j ~ U[0, t] when j < capacity.
            t = np.arange(self.seen + fill, self.seen + m)
            slot = self.rng.integers(0, t + 1)
            hit = np.flatnonzero(slot < self.capacity)
            slots = slot[hit]
            # Sequential semantics within the batch: of several rows aimed at one slot, the last wins.
            uniq, first_in_reversed = np.unique(slots[::-1], return_index=True)
            last = hit[len(slots) - 1 - first_in_reversed]
            self.data[uniq] = rest[last]
        self.seen += m

    @property
    def sample(self) -> np.ndarray:
        return self.data[: min(self.seen, self.capacity)]


def fit_streaming_pca(
    image_batches: Iterable[np.ndarray], n_components: int, *, prefetch_batches: int = 1, **pca_kwargs: Any
) -> StreamingPCA:
    """Pass 1: the streaming PCA of a stream of [n, d] image-embedding batches."""
    pca = StreamingPCA(**pca_kwargs)
    for img in prefetch(image_batches, prefetch_batches):
        pca.partial_fit(img)
    return pca.finalize(n_components)


def fit_pca_quantiser(
    batches_factory: BatchesFactory,
    *,
    n_components: int = 319,
    n_buckets: int = 1024,
    dot_buckets: int = 1024,
    quantile_rows: int = 262144,
    dot_rows: int = DEFAULT_DOT_ROWS,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    prefetch_batches: int = 1,
) -> tuple[PcaQuantiser, dict[str, Any]]:
    """Fit the PCA and the bucket quantisers in one pass over the data.

    ``batches_factory()`` returns an iterator of ``(image_emb [n, d], text_emb [n, d])`` batches and is
    called once. The pass adds every image row to the PCA's sums, computes every text-image dot
    product, and keeps a seeded uniform reservoir of ``quantile_rows`` image rows as they were read.
    Once the PCA is solved, only that reservoir is projected for the bucket edges: the same rows, with
    the same seed, that a second pass projecting every row would have sampled (and at 1M rows a
    quarter of the projections). The PCA's reconstruction error and the rows' squared norm follow
    from the PCA's own sums.

    Memory: d x d for the PCA; the row reservoir, ``quantile_rows`` x d in the first batch's dtype
    (512 MiB at 262,144 float16 rows of 1,024), whose projections then take its place; ``dot_rows``
    float32 dot products; a ``chunk_rows`` x d float32 work buffer and ``prefetch_batches`` + 1 input
    batches (the next ones are read in a background thread); never the row count.
    """
    if quantile_rows < 1 or dot_rows < 1:
        raise ValueError("quantile_rows and dot_rows must be >= 1")
    rng_rows, rng_dots, rng_err = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    pca = StreamingPCA(chunk_rows=chunk_rows)
    rows_res: _Reservoir | None = None
    dots_res = _Reservoir(dot_rows, (), rng_dots)
    text_buf: np.ndarray | None = None
    # The next batch is read while this one goes through BLAS. BLAS keeps all its threads: with the page
    # reader a 1M-row pass spends about 1.5 s of one core reading against 7 s of both in casts and GEMMs,
    # and limiting BLAS to one core beside the reader (which paid off with Arrow's slower decoder) made it
    # 25-30% slower (measured, bench/bench_pca.py).
    for img, txt in prefetch(batches_factory(), prefetch_batches):
        img, txt = np.asarray(img), np.asarray(txt)
        if img.shape != txt.shape:
            raise ValueError(f"image batch {img.shape} and text batch {txt.shape} differ in shape")
        for rows, shifted in pca.accumulate(img):  # shifted = img[rows] - shift, float32
            if rows_res is None:
                # Rows are kept as read, in the first batch's dtype (float16 takes half the memory).
                keep = np.float16 if img.dtype == np.float16 else np.float32
                rows_res = _Reservoir(quantile_rows, (pca.dim,), rng_rows, dtype=keep)
                text_buf = np.empty((max(1, CAST_BLOCK_BYTES // (4 * pca.dim)), pca.dim), np.float32)
            dots_res.add(_row_dots(shifted, pca.shift, txt[rows], text_buf))
            rows_res.add(img[rows])
    pca.finalize(n_components)
    n_rows, d = pca.n_rows_, pca.dim

    z_sample = _project_sample(rows_res.sample, pca.mean_, pca.components_, chunk_rows)
    quantiser = BucketQuantiser.fit(z_sample, n_buckets)
    dot_sample = dots_res.sample
    dot_quantiser = BucketQuantiser.fit(dot_sample, dot_buckets)
    dot_counts = np.bincount(dot_quantiser.encode(dot_sample), minlength=dot_buckets).astype(np.int64)

    # Quantising moves a row inside the component subspace, orthogonally to the PCA residual, so
    # ||x - x_hat_q||^2 = ||x - x_hat||^2 + ||z - z_q||^2: the second term is estimated on a uniform
    # subsample of the reservoir, the first is the variance the PCA leaves out.
    n_err = min(z_sample.shape[0], QUANT_ERROR_ROWS)
    err_rows = np.sort(rng_err.choice(z_sample.shape[0], size=n_err, replace=False))
    q_err_total = quantiser.sum_squared_error(z_sample[err_rows]) / n_err * n_rows
    # The components are eigenvectors of the covariance, so the projections' squared norms sum to
    # (n - 1) times the kept eigenvalues; clipped at zero where the kept components reconstruct the
    # rows exactly (fewer rows than components) and the difference rounds to a tiny negative number.
    pca_err = max(0.0, (n_rows - 1) * (pca.total_variance_ - float(pca.explained_variance_.sum())))

    model = PcaQuantiser(
        mean=pca.mean_,
        components=pca.components_,
        explained_variance=pca.explained_variance_,
        spectrum=pca.spectrum_,
        total_variance=pca.total_variance_,
        quantiser=quantiser,
        dot_quantiser=dot_quantiser,
        dot_bucket_counts=dot_counts,
        config={
            "n_rows": n_rows,
            "dim": d,
            "n_components": n_components,
            "n_buckets": n_buckets,
            "dot_buckets": dot_buckets,
            "quantile_rows": quantile_rows,
            "dot_rows": dot_rows,
            "seed": seed,
        },
    )
    kept = float(pca.explained_variance_ratio_.sum())
    report = {
        "rows": n_rows,
        "dim": d,
        "n_components": n_components,
        "n_buckets": n_buckets,
        "dot_buckets": dot_buckets,
        "explained_variance_ratio_kept": kept,
        "relative_mse_pca_centred": max(0.0, 1.0 - kept),
        "relative_mse_pca": pca_err / pca.sum_sq_norm_,
        "relative_mse_pca_quantised": (pca_err + q_err_total) / pca.sum_sq_norm_,
        "quantiser_sample_rows": int(z_sample.shape[0]),
        "quantisation_error_rows": n_err,
        "dot_sample_rows": int(dot_sample.shape[0]),
        "dot_edges_min": float(dot_quantiser.edges.min()),
        "dot_edges_max": float(dot_quantiser.edges.max()),
        "dot_median": float(np.median(dot_sample)),
        "median_dot_bucket": model.median_dot_bucket,
        "fingerprint": model.fingerprint(),
    }
    return model, report


def _row_dots(shifted: np.ndarray, shift: np.ndarray, txt: np.ndarray, work: np.ndarray) -> np.ndarray:
    """x.t for each image row x = ``shifted`` + ``shift`` and text row of ``txt`` [m, d]: [m] float32.

    x.t = (x - shift).t + shift.t, from the image rows already cast for the scatter. The text rows are
    cast a block at a time into ``work`` (a few hundred KiB, which stays in cache) and used there at
    once: casting them all first and reading them back for the two products took twice as long.
    """
    out = np.empty(shifted.shape[0], np.float32)
    for rows in _row_chunks(shifted.shape[0], work.shape[0]):
        text = _cast_float32(txt[rows], work[: rows.stop - rows.start])
        out[rows] = np.einsum("ij,ij->i", shifted[rows], text) + np.einsum("ij,j->i", text, shift)
    return out


def _project_sample(rows: np.ndarray, mean: np.ndarray, components: np.ndarray, chunk_rows: int) -> np.ndarray:
    """Project a sample of rows [m, d] to [m, k] float32, in the memory of ``rows`` where it fits.

    The row reservoir is the largest allocation of the fit, and it is not needed once projected. A
    projected row takes 4k bytes and a stored one d * itemsize, so with 4k <= d * itemsize (319
    components of 1,024 float16 dimensions) row i's projection ends before row i + 1 begins: writing
    each chunk's projections after reading the chunk never overwrites a row still to be read.
    """
    m, d = rows.shape
    k = components.shape[0]
    if rows.flags.c_contiguous and 4 * k <= d * rows.itemsize and rows.nbytes % 4 == 0:
        out = rows.reshape(-1).view(np.float32)[: m * k].reshape(m, k)
    else:
        out = np.empty((m, k), np.float32)
    centred = np.empty((min(m, chunk_rows), d), np.float32)  # reused: fresh 64 MiB arrays cost page faults
    for chunk in _row_chunks(m, chunk_rows):
        c = _cast_float32(rows[chunk], centred[: chunk.stop - chunk.start], minus=mean)
        np.matmul(c, components.T, out=out[chunk])
    return out


# ------------------------------------------------------------------------------------------ report


def explained_variance_plot_png(spectrum_ratio: np.ndarray, n_components: int) -> bytes:
    """PNG (640x400) of the cumulative explained-variance curve, a line at ``n_components``."""
    # The Agg canvas directly, not pyplot: no global backend switch and no figure registry, so it is
    # safe in a worker thread of a process that plots elsewhere.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratio = np.asarray(spectrum_ratio, np.float64)
    cumulative = np.cumsum(ratio)
    kept = float(cumulative[n_components - 1])
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(np.arange(1, ratio.shape[0] + 1), cumulative, lw=1.5)
    ax.axvline(n_components, color="tab:red", ls="--", lw=1)
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(0, ratio.shape[0])
    ax.grid(alpha=0.3)
    ax.set_title(f"{n_components} of {ratio.shape[0]} components keep {kept:.2%} of the variance")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
