"""The built-in demo: generate procedural image-caption data, serve it on 127.0.0.1, run the pipeline.

The demo flow starts the local HTTP server, runs ``data_pipeline`` (the same flows a user's own URL
lists go through, with the demo's config) as a subflow, stops the server, and releases the kept set
as a dataset version in the catalog (as a refresh does). Then, with ``train_stages`` (``unclip
demo`` passes ``DEMO_TRAIN_STAGES``: both priors and their side-by-side evaluation, the decoder, both
upsamplers and the text-to-image evaluation; CLIP was trained
by the data pipeline, and the PCA fitted, before the release), it runs the ``retrain`` flow (as
the one-click deployment does) on that version. The data is generated once per workdir; re-running
the demo on the same workdir downloads nothing new and continues (or reuses) its training run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pathlib import Path

from unclip import catalog, locks, storage
from unclip.config import DATA_STAGES, RunConfig, load_config
from unclip.data import demo_source
from unclip.flows.data import data_pipeline
from unclip.train import stages


@task(name="generate-demo-data", cache_policy=NO_CACHE)
def generate(workdir: str, config: RunConfig, size: int, seed: int) -> str:
    spec = demo_source.generate_demo_for_config(storage.join(workdir, "demo"), config, size=size, seed=seed)
    get_run_logger().info("demo data: %d rows per generation at %s, served from %s", spec.args.size, spec.out_dir,
                          spec.base_url)
    return spec.out_dir


DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
DEMO_TRAIN_STAGES = stages.DEMO_TRAIN_STAGES


@flow(name="demo", flow_run_name="demo: {size} pairs, seed {seed}")
def demo_flow(workdir: str, config: RunConfig | None = None, size: int = 2000, seed: int = 0,
              until: str = "pca", train_stages: list[str] | None = None) -> dict:
    """Generate (once), serve and run the data pipeline on the built-in demo data; then, when the
    whole data pipeline ran, the ``train_stages`` on the released version (``retrain``).

    Without ``config``, the shipped ``configs/demo.yaml`` is used (with ``${workdir}`` filled in).
    Returns the data stages' records, and under ``"train"`` the training run's catalog record.
    """
    workdir = storage.absolute(workdir)
    if config is None:
        config = load_config(DEMO_CONFIG, variables={"workdir": workdir})
    out_dir = generate(workdir, config, size, seed)
    spec = demo_source.load_demo(out_dir)
    with spec.server():
        records = data_pipeline(config=config, workdir=workdir, until=until)
    if until == DATA_STAGES[-1]:  # the whole story: the kept set is released as a dataset version
        where = catalog.catalog_uri(config, workdir)
        with locks.refresh_lock(config.name, where, timeout_s=60.0):
            release = catalog.publish_dataset(where, workdir, records, config)
        get_run_logger().info("demo: dataset version %s %s (%s) in %s", release["release"], release["version"],
                              "new" if release["new"] else "unchanged", where)
        if train_stages:
            records = {**records, "train": train(workdir, config, list(train_stages))}
    return records


def train(workdir: str, config: RunConfig, stages: list[str]) -> dict:
    """The ``retrain`` flow on the latest dataset version, with the demo's config as it ran (written
    to ``<workdir>/demo/config.yaml``, the path the run records). A demo run of the same stages and
    config on the same version is reused when it completed and resumed when it did not, so running
    the demo again continues where it stopped."""
    import yaml

    from unclip.flows.retrain import RetrainParams, retrain

    where = catalog.catalog_uri(config, workdir)
    release = catalog.latest(where, config.name)
    settings = config.model_dump(mode="json")
    same = [r for r in catalog.runs(where) if r.get("name") == "demo" and r["dataset_version"] == release["version"]
            and r.get("requested_stages") == stages and r.get("config") == settings]
    if same and same[-1]["state"] == "completed":
        get_run_logger().info("demo: run %s already trained %s on %s; reused", same[-1]["run_id"], ",".join(stages),
                              release["release"])
        return same[-1]
    if same:
        return retrain(RetrainParams(workdir=workdir, resume=same[-1]["run_id"]))
    path = storage.join(workdir, "demo", "config.yaml")
    storage.write_bytes(path, yaml.safe_dump(settings, sort_keys=False).encode())
    return retrain(RetrainParams(config=path, workdir=workdir, stages=stages, run_name="demo"))
