"""Ingest throughput: the project's ingest stage against a bare img2dataset call, same list, same server.

    python bench/bench_ingest.py [--rows 6000] [--repeats 3]

The URL list is the demo generator's valid rows (planted bad rows and the deliberately slow ones are
left out, so the number measures throughput, not timeouts), served by the demo HTTP server in its
own process on 127.0.0.1. Both sides run img2dataset with the same settings (processes, threads,
image size, shard size, sha256) in a fresh process:

- bare: ``img2dataset.download(...)`` on the list, nothing else;
- ours: the ingest stage's tasks (``partition_source`` -> ``download_partitions`` -> ``write_shard_index``),
  i.e. input partitioning and the URL policy's text checks, img2dataset with the egress policy in its
  workers, drop records, content checksums and the shard index; Prefect's API is not involved
  (the tasks' ``.fn``), so the number is the data path's cost.

Runs alternate (bare, ours, bare, ours, ...) and the medians are compared: ratio = ours/bare throughput.
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
import sys, img2dataset
img2dataset.download(url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
    output_format="webdataset", output_folder=sys.argv[2], processes_count={processes}, thread_count={threads},
    image_size={image_size}, resize_mode="border", number_sample_per_shard={sps}, oom_shard_count=5,
    timeout={timeout}, compute_hash="sha256", extract_exif=False, enable_wandb=False,
    incremental_mode="incremental")
"""

OURS = """
import sys, json
from unclip.config import load_config
from unclip.tasks import ingest
cfg = load_config(sys.argv[1], variables={{"workdir": sys.argv[2]}})
src = cfg.sources[0]
res = ingest.partition_source.fn(src, sys.argv[2], cfg.ingest)
done = ingest.download_partitions.fn(src.name, "bench", res["partitions"], sys.argv[2], cfg.ingest, src.extra_cols)
ingest.write_shard_index.fn(sys.argv[2], done, {{src.name: 0}})
"""


def _prepare(out: Path, rows: int) -> tuple[Path, Path, dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from unclip.config import load_config
    from unclip.data import demo_source

    demo_cfg = load_config(ROOT / "configs" / "demo.yaml", variables={"workdir": str(out)})
    # generate ~12% more than needed: the planted bad rows are removed below
    spec = demo_source.generate_demo_for_config(str(out / "demo"), demo_cfg, size=int(rows * 1.12) + 100)
    plan = spec.plan()
    ok = plan.filter(pa.compute.equal(plan.column("kind"), "ok")).slice(0, rows)
    lst = out / "list"
    lst.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": ok.column("url"), "caption": ok.column("caption")}), lst / "urls.parquet")
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["sources"] = [{"name": "bench", "url_list": str(lst / "urls.parquet")}]
    raw["ingest"]["partition_rows"] = rows  # one partition: one img2dataset call, like the bare side
    raw["ingest"]["samples_per_shard"] = 1000
    cfg_path = out / "bench-ingest.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    settings = {"processes": raw["ingest"]["processes"], "threads": raw["ingest"]["threads"],
                "image_size": raw["ingest"]["image_size"], "sps": 1000, "timeout": raw["ingest"]["timeout_s"]}
    return lst / "urls.parquet", cfg_path, {"spec": spec, **settings}


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ingest"))
    a = ap.parse_args()
    out = Path(a.out)
    url_list, cfg_path, s = _prepare(out, a.rows)
    spec = s["spec"]
    server = subprocess.Popen([sys.executable, "-m", "unclip.data.demo_server", "--root", spec.www_dir,
                               "--port", str(spec.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bare_t, ours_t = [], []
    try:
        time.sleep(2)
        for i in range(a.repeats):
            for name, times in (("bare", bare_t), ("ours", ours_t)):
                target = out / f"run-{name}"
                shutil.rmtree(target, ignore_errors=True)
                if name == "bare":
                    code = BARE.format(**{k: s[k] for k in ("processes", "threads", "image_size", "sps", "timeout")})
                    cmd = [sys.executable, "-c", code, str(url_list), str(target)]
                else:
                    cmd = [sys.executable, "-c", OURS.format(), str(cfg_path), str(target)]
                times.append(_timed(cmd, env))
                print(f"repeat {i}: {name:4s} {times[-1]:7.2f} s  {a.rows / times[-1]:7.1f} images/s", flush=True)
    finally:
        server.terminate()
        server.wait()
    bare, ours = statistics.median(bare_t), statistics.median(ours_t)
    print(f"\n{a.rows} images, {s['processes']} processes x {s['threads']} threads, {s['image_size']} px, "
          f"{os.cpu_count()} CPUs")
    print(f"bare img2dataset: median {bare:.2f} s = {a.rows / bare:.1f} images/s")
    print(f"ingest stage:     median {ours:.2f} s = {a.rows / ours:.1f} images/s")
    print(f"ratio (ours / bare throughput): {bare / ours:.3f}")


if __name__ == "__main__":
    main()
