"""Benchmark: the AR prior's PCA + quantiser fit (unclip.data.pca) against one streaming pass and scikit-learn.

unCLIP section 2.1 reduces 1,024-d CLIP image embeddings to 319 principal components, each quantised
into 1,024 buckets; the project fits both out of core over Parquet shards. This script synthesises
unit-norm embedding shards once (10,000 rows per file, ``image_emb``/``text_emb`` as
``fixed_size_list<float16, 1024>``, a power-law spectrum so that 319 components keep most of the
variance, and one held-out shard of the same distribution), then measures, each run in a fresh
subprocess so that peak RSS is per method, every time reading the shards included:

- ``read``:      one streaming pass that reads both columns and computes nothing (the I/O floor);
- ``one_pass``:  one streaming pass of the PCA, ``fit_streaming_pca``: read the image column,
  accumulate the scatter matrix, ``eigh`` (the reference the full fit is measured against);
- ``full``:      the whole ``fit_pca_quantiser``: PCA, bucket edges for 319 x 1,024 buckets, the
  dot-product buckets and the error estimates; its model is then scored, untimed, on the held-out
  shard (relative MSE after quantising, codes round trip);
- ``sklearn_eigh``: read the rows into one float32 array, then
  ``PCA(n_components=319, svd_solver="covariance_eigh").fit``, scikit-learn's fastest in-memory solver
  here and exact, like ours;
- ``sklearn_auto``: the same with scikit-learn's default ``svd_solver="auto"`` (randomized at 1,024
  features), which also underestimates the kept variance slightly;
- ``one_pass_mem`` (only with ``--methods``): the PCA pass from rows already read into memory.

Repeats alternate between the methods (round 1 runs each method once, then round 2, ...), each
ratio is taken within a round and the medians over rounds are printed: on a shared machine a busy
neighbour then slows both sides of a ratio alike. Run by hand, not in the test suite:

    .venv/bin/python bench/bench_pca.py --rows 100000 1000000 --repeat 3

It prints a table and the ratios and writes nothing but the synthetic data under ``--data-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS_PER_FILE = 10_000
DIM = 1024
N_COMPONENTS = 319
BATCH_ROWS = 65_536
# Changing how the data are made invalidates an existing data dir (checked against spec.json).
# Written like the embed stage writes embeddings (unclip.data.embeddings.EMBEDDING_PARQUET_OPTIONS: the
# embedding columns uncompressed, no dictionary).
SPEC = {"version": 2, "rows_per_file": ROWS_PER_FILE, "dim": DIM, "spectrum_power": 1.5,
        "dtype": "float16", "compression": "none", "use_dictionary": False}


# ------------------------------------------------------------------------------------------ data


def _basis() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    # Variance i^-1.5: 319 of 1024 components hold about 98% of it, the regime the paper reports.
    scales = np.arange(1, DIM + 1, dtype=np.float64) ** (-SPEC["spectrum_power"] / 2)
    scales *= 0.5 / np.sqrt(np.sum(scales**2))  # spread about 0.5 against a common direction of 1
    common = rng.standard_normal(DIM)
    return basis.astype(np.float32), scales.astype(np.float32), (common / np.linalg.norm(common)).astype(np.float32)


def _shard(index: int, basis: np.ndarray, scales: np.ndarray, common: np.ndarray):
    import pyarrow as pa

    rng = np.random.default_rng(index)
    img = common + (rng.standard_normal((ROWS_PER_FILE, DIM), dtype=np.float32) * scales) @ basis.T
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    noise = rng.standard_normal((ROWS_PER_FILE, DIM), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    txt = 0.3 * img + np.sqrt(1 - 0.3**2) * noise  # CLIP-like text-image cosine around 0.3
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    col = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.float16).ravel()), DIM)  # noqa: E731
    return pa.table({"image_emb": col(img), "text_emb": col(txt)})


def ensure_data(data_dir: Path, rows: int) -> list[tuple[str, int]]:
    """Shards for ``rows`` rows, made one at a time (memory of one shard), kept across runs."""
    import pyarrow.parquet as pq

    data_dir.mkdir(parents=True, exist_ok=True)
    spec_path = data_dir / "spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != SPEC:
        sys.exit(f"{data_dir} holds data made with another spec; delete it or pass another --data-dir")
    spec_path.write_text(json.dumps(SPEC))
    n_files = -(-rows // ROWS_PER_FILE)
    basis = None
    made = 0
    t0 = time.perf_counter()
    files = []
    for i in range(n_files):
        path = data_dir / f"shard-{i:05d}.parquet"
        if not path.exists():
            if basis is None:
                basis = _basis()
            tmp = path.with_suffix(".tmp")
            pq.write_table(_shard(i, *basis), tmp, compression=SPEC["compression"], use_dictionary=False)
            tmp.rename(path)
            made += 1
        files.append((str(path), ROWS_PER_FILE))
    if made:
        print(f"# made {made} shards in {time.perf_counter() - t0:.1f} s under {data_dir}", flush=True)
    return files


def ensure_heldout(data_dir: Path) -> str:
    """One shard of the same distribution that no fit reads (seeded apart from the fitting shards)."""
    import pyarrow.parquet as pq

    path = data_dir / "heldout-00000.parquet"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        pq.write_table(_shard(1_000_000, *_basis()), tmp, compression=SPEC["compression"], use_dictionary=False)
        tmp.rename(path)
    return str(path)


# ---------------------------------------------------------------------------------------- children


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _read_into(x: np.ndarray, batches) -> None:
    at = 0
    for img in batches:
        x[at : at + img.shape[0]] = img
        at += img.shape[0]
    assert at == x.shape[0]


def _score_heldout(model, data_dir: Path) -> dict:
    """The fitted model on rows it never saw: what the AR prior's targets lose to PCA and buckets."""
    from unclip.data.embeddings import iter_embedding_batches

    path = ensure_heldout(data_dir)
    (x,) = next(iter_embedding_batches([(path, ROWS_PER_FILE)], batch_rows=ROWS_PER_FILE, max_rows=ROWS_PER_FILE,
                                       seed=0, columns=("image_emb",)))
    x64 = x.astype(np.float64)
    codes = model.encode(x)
    x_pca = model.project(x) @ model.components + model.mean
    x_q = model.decode(codes)
    norm = float(np.sum(x64 * x64))
    return {
        "heldout_relative_mse_pca": float(np.sum((x64 - x_pca) ** 2)) / norm,
        "heldout_relative_mse_pca_quantised": float(np.sum((x64 - x_q) ** 2)) / norm,
        "heldout_codes_round_trip": bool(np.array_equal(model.quantiser.encode(model.quantiser.decode(codes)), codes)),
    }


