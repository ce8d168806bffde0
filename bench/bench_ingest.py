"""Ingest throughput: the project's ingest stage against a bare img2dataset call, same list, same server.

    python bench/bench_ingest.py [--rows 3000 12000] [--repeats 3]

The URL list is the demo generator's valid rows (planted bad rows and the deliberately slow ones are
left out, so the number measures throughput, not timeouts), served by the demo HTTP server in its
own process on 127.0.0.1. Both sides run img2dataset with the same settings (processes, threads,
image size, shard size, sha256) in a fresh process:

- bare: ``img2dataset.download(...)`` on the list, nothing else;
- ours: the ingest stage's tasks (``partition_source`` -> ``download_partitions`` -> ``write_shard_index``),
  i.e. input partitioning and the URL policy's text checks, img2dataset with the egress policy in its
  workers, drop records, content checksums and the shard index; Prefect's API is not involved
  (the tasks' ``.fn``), so the number is the data path's cost.

Two list sizes separate the fixed cost of a call (process start-up, imports) from the steady-state
throughput: the marginal rate (extra images / extra seconds) is what a 1M-row partition sees.
Each side runs in a fresh process and times its own work after its imports (the bare side the
``download`` call, ours the task calls, whose img2dataset runs in a further child process as in the
pipeline). Runs alternate (bare, ours, bare, ours, ...) and the medians are compared:
ratio = ours/bare throughput.

Then the shards each side wrote on its last run of the larger list: bytes per image, members with a
PAX header (the bare call writes one per member: webdataset's writer and Python's default format;
ours writes GNU headers, ``unclip.data.egress.set_tar_format_from_env``) and the time to read them back
with webdataset (the median of 5 passes, the page cache warm): ratio = bare/ours read time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

BARE = """
import sys, time, img2dataset
t = time.perf_counter()
img2dataset.download(url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
    output_format="webdataset", output_folder=sys.argv[2], processes_count={processes}, thread_count={threads},
    image_size={image_size}, resize_mode="border", number_sample_per_shard={sps}, oom_shard_count=5,
    timeout={timeout}, compute_hash="sha256", extract_exif=False, enable_wandb=False,
    incremental_mode="incremental")
