"""The ``unclip`` command line: ``unclip demo`` and ``unclip data``.

Both load a run configuration (YAML, validated before any work), run the data pipeline's Prefect
flows with progress bars on the terminal, and end with a summary of what each stage kept and dropped
and where the outputs are. Prefect's own log lines go to the Prefect UI/API; ``--verbose`` shows them
here too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def _quiet_environment(verbose: bool) -> None:
    # nothing may try the network: no analytics, no update checks, no experiment trackers
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def _parser() -> argparse.ArgumentParser:
    from unclip.config import STAGES

    p = argparse.ArgumentParser(prog="unclip", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workdir", required=True, help="where every output goes (a path or fsspec URI)")
        sp.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
        sp.add_argument("--verbose", action="store_true", help="also print Prefect's log lines")

    d = sub.add_parser("demo", help="run the pipeline on the built-in procedural demo data")
    common(d)
    d.add_argument("--size", type=int, default=2000, help="image-caption pairs to generate (default 2000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--config", default=str(DEMO_CONFIG), help="demo run config (default configs/demo.yaml)")

    r = sub.add_parser("data", help="run the data stages on your own URL lists")
    common(r)
    r.add_argument("--config", required=True, help="run config YAML (see configs/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_environment(args.verbose)

    from unclip import preflight, storage
    from unclip.config import ConfigError, load_config, stages_until

    workdir = storage.absolute(args.workdir)
    try:
        preflight.check_environment()
        config = load_config(args.config, variables={"workdir": workdir})
        stages = stages_until(args.until)
        if args.command == "data":
            preflight.check_config(config, stages)
        elif "embed" in stages:
            preflight.check_config(config, tuple(s for s in stages if s != "ingest"))
    except ConfigError as err:
        print(f"unclip: error: {err}", file=sys.stderr)
        return 2

    until = stages[-1]
    start = time.monotonic()
    try:
        if args.command == "demo":
            from unclip.flows.demo import demo_flow

            records = demo_flow(config=config, workdir=workdir, size=args.size, seed=args.seed, until=until)
        else:
            from unclip.flows.data import data_pipeline

            records = data_pipeline(config=config, workdir=workdir, until=until)
    except Exception as err:  # the flow run, its logs and the traceback are in Prefect
        if args.verbose:
            raise
        print(f"unclip: error: the run failed after {time.monotonic() - start:.0f} s: {type(err).__name__}: {err}\n"
              f"Finished stages are kept; run the same command again to resume. Details: --verbose, the Prefect "
              f"UI, and {workdir}/logs/.", file=sys.stderr)
        return 1
    print(summary(records, workdir, config, time.monotonic() - start))
    return 0


def summary(records: dict, workdir: str, config, seconds: float) -> str:
    """The end-of-run report: per stage rows in/kept/dropped and top reasons, versions, outputs."""
    lines = [f"\nunclip: {len(records)} stage(s) done in {seconds:.1f} s; workdir {workdir}", ""]
    head = f"{'stage':<16}{'rows in':>10}{'kept':>10}{'dropped':>10}   drops by reason"
    lines += [head, "-" * len(head)]
    for stage, r in records.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["drops_by_reason"].items(), key=lambda kv: -kv[1]))
        dropped = sum(r["drops_by_reason"].values())
        lines.append(f"{stage:<16}{r['rows_in']:>10,}{r['rows_kept']:>10,}{dropped:>10,}   {reasons or '-'}")
    last = records[list(records)[-1]]
    lines += ["", f"dataset version: {last.get('dataset_version')}   code version: {last.get('code_version')}"]
    if "pca" in records:
        m = records["pca"]["metrics"]
        lines.append(
            f"pca {records['pca']['pca_version']}: {m['n_components']} of {m.get('dim', 1024)} components keep "
            f"{m['explained_variance_ratio_kept']:.4f} of the variance; relative MSE {m['relative_mse_pca']:.5f} "
            f"(PCA), {m['relative_mse_pca_quantised']:.5f} (PCA + {config.pca.n_buckets} buckets)")
    if "embed" in records and config.embed.model.seed is not None:
        lines.append(f"note: embeddings come from a randomly initialised CLIP ({config.embed.model.arch}, seed "
                     f"{config.embed.model.seed}); CLIP scores and near-duplicate similarities are not meaningful "
                     "until a trained checkpoint is configured.")
    lines += ["", f"manifest:   {workdir}/manifest.json", f"drops:      {workdir}/drops/"]
    if "semantic_filter" in records:
        lines.append(f"embeddings: {workdir}/embeddings/")
    if "pca" in records:
        lines.append(f"pca:        {records['pca']['outputs']['pca']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