def child(method: str, rows: int, data_dir: Path) -> dict:
    from unclip.data.embeddings import iter_embedding_batches
    from unclip.data.pca import fit_pca_quantiser, fit_streaming_pca

    files = ensure_data(data_dir, rows)
    both = lambda: iter_embedding_batches(files, batch_rows=BATCH_ROWS, max_rows=rows, seed=0)  # noqa: E731
    images = lambda: (b[0] for b in iter_embedding_batches(  # noqa: E731
        files, batch_rows=BATCH_ROWS, max_rows=rows, seed=0, columns=("image_emb",)))
    out: dict = {"method": method, "rows": rows}
    t0 = time.perf_counter()
    if method == "read":
        n = sum(img.shape[0] for img, _ in both())
        out["seconds"] = time.perf_counter() - t0
        assert n == rows
    elif method == "one_pass":
        pca = fit_streaming_pca(images(), N_COMPONENTS)
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = float(pca.explained_variance_ratio_.sum())
    elif method == "one_pass_mem":
        # The same fit from rows already in memory (float16, as stored): the compute alone.
        x = np.empty((rows, DIM), np.float16)
        _read_into(x, images())
        out["read_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pca = fit_streaming_pca((x[i : i + BATCH_ROWS] for i in range(0, rows, BATCH_ROWS)), N_COMPONENTS, prefetch_batches=0)
        out["fit_seconds"] = time.perf_counter() - t1
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = float(pca.explained_variance_ratio_.sum())
    elif method == "full":
        # As the PCA stage calls it: one pass over both columns.
        model, report = fit_pca_quantiser(both, n_components=N_COMPONENTS)
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = report["explained_variance_ratio_kept"]
        out["relative_mse_pca"] = report["relative_mse_pca"]
        out["relative_mse_pca_quantised"] = report["relative_mse_pca_quantised"]
        out["peak_rss_mib"] = _peak_rss_mib()  # before scoring, which holds the held-out shard
        out.update(_score_heldout(model, data_dir))
    elif method in ("sklearn_eigh", "sklearn_auto"):
        from sklearn.decomposition import PCA

        x = np.empty((rows, DIM), np.float32)
        _read_into(x, images())
        out["read_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        solver = "covariance_eigh" if method == "sklearn_eigh" else "auto"
        pca = PCA(n_components=N_COMPONENTS, svd_solver=solver, random_state=0).fit(x)
        out["fit_seconds"] = time.perf_counter() - t1
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = float(pca.explained_variance_ratio_.sum())
        out["solver"] = pca._fit_svd_solver
    else:
        raise ValueError(method)
    out.setdefault("peak_rss_mib", _peak_rss_mib())
    return out


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat, all processes)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_child(method: str, rows: int, data_dir: Path) -> dict:
    """One measurement in a fresh interpreter; also how many cores other processes kept busy meanwhile
    (the machine is shared: a busy neighbour shows up here rather than as a silently slower number)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", method, "--rows", str(rows), "--data-dir", str(data_dir)]
    busy0, own0, t0 = _busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{method} at {rows} rows failed:\n{proc.stderr}")
    own = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["other_cores"] = max(0.0, (_busy_cpu_seconds() - busy0 - own) / wall)
    return out


def warm_page_cache(paths: list[str]) -> float:
    """Read the shards' bytes once, so that no method pays for a cold disk and the others not."""
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- main

DEFAULT_METHODS = ["read", "one_pass", "full", "sklearn_eigh", "sklearn_auto"]
SKLEARN = {"sklearn_eigh", "sklearn_auto"}


def _median(values: list[float]) -> float:
    return float(np.median(values))


def summarise(rows: int, runs: dict[str, list[dict]]) -> None:
    """The table for one size: per method the median over rounds, then ratios taken within each round."""
    print(f"\n# {rows} rows: medians of {len(next(iter(runs.values())))} rounds")
    print(f"{'rows':>9} {'method':<13} {'read s':>7} {'fit s':>7} {'total s':>8} {'peak RSS MiB':>13} "
          f"{'kept var':>9} {'others':>6}  all runs (s)")
    def med(rs: list[dict], key: str) -> float | None:
        return _median([r[key] for r in rs]) if key in rs[0] else None

    for method, rs in runs.items():
        read, fit, kept = med(rs, "read_seconds"), med(rs, "fit_seconds"), med(rs, "kept")
        extra = f"  solver={rs[0]['solver']}" if "solver" in rs[0] else ""
        print(f"{rows:>9} {method:<13} {'-' if read is None else f'{read:.2f}':>7} {'-' if fit is None else f'{fit:.2f}':>7} "
              f"{med(rs, 'seconds'):8.2f} {med(rs, 'peak_rss_mib'):13.0f} {'-' if kept is None else f'{kept:.5f}':>9} "
              f"{med(rs, 'other_cores'):6.2f}  {[round(r['seconds'], 2) for r in rs]}{extra}")
    if "one_pass" not in runs:
        return
    base = runs["one_pass"]
    print(f"# {rows} rows, ratios against one_pass (median of per-round ratios, then each round's):")
    for method, rs in runs.items():
        if method == "one_pass":
            continue
        ratios = [r["seconds"] / b["seconds"] for r, b in zip(rs, base)]
        print(f"{'':>10}{method:<13} / one_pass {_median(ratios):5.2f}x  {[round(x, 2) for x in ratios]}")
    if "read" in runs:
        ratios = [b["seconds"] / r["seconds"] for r, b in zip(runs["read"], base)]
        print(f"{'':>10}{'one_pass':<13} / read     {_median(ratios):5.2f}x  {[round(x, 2) for x in ratios]}")
    kept = _median([r["kept"] for r in base])
    for method in ("full", "sklearn_eigh", "sklearn_auto"):
        if method in runs:
            print(f"{'':>10}kept variance {method:<13} - one_pass {_median([r['kept'] for r in runs[method]]) - kept:+.1e}")
    if "full" in runs:
        full = runs["full"]
        q = {k: _median([r[k] for r in full]) for k in ("relative_mse_pca", "relative_mse_pca_quantised",
                                                         "heldout_relative_mse_pca", "heldout_relative_mse_pca_quantised")}
        print(f"{'':>10}full fit: relative MSE PCA {q['relative_mse_pca']:.5f}, quantised {q['relative_mse_pca_quantised']:.5f} "
              f"(estimates over the fitted rows); on the held-out shard {q['heldout_relative_mse_pca']:.5f} and "
              f"{q['heldout_relative_mse_pca_quantised']:.5f}; codes round trip: {all(r['heldout_codes_round_trip'] for r in full)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "pca-data")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                    choices=[*DEFAULT_METHODS, "one_pass_mem"], help="What to measure (default: all but one_pass_mem).")
    ap.add_argument("--skip-sklearn-above", type=int, default=None, metavar="N",
                    help="Leave scikit-learn out for row counts above N (it holds every row in memory: 12 GB at 1M).")
    ap.add_argument("--repeat", type=int, default=3, help="Rounds per size; medians are reported.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows[0], args.data_dir)))
        return

    import sklearn

    print(f"# numpy {np.__version__}, scikit-learn {sklearn.__version__}, {os.cpu_count()} CPUs, "
          f"{N_COMPONENTS} of {DIM} components, {ROWS_PER_FILE} rows per shard, data {args.data_dir}")
    print(f"# shards: {SPEC}")
    print("# others = CPU cores kept busy by other processes during a run (the machine is shared)", flush=True)
    files = ensure_data(args.data_dir, max(args.rows))
    heldout = ensure_heldout(args.data_dir)
    for rows in args.rows:
        methods = [m for m in args.methods
                   if m not in SKLEARN or args.skip_sklearn_above is None or rows <= args.skip_sklearn_above]
        used = [path for path, _ in files[: -(-rows // ROWS_PER_FILE)]]
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for round_ in range(args.repeat):
            print(f"# {rows} rows, round {round_ + 1}: page cache warmed in {warm_page_cache([*used, heldout]):.1f} s;",
                  end="", flush=True)
            for method in methods:  # one at a time: the scikit-learn children need up to 12 GB at 1M rows
                runs[method].append(run_child(method, rows, args.data_dir))
                print(f" {method} {runs[method][-1]['seconds']:.2f} s", end="", flush=True)
            print(flush=True)
        summarise(rows, runs)


if __name__ == "__main__":
    main()
