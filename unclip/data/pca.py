"""The AR prior's target representation: PCA of the CLIP image embeddings and its bucket quantiser.

unCLIP (Ramesh et al. 2022), section 2.1, "Prior": the autoregressive prior predicts the CLIP image
embedding reduced by PCA to 319 of its 1,024 dimensions (nearly all of the information is kept),
principal components ordered by decreasing eigenvalue, each dimension quantised into 1,024 discrete
buckets. The prior is also conditioned on a quantised text-image dot product, which at sampling time
is drawn from the upper half of its training distribution.

Everything here is fitted out of core, in memory bounded by the dimension and the batch size, never by
the row count (the paper-scale run has 650M rows): pass 1 accumulates the scatter matrix for the PCA,
pass 2 projects every row and keeps a seeded uniform reservoir of projected rows and dot products for
the bucket edges. Pure numpy (the rows come from ``unclip.data.embeddings``); fsspec in ``PcaQuantiser.save``/``load``; matplotlib only in the plot helper.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator, TypeVar

import numpy as np

FORMAT_VERSION = 1
# Rows per BLAS call: large enough for GEMM to run near peak, small enough that the float32 work
# buffer (64 MiB at d=1024) and not the caller's batch size bounds the extra memory.
DEFAULT_CHUNK_ROWS = 16384
# Dot products are scalars (4 bytes each), so a few million of them are kept outright; beyond that
# they are reservoir-sampled like the projected rows.
DEFAULT_DOT_ROWS = 1 << 22
# Rows on which the quantisation error is estimated: its standard error is already far below 1%.
QUANT_ERROR_ROWS = 65536

BatchesFactory = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
T = TypeVar("T")


def _row_chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer.

    Reading (file reads and page copies, or Arrow's decoder) drops the GIL, so the next batch is read
    while this one goes through BLAS. BLAS keeps all its threads: with the page reader a 1M-row pass
    spends about 1.5 s of one core reading against 7 s of both in casts and GEMMs, and limiting BLAS
    to one core beside the reader (which paid off with Arrow's slower decoder) made it 25-30% slower
    (measured, bench/bench_pca.py). Memory grows by ``depth`` + 1 batches. Errors in the producer are
    raised here.
    """
    if depth < 1:
        yield from items
        return
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:  # handed to the consumer, which raises it
            put("error", exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # an early stop still closes the producer's files, in its own thread

    worker = threading.Thread(target=produce, name="pca-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


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

    @property
    def dim(self) -> int | None:
        return None if self._sum is None else int(self._sum.shape[0])

    def partial_fit(self, x: np.ndarray) -> StreamingPCA:
        """Add a batch of rows [n, d] (float16 or float32) to the sums."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D batch [n, d], got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        d = x.shape[1]
        if self._sum is None:
            self._shift = x[: self.chunk_rows].mean(axis=0, dtype=np.float64).astype(self.gemm_dtype)
            self._sum = np.zeros(d, np.float64)
            self._scatter = np.zeros((d, d), np.float64)
            self._buf = np.empty((self.chunk_rows, d), self.gemm_dtype)
            self._ones = np.ones(self.chunk_rows, self.gemm_dtype)
        elif d != self.dim:
            raise ValueError(f"batch has {d} columns, earlier batches had {self.dim}")
        for rows in _row_chunks(x.shape[0], self.chunk_rows):
            m = rows.stop - rows.start
            buf = self._buf[:m]
            # Cast (float16 -> float32) and shift in one pass into the reused buffer.
            np.subtract(x[rows], self._shift, out=buf, dtype=self.gemm_dtype, casting="same_kind")
            self._scatter += buf.T @ buf
            self._sum += self._ones[:m] @ buf
            self.n_rows_ += m
        return self

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
        eigvals, eigvecs = np.linalg.eigh(cov)
        eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
        self.total_variance_ = float(np.trace(cov))
        self.spectrum_ = np.clip(eigvals, 0.0, None)  # rounding can leave tiny negative eigenvalues
        self.mean_ = (self._shift.astype(np.float64) + centre).astype(np.float32)
        self.components_ = _sign_flip(eigvecs[:, :n_components].T).astype(np.float32)
        self.explained_variance_ = self.spectrum_[:n_components].copy()
        self.explained_variance_ratio_ = self.explained_variance_ / self.total_variance_
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
    centred = np.subtract(x, mean, dtype=np.float32, casting="same_kind")
    return centred @ components.T


# --------------------------------------------------------------------------------------- quantiser


def _code_dtype(n_buckets: int) -> np.dtype:
    return np.dtype(np.int16) if n_buckets <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


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
            block = np.sort(np.ascontiguousarray(sample[:, cols].T, dtype=np.float32), axis=1)
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

    def __init__(self, capacity: int, row_shape: tuple[int, ...], rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        # np.empty: pages are only committed as rows are written, so a small stream stays small.
        self.data = np.empty((capacity, *row_shape), np.float32)

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
    image_batches_factory: Callable[[], Iterable[np.ndarray]] | None = None,
) -> tuple[PcaQuantiser, dict[str, Any]]:
    """Fit the PCA (pass 1) and the bucket quantisers (pass 2) over two identical passes of the data.

    ``batches_factory()`` returns a fresh iterator of ``(image_emb [n, d], text_emb [n, d])`` batches
    and is called twice; both calls must yield the same rows (checked on the row count and mean).
    ``image_batches_factory()``, if given, replaces it in pass 1 and yields the image batches alone,
    so that a Parquet reader need not decode the text column for nothing.

    Memory: d x d for the PCA, ``quantile_rows`` x ``n_components`` and ``dot_rows`` float32 for the
    reservoirs, ``chunk_rows`` x d work buffers and ``prefetch_batches`` + 1 input batches (the next
    ones are read in a background thread); never the row count.
    """
    if quantile_rows < 1 or dot_rows < 1:
        raise ValueError("quantile_rows and dot_rows must be >= 1")
    if image_batches_factory is None:
        image_batches = (img for img, _ in batches_factory())
    else:
        image_batches = iter(image_batches_factory())
    pca = fit_streaming_pca(image_batches, n_components, prefetch_batches=prefetch_batches, chunk_rows=chunk_rows)
    n_rows, d = pca.n_rows_, pca.dim

    rng_rows, rng_dots, rng_err = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    rows_res = _Reservoir(quantile_rows, (n_components,), rng_rows)
    dots_res = _Reservoir(dot_rows, (), rng_dots)
    sums = _project_pass(prefetch(batches_factory(), prefetch_batches), pca, rows_res, dots_res, chunk_rows)
    _check_same_rows(pca, sums)

    z_sample = rows_res.sample
    quantiser = BucketQuantiser.fit(z_sample, n_buckets)
    dot_quantiser = BucketQuantiser.fit(dots_res.sample, dot_buckets)
    dot_counts = np.bincount(dot_quantiser.encode(dots_res.sample), minlength=dot_buckets).astype(np.int64)

    # Quantising moves a row inside the component subspace, orthogonally to the PCA residual, so
    # ||x - x_hat_q||^2 = ||x - x_hat||^2 + ||z - z_q||^2: the second term is estimated on a uniform
    # subsample of the reservoir (encoding is the slow part), and the data are not read a third time.
    n_err = min(z_sample.shape[0], QUANT_ERROR_ROWS)
    err_rows = np.sort(rng_err.choice(z_sample.shape[0], size=n_err, replace=False))
    q_err = 0.0
    for rows in _row_chunks(n_err, chunk_rows):
        zs = z_sample[err_rows[rows]]
        dz = zs - quantiser.decode(quantiser.encode(zs))
        q_err += float(np.einsum("ij,ij->", dz, dz, dtype=np.float64))
    q_err_total = q_err / n_err * n_rows

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
    # sq_err is accumulated as ||x||^2 - ||z||^2 (Pythagoras), which rounds to a tiny negative number
    # when the kept components reconstruct the rows exactly (fewer rows than components)
    pca_err = max(0.0, sums.sq_err)
    report = {
        "rows": n_rows,
        "dim": d,
        "n_components": n_components,
        "n_buckets": n_buckets,
        "dot_buckets": dot_buckets,
        "explained_variance_ratio_kept": kept,
        "relative_mse_pca_centred": max(0.0, 1.0 - kept),
        "relative_mse_pca": pca_err / sums.sq_norm,
        "relative_mse_pca_quantised": (pca_err + q_err_total) / sums.sq_norm,
        "quantiser_sample_rows": int(z_sample.shape[0]),
        "quantisation_error_rows": n_err,
        "dot_sample_rows": int(dots_res.sample.shape[0]),
        "dot_edges_min": float(dot_quantiser.edges.min()),
        "dot_edges_max": float(dot_quantiser.edges.max()),
        "dot_median": float(np.median(dots_res.sample)),
        "median_dot_bucket": model.median_dot_bucket,
        "fingerprint": model.fingerprint(),
    }
    return model, report


@dataclass
class _PassSums:
    """What pass 2 adds up on the way (float64), besides filling the reservoirs."""

    rows: int = 0
    sq_err: float = 0.0  # sum ||x - x_hat||^2, the PCA's reconstruction error
    sq_norm: float = 0.0  # sum ||x||^2
    centred_sum: np.ndarray | None = None  # [d] sum of (x - mean): zero if pass 1 saw the same rows


def _project_pass(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    pca: StreamingPCA,
    rows_res: _Reservoir,
    dots_res: _Reservoir,
    chunk_rows: int,
) -> _PassSums:
    """Pass 2: project every row, sample projections and dot products, sum the reconstruction error."""
    mean, comps = pca.mean_, pca.components_
    d = mean.shape[0]
    mean_sq = float(np.dot(mean.astype(np.float64), mean))
    sums = _PassSums(centred_sum=np.zeros(d, np.float64))
    centred_buf = np.empty((chunk_rows, d), np.float32)  # reused: fresh 64 MiB arrays cost page faults
    text_buf = np.empty((chunk_rows, d), np.float32)
    ones = np.ones(chunk_rows, np.float32)
    for img, txt in batches:
        if img.shape != txt.shape:
            raise ValueError(f"image batch {img.shape} and text batch {txt.shape} differ in shape")
        for rows in _row_chunks(img.shape[0], chunk_rows):
            m = rows.stop - rows.start
            centred = np.subtract(img[rows], mean, out=centred_buf[:m], dtype=np.float32, casting="same_kind")
            z = centred @ comps.T  # [m, k]
            # The components are orthonormal, so ||x - x_hat||^2 = ||x - mean||^2 - ||z||^2 row by row:
            # no inverse transform, which would cost as much as the projection.
            c_sq = np.einsum("ij,ij->i", centred, centred)  # [m]
            sums.sq_err += float(np.sum(c_sq, dtype=np.float64) - np.einsum("ij,ij->", z, z, dtype=np.float64))
            # ||x||^2 = ||x - mean||^2 + 2 (x - mean).mean + ||mean||^2
            c_mean = centred @ mean  # [m]
            sums.sq_norm += float(np.sum(c_sq, dtype=np.float64) + 2 * np.sum(c_mean, dtype=np.float64)) + mean_sq * m
            sums.centred_sum += ones[:m] @ centred
            text = text_buf[:m]
            np.copyto(text, txt[rows], casting="same_kind")
            rows_res.add(z)
            dots_res.add(np.einsum("ij,ij->i", centred, text) + text @ mean)  # x.t = (x - mean).t + mean.t
            sums.rows += m
    return sums


def _check_same_rows(pca: StreamingPCA, sums: _PassSums) -> None:
    """Pass 2 must see pass 1's rows: a factory that reshuffles or resamples would skew the buckets."""
    if sums.rows != pca.n_rows_:
        raise ValueError(f"pass 2 saw {sums.rows} rows, pass 1 saw {pca.n_rows_}: the factory is not repeatable")
    # Tolerance well above float error, well below the mean's sampling noise for another sample.
    spread = np.sqrt(pca.total_variance_ / pca.dim)
    tol = 1e-5 * (float(np.abs(pca.mean_).max()) + spread)
    diff = float(np.abs(sums.centred_sum / sums.rows).max())
    if diff > tol:
        raise ValueError(f"pass 2's mean differs from pass 1's by {diff:.3g}: the factory is not repeatable")


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
