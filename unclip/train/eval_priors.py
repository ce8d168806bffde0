"""Stage ``eval_priors``: a run's two priors side by side on the same held-out pairs.

Both released priors (``prior_diffusion`` and ``prior_ar``, whichever the run trained) are loaded from
their release folders and measured on the same ``train.eval_priors.eval_pairs`` held-out pairs of
the generative sources, with the sampling settings of their own ``train.<prior>`` config. Metrics are
named ``<prior>/<metric>`` (see ``unclip.train.prior`` and ``unclip.train.prior_ar`` for each metric);
the diffusion prior is also measured at each scale of ``guidance_sweep``
(``prior_diffusion/cosine_true@guidance_<g>``, ``prior_diffusion/i2i_recall@1@guidance_<g>``).

Where a prior's own stage evaluated its released weights on exactly these pairs (the same
``eval_pairs`` and ``seed`` in ``train.<prior>`` as here), its metrics are taken as they are instead
of sampling again; the sweep's other scales are always sampled.

The stage writes ``<run>/eval_priors/metrics.json`` and ``table.md`` and publishes the table as a
Prefect table artifact (one row per metric, one column per prior). A run without a prior, or a
held-out split without generative rows, is recorded as skipped (``skipped``: the reason), not failed.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from unclip import storage
from unclip.data import embedding_pairs
from unclip.data.pca import PcaQuantiser
from unclip.train import prior, prior_ar

PRIORS = ("prior_diffusion", "prior_ar")


def evaluate_priors(run_config, eval_files, previous: dict[str, dict], out_dir: str,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Metrics ``<prior>/<metric>`` of every prior in ``previous`` (stage -> result with
    ``outputs.model``), the table's rows, and where the files went."""
    import open_clip

    from unclip.data import clip as clip_data

    cfg = run_config.train.eval_priors
    found = {name: previous[name]["outputs"]["model"] for name in PRIORS
             if (previous.get(name) or {}).get("outputs", {}).get("model")}
    generative = [s.name for s in run_config.sources if s.for_generative]
    held_files = prior.generative_files(eval_files, generative)
    skipped = (f"the run has no trained prior (stages {', '.join(PRIORS)})" if not found else
               f"the held-out split has no rows of the generative sources {generative}" if not held_files.num_rows
               else None)
    if skipped:  # recorded on the run, not an error: evaluate runs every eval stage by default
        return {"metrics": {"priors_evaluated": 0, "skipped": skipped}, "rows": [], "outputs": {}}
    held = embedding_pairs.held_out(held_files, cfg.eval_pairs, seed=cfg.seed)
    clip_data.register_project_configs()
    metrics: dict[str, Any] = {}
    for name, folder in found.items():
        model, meta = prior.load_release(folder)
        model.to(device)
        tokenizer = open_clip.get_tokenizer(meta["tokenizer"])
        tc = getattr(run_config.train, name)
        got = stage_metrics(previous.get(name), tc, cfg)
        if name == "prior_diffusion":
            got = got or prior.evaluate_prior(model, held, tokenizer, steps=tc.sample_steps, guidance=tc.guidance,
                                              candidates=tc.candidates, seed=cfg.seed)
            for g in cfg.guidance_sweep:  # one sampling pass each; the configured scale's is the one above
                swept = got if g == tc.guidance else prior.evaluate_prior(
                    model, held, tokenizer, steps=tc.sample_steps, guidance=g, candidates=tc.candidates,
                    seed=cfg.seed, only_true=True)
                got[f"cosine_true@guidance_{g:g}"] = swept["cosine_true"]
                got[f"i2i_recall@1@guidance_{g:g}"] = swept["i2i_recall@1"]
        elif got is None:
            pca = PcaQuantiser.load(io.BytesIO(storage.read_bytes(storage.join(folder, prior_ar.PCA_FILE))))
            got = prior_ar.evaluate_ar_prior(model, held, tokenizer, pca, guidance=tc.guidance,
                                             temperature=tc.temperature, seed=cfg.seed)
        metrics.update({f"{name}/{k}": v for k, v in got.items()})
    metrics["priors_evaluated"] = len(found)
    rows = table_rows({k: v for k, v in metrics.items() if "/" in k}, list(found))
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    storage.write_bytes(storage.join(out_dir, "table.md"), markdown_table(rows, list(found)).encode())
    return {"metrics": metrics, "rows": rows, "outputs": {"metrics": storage.join(out_dir, "metrics.json"),
                                                         "table": storage.join(out_dir, "table.md")}}


def stage_metrics(stage: dict | None, tc, cfg) -> dict[str, Any] | None:
    """The prior stage's final metrics (of its released weights) when it measured what this stage
    would: the same held-out pairs (``eval_pairs``, and ``seed``, which also seeds the sampling)."""
    got = dict((stage or {}).get("metrics") or {})
    if tc.eval_pairs != cfg.eval_pairs or tc.seed != cfg.seed or "cosine_true" not in got:
        return None
    for key in ("steps", "train_rows"):  # the stage's, not an evaluation's
        got.pop(key, None)
    return got


def table_rows(metrics: dict[str, Any], priors: list[str]) -> list[dict]:
    """One row per metric name, one column per prior (None where a prior has no such metric)."""
    names: list[str] = []
    for key in metrics:
        metric = key.split("/", 1)[1]
        if metric not in names:
            names.append(metric)
    return [{"metric": m, **{p: metrics.get(f"{p}/{m}") for p in priors}} for m in names]


def markdown_table(rows: list[dict], priors: list[str]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| metric | " + " | ".join(priors) + " |", "|---|" + "---|" * len(priors)]
    lines += [f"| {r['metric']} | " + " | ".join(cell(r[p]) for p in priors) + " |" for r in rows]
    return "\n".join(lines) + "\n"