print("ELAPSED", time.perf_counter() - t)
"""

OURS = """
import sys, time
from unclip.config import load_config
from unclip.tasks import ingest
t = time.perf_counter()
cfg = load_config(sys.argv[1], variables={{"workdir": sys.argv[2]}})
src = cfg.sources[0]
res = ingest.partition_source.fn(src, sys.argv[2], cfg.ingest)
done = ingest.download_partitions.fn(src.name, "bench", res["partitions"], sys.argv[2], cfg.ingest, src.extra_cols)
ingest.write_shard_index.fn(sys.argv[2], done, {{src.name: 0}})
print("ELAPSED", time.perf_counter() - t)
"""


def _prepare(out: Path, rows: int, sizes: list[int]) -> tuple[dict, dict, dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from unclip.config import load_config
    from unclip.data import demo_source

    demo_cfg = load_config(ROOT / "configs" / "demo.yaml", variables={"workdir": str(out)})
    # generate ~12% more than needed: the planted bad rows are removed below
    spec = demo_source.generate_demo_for_config(str(out / "demo"), demo_cfg, size=int(rows * 1.12) + 100)
    plan = spec.plan()
    ok = plan.filter(pa.compute.equal(plan.column("kind"), "ok"))
    assert ok.num_rows >= rows, (ok.num_rows, rows)
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["ingest"]["samples_per_shard"] = 1000
    lists, configs = {}, {}
    for n in sizes:
        lst = out / f"list-{n}"
        lst.mkdir(parents=True, exist_ok=True)
        sub = ok.slice(0, n)
        pq.write_table(pa.table({"url": sub.column("url"), "caption": sub.column("caption")}), lst / "urls.parquet")
        raw["sources"] = [{"name": "bench", "url_list": str(lst / "urls.parquet")}]
        raw["ingest"]["partition_rows"] = n  # one partition: one img2dataset call, like the bare side
        configs[n] = out / f"bench-ingest-{n}.yaml"
        configs[n].write_text(yaml.safe_dump(raw))
        lists[n] = lst / "urls.parquet"
    settings = {"processes": raw["ingest"]["processes"], "threads": raw["ingest"]["threads"],
                "image_size": raw["ingest"]["image_size"], "sps": 1000, "timeout": raw["ingest"]["timeout_s"]}
    return lists, configs, {"spec": spec, **settings}


def _timed(cmd: list[str], env: dict) -> float:
    """Seconds of the measured section, as printed by the child: the interpreter start and the imports
    of the driving process are left out on both sides (a running pipeline has paid them already)."""
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float([line for line in out.splitlines() if line.startswith("ELAPSED")][-1].split()[1])


def _read_ms(tars: list[str]) -> float:
    """Milliseconds per sample to iterate the shards with webdataset (no decoding), the median of 5 passes."""
    import webdataset as wds

    times = []
    for _ in range(5):
        t, n = time.perf_counter(), 0
        for _sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
            n += 1
        times.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(times)


def _shards(folder: Path) -> dict:
    import tarfile

    tars = sorted(str(p) for p in folder.rglob("*.tar"))
    members = pax = images = 0
    for path in tars:
        with tarfile.open(path) as tar:
            for m in tar:
                members += 1
                pax += bool(m.pax_headers)
                images += m.name.endswith(".jpg")
    return {"tars": tars, "members": members, "pax": pax, "images": images,
            "bytes": sum(os.path.getsize(p) for p in tars)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs=2, default=[3000, 12000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ingest"))
    a = ap.parse_args()
    out = Path(a.out)
    lists, configs, s = _prepare(out, max(a.rows), a.rows)
    spec = s["spec"]
    server = subprocess.Popen([sys.executable, "-m", "unclip.data.demo_server", "--root", spec.www_dir,
                               "--port", str(spec.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times: dict[tuple[str, int], list[float]] = {}
    try:
        time.sleep(2)
        for i in range(a.repeats):
            for n in a.rows:
                for name in ("bare", "ours"):
                    target = out / f"run-{name}"
                    shutil.rmtree(target, ignore_errors=True)
                    if name == "bare":
                        keys = ("processes", "threads", "image_size", "sps", "timeout")
                        cmd = [sys.executable, "-c", BARE.format(**{k: s[k] for k in keys}), str(lists[n]), str(target)]
                    else:
                        cmd = [sys.executable, "-c", OURS.format(), str(configs[n]), str(target)]
                    t = _timed(cmd, env)
                    times.setdefault((name, n), []).append(t)
                    print(f"repeat {i}: {n:6d} rows {name:4s} {t:7.2f} s  {n / t:7.1f} images/s", flush=True)
    finally:
        server.terminate()
        server.wait()
    lo, hi = a.rows
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{s['processes']} processes x {s['threads']} threads, {s['image_size']} px, {os.cpu_count()} CPUs; medians of "
          f"{a.repeats}")
    print(f"{'':22s}{lo:>8d} rows{hi:>10d} rows   marginal images/s   fixed cost per call")
    rate = {}
    for name in ("bare", "ours"):
        rate[name] = (hi - lo) / (med[(name, hi)] - med[(name, lo)])
        fixed = med[(name, lo)] - lo / rate[name]
        print(f"{'bare img2dataset' if name == 'bare' else 'ingest stage':22s}{med[(name, lo)]:>11.2f} s"
              f"{med[(name, hi)]:>12.2f} s   {rate[name]:>17.1f}   {fixed:>10.2f} s")
    print(f"ratio at {lo} rows (ours / bare throughput): {med[('bare', lo)] / med[('ours', lo)]:.3f}")
    print(f"ratio at {hi} rows (ours / bare throughput): {med[('bare', hi)] / med[('ours', hi)]:.3f}")
    print(f"ratio of marginal throughputs (steady state): {rate['ours'] / rate['bare']:.3f}")

    print(f"\nthe shards of the last {hi}-row runs")
    shards = {name: _shards(out / f"run-{name}") for name in ("bare", "ours")}
    for name, sh in shards.items():
        sh["read_ms"] = _read_ms(sh["tars"])
        print(f"{'bare img2dataset' if name == 'bare' else 'ingest stage':22s}{sh['images']:>7d} images "
              f"{sh['members']:>7d} members, {sh['pax']:>7d} with a PAX header  "
              f"{sh['bytes'] / sh['images'] / 1024:7.2f} KiB an image  {sh['read_ms']:.3f} ms a sample to read")
    b, o = shards["bare"], shards["ours"]
    print(f"bytes an image (ours / bare): {o['bytes'] / o['images'] / (b['bytes'] / b['images']):.3f}")
    print(f"read throughput (ours / bare): {b['read_ms'] / o['read_ms']:.3f}")


if __name__ == "__main__":
    main()
