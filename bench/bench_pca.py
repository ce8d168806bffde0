"""Benchmark: the AR prior's streaming PCA fit (unclip.data.pca) against scikit-learn's in-memory PCA.

unCLIP section 2.1 reduces 1,024-d CLIP image embeddings to 319 principal components; the project fits
that PCA out of core over Parquet shards. This script synthesises unit-norm embedding shards once
(10,000 rows per file, ``image_emb``/``text_emb`` as ``fixed_size_list<float16, 1024>``, a power-law
spectrum so that 319 components keep most of the variance), then measures, each in a fresh subprocess
so that peak RSS is per method:

- ``ours_pca``:  pass 1 of ``fit_pca_quantiser`` alone (read the image column, scatter, eigh);
- ``ours_full``: the whole ``fit_pca_quantiser`` (PCA, projections, reservoirs, bucket edges);
- ``ours_pca_mem``: pass 1 from rows already read into memory (float16), the compute alone;
- ``sklearn``:   read the same rows into one float32 array, then ``PCA(n_components=319).fit``
  (``svd_solver="auto"``, which is the randomized solver at 1,024 features);
- ``sklearn_exact``: the same with ``svd_solver="covariance_eigh"``, the exact in-memory counterpart
  of ours, to check the kept variance (the randomized solver underestimates it slightly).

Run by hand, not in the test suite:

    .venv/bin/python bench/bench_pca.py --rows 100000 1000000

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


# ---------------------------------------------------------------------------------------- children


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(method: str, rows: int, data_dir: Path) -> dict:
    from unclip.data.embeddings import iter_embedding_batches
    from unclip.data.pca import fit_streaming_pca, fit_pca_quantiser

    files = ensure_data(data_dir, rows)
    images = lambda: (b[0] for b in iter_embedding_batches(  # noqa: E731
        files, batch_rows=BATCH_ROWS, max_rows=rows, seed=0, columns=("image_emb",)))
    out: dict = {"method": method, "rows": rows}
    t0 = time.perf_counter()
    if method == "ours_pca":
        pca = fit_streaming_pca(images(), N_COMPONENTS)
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = float(pca.explained_variance_ratio_.sum())
    elif method == "ours_pca_mem":
        # The same fit from rows already in memory (float16, as stored): the compute alone, to set
        # beside scikit-learn's fit time, which does not read either.
        x = np.empty((rows, DIM), np.float16)
        at = 0
        for img in images():
            x[at : at + img.shape[0]] = img
            at += img.shape[0]
        out["read_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pca = fit_streaming_pca((x[i : i + BATCH_ROWS] for i in range(0, rows, BATCH_ROWS)), N_COMPONENTS, prefetch_batches=0)
        out["fit_seconds"] = time.perf_counter() - t1
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = float(pca.explained_variance_ratio_.sum())
    elif method == "ours_full":
        both = lambda: iter_embedding_batches(files, batch_rows=BATCH_ROWS, max_rows=rows, seed=0)  # noqa: E731
        _, report = fit_pca_quantiser(both, image_batches_factory=images, n_components=N_COMPONENTS)
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = report["explained_variance_ratio_kept"]
        out["relative_mse_pca"] = report["relative_mse_pca"]
        out["relative_mse_pca_quantised"] = report["relative_mse_pca_quantised"]
    elif method in ("sklearn", "sklearn_exact"):
        from sklearn.decomposition import PCA

        x = np.empty((rows, DIM), np.float32)
        at = 0
        for img in images():
            x[at : at + img.shape[0]] = img
            at += img.shape[0]
        assert at == rows
        out["read_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        # "auto" picks the randomized solver here (1,024 > 1,000 features); "covariance_eigh" is the
        # exact in-memory counterpart of ours and is run to check the kept variance.
        solver = "auto" if method == "sklearn" else "covariance_eigh"
        pca = PCA(n_components=N_COMPONENTS, svd_solver=solver, random_state=0).fit(x)
        out["fit_seconds"] = time.perf_counter() - t1
        out["seconds"] = time.perf_counter() - t0
        out["kept"] = float(pca.explained_variance_ratio_.sum())
        out["solver"] = pca._fit_svd_solver
    else:
        raise ValueError(method)
    out["peak_rss_mib"] = _peak_rss_mib()
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


def best_of(repeat: int, method: str, rows: int, data_dir: Path) -> dict:
    """The fastest of ``repeat`` runs (noise from a shared machine only ever adds time)."""
    runs = [run_child(method, rows, data_dir) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    best["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    return best


def warm_page_cache(files: list[tuple[str, int]]) -> float:
    """Read the shards' bytes once, so that no method pays for a cold disk and the others not."""
    t0 = time.perf_counter()
    for path, _ in files:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "pca-data")
    ap.add_argument("--skip-sklearn-above", type=int, default=None, metavar="N",
                    help="Leave scikit-learn out for row counts above N (it holds every row in memory).")
    ap.add_argument("--repeat", type=int, default=1, help="Runs per method and size; the fastest is reported.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows[0], args.data_dir)))
        return

    import sklearn

    print(f"# numpy {np.__version__}, scikit-learn {sklearn.__version__}, {os.cpu_count()} CPUs, "
          f"{N_COMPONENTS} of {DIM} components, {ROWS_PER_FILE} rows per shard, data {args.data_dir}")
    print(f"# shards: {SPEC}")
    print("# others = CPU cores kept busy by other processes during the fastest run (the machine is shared)")
    files = ensure_data(args.data_dir, max(args.rows))
    results: dict[int, dict[str, dict]] = {}
    header = (f"{'rows':>9} {'method':<13} {'read s':>7} {'fit s':>7} {'total s':>8} {'peak RSS MiB':>13} "
              f"{'kept var':>9} {'others':>6}  all runs (s)")
    print(header, flush=True)
    for rows in args.rows:
        print(f"# {rows} rows: page cache warmed in {warm_page_cache(files[: -(-rows // ROWS_PER_FILE)]):.1f} s", flush=True)
        methods = ["ours_pca", "ours_full", "ours_pca_mem"]
        if args.skip_sklearn_above is None or rows <= args.skip_sklearn_above:
            methods += ["sklearn", "sklearn_exact"]
        results[rows] = {}
        for method in methods:  # one at a time: the scikit-learn child alone needs ~12 GB at 1M rows
            r = best_of(args.repeat, method, rows, args.data_dir)
            results[rows][method] = r
            read = f"{r['read_seconds']:7.2f}" if "read_seconds" in r else f"{'-':>7}"
            fit = f"{r['fit_seconds']:7.2f}" if "fit_seconds" in r else f"{'-':>7}"
            extra = f"  solver={r['solver']}" if "solver" in r else ""
            if "relative_mse_pca" in r:
                extra = f"  rel. MSE pca {r['relative_mse_pca']:.4f}, quantised {r['relative_mse_pca_quantised']:.4f}"
            print(f"{rows:>9} {method:<13} {read} {fit} {r['seconds']:8.2f} {r['peak_rss_mib']:13.0f} "
                  f"{r['kept']:9.5f} {r['other_cores']:6.2f}  {r['all_seconds']}{extra}", flush=True)

    print("\n# ratios (ours_pca and ours_full include reading the Parquet shards)")
    for rows, res in results.items():
        ours, full = res["ours_pca"], res["ours_full"]
        print(f"{rows:>9} rows: peak RSS ours_pca {ours['peak_rss_mib']:.0f} MiB, ours_full {full['peak_rss_mib']:.0f} MiB")
        if "sklearn" in res:
            sk, exact = res["sklearn"], res["sklearn_exact"]
            print(f"{'':>15}sklearn_fit / ours_pca {sk['fit_seconds'] / ours['seconds']:.1f}x, "
                  f"(sklearn_read + sklearn_fit) / ours_pca {sk['seconds'] / ours['seconds']:.1f}x, "
                  f"sklearn_fit / ours_full {sk['fit_seconds'] / full['seconds']:.1f}x, "
                  f"sklearn peak / ours_pca peak {sk['peak_rss_mib'] / ours['peak_rss_mib']:.1f}x")
            print(f"{'':>15}from memory, fit only: sklearn_fit / ours_pca_mem_fit "
                  f"{sk['fit_seconds'] / res['ours_pca_mem']['fit_seconds']:.1f}x")
            print(f"{'':>15}|kept ours - kept sklearn| {abs(ours['kept'] - sk['kept']):.1e} (randomized), "
                  f"{abs(ours['kept'] - exact['kept']):.1e} (covariance_eigh)")
    if len(results) > 1:
        lo, hi = min(results), max(results)
        print(f"# peak RSS {hi} vs {lo} rows: ours_pca {results[hi]['ours_pca']['peak_rss_mib'] / results[lo]['ours_pca']['peak_rss_mib']:.2f}x, "
              f"ours_full {results[hi]['ours_full']['peak_rss_mib'] / results[lo]['ours_full']['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
