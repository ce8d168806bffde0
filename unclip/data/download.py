"""One img2dataset call over a folder of input partitions, run in its own process.

The ingest task starts ``python -m unclip.data.download SPEC.json`` rather than calling
``img2dataset.download`` in-process, because img2dataset installs a SIGINT handler (main thread
only, while Prefect runs tasks in worker threads), prints to stdout from its own logger process, and
starts its workers with ``spawn``: the egress policy reaches those workers through the environment
this process is started with (see ``unclip.data.egress.worker_env``). The child also asks the kernel
to kill it when its parent dies, so a killed run leaves no orphan writing into the shard folder
while the resumed run works there.

With ``ingest.distributor: ray`` this process joins the Ray cluster at ``ray_address`` (or starts a
local Ray) as its own job, whose runtime_env carries the egress policy and a worker setup hook into
every Ray worker (``unclip.data.egress.ray_runtime_env``), wherever it runs.

img2dataset's own ``incremental`` mode makes the call resumable: shards whose ``_stats.json``
exists are skipped, unfinished ones are downloaded again from scratch.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the orphan finishes its partition, which is harmless but slower
        pass


def _init_ray(spec: dict) -> None:
    import ray

    from unclip.config import IngestConfig
    from unclip.data import egress

    ingest = IngestConfig.model_validate(spec["ingest"])
    kwargs = {"runtime_env": egress.ray_runtime_env(ingest), "include_dashboard": False,
              "logging_level": "warning"}
    if spec.get("ray_address"):
        ray.init(address=spec["ray_address"], **kwargs)
    else:
        ray.init(num_cpus=ingest.processes, **kwargs)


def _init_spark(spec: dict):
    """The Spark session img2dataset's pyspark distributor picks up (it uses the active one). Every
    Spark Python worker gets the egress policy's environment (``spark.executorEnv.*``): the
    ``sitecustomize`` on its PYTHONPATH installs the policy before anything is fetched."""
    from pyspark.sql import SparkSession

    from unclip.config import IngestConfig
    from unclip.data import egress

    ingest = IngestConfig.model_validate(spec["ingest"])
    builder = SparkSession.builder.appName("unclip-ingest").master(
        ingest.spark_master or f"local[{ingest.processes}]")
    for key, value in {**egress.worker_env(ingest), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}.items():
        builder = builder.config(f"spark.executorEnv.{key}", value)
    # Spark's Python workers run this interpreter (on a cluster: the same image's), not the PATH's python3
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (builder.config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
            .config("spark.ui.enabled", "false").getOrCreate())


def run(spec: dict) -> None:
    import img2dataset

    ingest = spec["ingest"]
    spark = None
    if ingest["distributor"] == "ray":
        _init_ray(spec)
    elif ingest["distributor"] == "pyspark":
        spark = _init_spark(spec)
    img2dataset.download(
        url_list=spec["url_list"],
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid", *spec["extra_cols"]],
        output_format="webdataset",
        output_folder=spec["output_folder"],
        processes_count=ingest["processes"],
        thread_count=ingest["threads"],
        distributor=ingest["distributor"],
        image_size=ingest["image_size"],
        resize_mode=ingest["resize_mode"],
        encode_format=ingest["encode_format"],
        encode_quality=ingest["encode_quality"],
        number_sample_per_shard=ingest["samples_per_shard"],
        oom_shard_count=5,
        timeout=ingest["timeout_s"],
        retries=ingest["retries"],
        compute_hash="sha256",
        extract_exif=False,
        enable_wandb=False,
        incremental_mode="incremental",
        max_shard_retry=2,
        user_agent_token=ingest["user_agent_token"],
        # img2dataset treats [] as "no opt-out check"; the config's empty tuple means the same.
        disallowed_header_directives=list(ingest["disallowed_header_directives"]),
    )
    if spark is not None:
        spark.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m unclip.data.download SPEC.json", file=sys.stderr)
        return 2
    _die_with_parent()
    # SIGTERM (the ingest task giving up) exits through SystemExit, so that img2dataset's process
    # pool is terminated on the way out instead of being left to download without a parent
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with open(argv[0]) as f:
        spec = json.load(f)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    run(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
