"""PCA + quantiser task (stage 5): fit out-of-core on the final embeddings, save a versioned artifact.

The artifact lives at ``pca/<version>/pca.npz`` where the version is a fingerprint of the fitted
arrays, next to its report (explained variance kept, relative reconstruction errors) and the
explained-variance plot; later stages (the AR prior) load it through the manifest.
"""

from __future__ import annotations

import base64

import pyarrow as pa

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from unclip import storage
from unclip.config import PcaConfig
from unclip.data import embeddings, pca
from unclip.tasks.common import artifact_key, in_prefect_run


@task(name="fit-pca-quantiser", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def fit_and_save_pca(files: list[tuple[str, int]], workdir: str, cfg: PcaConfig, fit_shards: pa.Table) -> dict:
    """Fit on at most ``cfg.max_rows`` sampled rows of ``files`` ((uri, rows) pairs); ``fit_shards``
    (shard, digest, rows) is saved beside the model, to measure later how much the data moved."""
    if not files:
        raise ValueError("pca: the final embeddings are empty; nothing to fit")

    def batches():
        return embeddings.iter_embedding_batches(files, batch_rows=cfg.batch_rows, max_rows=cfg.max_rows, seed=cfg.seed,
                                                 columns=("image_emb", "text_emb"))

    model, report = pca.fit_pca_quantiser(
        batches, n_components=cfg.n_components, n_buckets=cfg.n_buckets, dot_buckets=cfg.dot_buckets,
        seed=cfg.seed,
    )
    version = "pca-" + model.fingerprint()[:12]
    base = storage.join(workdir, "pca", version)
    with storage.atomic_open(storage.join(base, "pca.npz")) as f:
        model.save(f)
    png = pca.explained_variance_plot_png(model.spectrum_ratio, cfg.n_components)
    storage.write_bytes(storage.join(base, "explained_variance.png"), png)
    report = {k: (float(v) if isinstance(v, float) else v) for k, v in report.items()}
    storage.write_parquet(storage.join(base, "fit_shards.parquet"), fit_shards)
    storage.write_json(storage.join(base, "report.json"), {"version": version, **report})
    return load_fitted({"pca": storage.join(base, "pca.npz")})


def load_fitted(outputs: dict) -> dict:
    """A saved PCA's files, report and plot, from the folder of its ``pca.npz``."""
    base = outputs["pca"].rsplit("/", 1)[0]
    report = storage.read_json(storage.join(base, "report.json"))
    version = report.pop("version")
    return {"version": version, "uri": storage.join(base, "pca.npz"), "report_uri": storage.join(base, "report.json"),
            "plot_uri": storage.join(base, "explained_variance.png"), "report": report,
            "fit_shards_uri": storage.join(base, "fit_shards.parquet"),
            "plot_png_b64": base64.b64encode(storage.read_bytes(storage.join(base, "explained_variance.png"))).decode()}


def publish_pca(fitted: dict) -> None:
    """The PCA stage's figures as a table, and its plot as an image the UI displays (a data: URI)."""
    if not in_prefect_run():
        return
    r = fitted["report"]
    create_table_artifact([{"metric": k, "value": v} for k, v in r.items() if not isinstance(v, (list, dict))],
                          key=artifact_key("pca", "figures"), description=f"PCA + quantiser {fitted['version']}")
    data_uri = "data:image/png;base64," + fitted["plot_png_b64"]
    create_image_artifact(image_url=data_uri, key=artifact_key("pca", "explained-variance"),
                          description="cumulative explained variance of the image-embedding PCA")
    create_markdown_artifact(
        f"# PCA {fitted['version']}\n\n![explained variance]({data_uri})\n\n"
        f"kept {r.get('n_components')} components: explained variance "
        f"{r.get('explained_variance_ratio_kept', float('nan')):.4f}, relative MSE (PCA) "
        f"{r.get('relative_mse_pca', float('nan')):.5f}, (PCA + quantisation) "
        f"{r.get('relative_mse_pca_quantised', float('nan')):.5f}",
        key=artifact_key("pca", "plot"), description="explained-variance curve")
