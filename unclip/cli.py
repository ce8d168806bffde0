"""The ``unclip`` command line.

- ``unclip demo`` and ``unclip data`` load a run configuration (YAML, validated before any work), run
  the data pipeline's Prefect flows with progress bars on the terminal, and end with a summary of
  what each stage kept and dropped and where the outputs are. Prefect's own log lines go to the
  Prefect UI/API; ``--verbose`` shows them here too. ``--ui`` sends the runs to the local server of
  ``unclip server`` (started in the background if none is running) and prints where to look.
- ``unclip server`` runs a local Prefect server (database under the workdir), the work pool, the
  project's deployments and a worker, until Ctrl-C.
- ``unclip retrain`` runs the training and evaluation stages on a dataset version (the CLI twin of
  the ``retrain`` deployment) and prints the run id; ``--resume RUN_ID`` continues a run.
- ``unclip generate`` draws captions with the released models (caption -> prior -> decoder ->
  upsamplers -> PNG files and ``OUT/index.json``), and makes variations, interpolations and text
  diffs of given images.
- ``unclip datasets``, ``unclip runs`` and ``unclip models`` list the catalog: dataset versions,
  training runs and released model versions, with their lineage.

``--set KEY=VALUE`` (repeatable) overrides any config field by its dotted path, e.g.
``--set train.clip.steps=200``; the value is parsed as YAML (numbers, booleans, null, lists).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    # the temporary Prefect server of a run without PREFECT_API_URL: Prefect waits 20 s for it, which a
    # fresh install's first start (database migrations, byte-compiling the server) on 2 cores overran
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def _parser() -> argparse.ArgumentParser:
    from unclip.config import DATA_STAGES
    from unclip.train.stages import DEMO_TRAIN_STAGES

    p = argparse.ArgumentParser(prog="unclip", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def settable(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted path (repeatable), e.g. train.clip.steps=200")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workdir", required=True, help="where every output goes (a path or fsspec URI)")
        sp.add_argument("--until", choices=DATA_STAGES, default=None, help="stop after this stage")
        sp.add_argument("--verbose", action="store_true", help="also print Prefect's log lines")
        settable(sp)

    d = sub.add_parser("demo", help="run the pipeline on the built-in procedural demo data")
    common(d)
    d.add_argument("--size", type=int, default=2000, help="image-caption pairs to generate (default 2000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--config", default=str(DEMO_CONFIG), help="demo run config (default configs/demo.yaml)")
    d.add_argument("--train-stages", default=",".join(DEMO_TRAIN_STAGES), metavar="STAGES",
                   help="comma-separated stages `retrain` runs on the released version after the data pipeline "
                   "(default: both priors, eval_priors, the decoder, both upsamplers and eval_generation; '' for "
                   "none)")

    d.add_argument("--ui", action="store_true",
                   help="run against the local Prefect server of `unclip server --workdir` (started if needed)")

    r = sub.add_parser("data", help="run the data stages on your own URL lists")
    common(r)
    r.add_argument("--config", required=True, help="run config YAML (see configs/)")

    sv = sub.add_parser("server", help="local Prefect server + work pool + deployments + worker (Ctrl-C stops)")
    sv.add_argument("--workdir", required=True, help="the server's database and logs go to WORKDIR/prefect")
    sv.add_argument("--port", type=int, default=4200)
    sv.add_argument("--gpus", type=int, default=1, help="slots of the 'gpu' concurrency tag (default 1)")
    sv.add_argument("--no-worker", action="store_true", help="serve and deploy only")
    sv.add_argument("--auth", default=os.environ.get("PREFECT_SERVER_API_AUTH_STRING"),
                    help="basic auth 'user:password' (Prefect's PREFECT_SERVER_API_AUTH_STRING; clients then "
                    "need PREFECT_API_AUTH_STRING)")
    sv.add_argument("--stop", action="store_true", help="stop a server this workdir started in the background")

    from unclip.train import stages as train_stages

    rt = sub.add_parser("retrain", help="train and evaluate on a dataset version; prints the run id")
    rt.add_argument("--workdir", required=True, help="the dataset's working directory (its catalog)")
    rt.add_argument("--config", default=str(DEMO_CONFIG), help="run config YAML (default configs/demo.yaml)")
    rt.add_argument("--dataset-version", default="latest", help="'latest', a release (v000003) or ds-...")
    rt.add_argument("--stages", default=None,
                    help=f"comma-separated, from: {', '.join(train_stages.names())} (default: all but clip, whose "
                    "model the others would not use: they train on the dataset version's embeddings)")
    rt.add_argument("--resume", default=None, metavar="RUN_ID", help="continue this run (other options ignored)")
    rt.add_argument("--name", default=None, help="a label for the run")
    rt.add_argument("--verbose", action="store_true", help="also print Prefect's log lines")
    settable(rt)

    g = sub.add_parser("generate", help="text -> image with the released models (and variations, interpolations, "
                       "text diffs); writes PNG files and OUT/index.json")
    g.add_argument("--workdir", required=True, help="the dataset's working directory (its catalog)")
    g.add_argument("--catalog", default=None, help="catalog URI (default: where WORKDIR publishes)")
    g.add_argument("--out", required=True, help="folder for the PNG files and index.json")
    g.add_argument("captions", nargs="*", help="captions to draw (one image set each)")
    g.add_argument("--n", type=int, default=1, help="images per caption (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion")
    g.add_argument("--run", default=None, metavar="RUN_ID", help="the models of this training run (default: the "
                   "latest released model of each kind)")
    # unset sampling options take the values the models' training run evaluated them with (its
    # train.eval_generation config: the settings its colour_acc and clip_score were measured at)
    g.add_argument("--prior-guidance", type=float, default=None, help="default: as the run's eval_generation")
    g.add_argument("--prior-steps", type=int, default=None, help="default: as the run's eval_generation")
    g.add_argument("--decoder-guidance", type=float, default=None, help="default: as the run's eval_generation")
    g.add_argument("--decoder-steps", type=int, default=None, help="default: as the run's eval_generation")
    g.add_argument("--upsampler-steps", default=None, help="DDIM steps of upsampler 1 and 2, e.g. 20,10 (default: "
                   "as the run's eval_generation)")
    g.add_argument("--upsampler-eta", type=float, default=None, help="DDIM eta of both upsamplers, 0-1 (default: "
                   "as the run's eval_generation)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--variations", metavar="IMAGE", help="variations of IMAGE (DDIM with eta > 0 from its "
                       "z_i and inverted x_T)")
    which.add_argument("--interpolate", nargs=2, metavar="IMAGE", help="slerp between two images' CLIP embeddings")
    which.add_argument("--text-diff", metavar="IMAGE", help="move IMAGE toward the first caption (z_d = "
                       "norm(z_t - z_t0), z_t0 from --base-caption)")
    g.add_argument("--base-caption", default="", help="--text-diff: a caption of IMAGE as it is (default: empty)")
    g.add_argument("--eta", type=float, default=0.8, help="--variations: DDIM eta (default 0.8)")
    g.add_argument("--inversion-guidance", type=float, default=None, help="--variations / --text-diff: the decoder "
                   "guidance of both the inversion and the decoding from its noise (default 1, unguided: where DDIM "
                   "inversion gives the image back)")
    g.add_argument("--steps", type=int, default=5, help="--interpolate / --text-diff: images along the path")

    for name, what in (("datasets", "dataset versions in the catalog"), ("runs", "training runs and their lineage"),
                       ("models", "released model versions")):
        c = sub.add_parser(name, help=f"list the {what}")
        c.add_argument("--workdir", required=True)
        c.add_argument("--catalog", default=None, help="catalog URI (default: where WORKDIR publishes)")
        c.add_argument("--json", action="store_true", help="print the full records as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_environment(getattr(args, "verbose", False))
    if args.command == "server":
        return serve(args)
    if args.command in ("datasets", "runs", "models"):
        return list_catalog(args)
    if args.command == "retrain":
        return retrain(args)
    if args.command == "generate":
        return generate(args)

    from unclip import preflight, storage
    from unclip.config import ConfigError, load_config, stages_until

    workdir = storage.absolute(args.workdir)
    try:
        preflight.check_environment()
        config = load_config(args.config, parse_sets(args.sets), variables={"workdir": workdir})
        stages = stages_until(args.until)
        if args.command == "data":
            preflight.check_config(config, stages)
        elif "embed" in stages:
            preflight.check_config(config, tuple(s for s in stages if s != "ingest"))
    except ConfigError as err:
        print(f"unclip: error: {err}", file=sys.stderr)
        return 2

    until = stages[-1]
    train_stages = None
    if args.command == "demo":
        from unclip.train import stages as registered

        train_stages = [s.strip() for s in args.train_stages.split(",") if s.strip()]
        unknown = [s for s in train_stages if s not in registered.REGISTRY]
        if unknown:
            print(f"unclip: error: --train-stages: unknown stage(s) {unknown}; choose from "
                  f"{', '.join(registered.names())}", file=sys.stderr)
            return 2
    ui = _ui_server(workdir) if getattr(args, "ui", False) else None
    start = time.monotonic()
    try:
        if args.command == "demo":
            from unclip.flows.demo import demo_flow

            records = demo_flow(config=config, workdir=workdir, size=args.size, seed=args.seed, until=until,
                                train_stages=train_stages)
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
    release = None
    if args.command == "demo" and until == stages[-1] and "pca" in records:
        from unclip import catalog

        release = catalog.latest(catalog.catalog_uri(config, workdir), config.name)
    print(summary(records, workdir, config, time.monotonic() - start, release))
    if ui is not None:
        print(f"\nPrefect UI: {ui} (flow runs, artifacts, logs)")
    return 0


def parse_sets(sets: list[str]) -> dict:
    """``["train.clip.steps=200", ...]`` as nested overrides; values parsed as YAML scalars/lists."""
    import yaml

    from unclip.config import ConfigError, deep_merge

    out: dict = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.clip.steps=200")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
        for part in reversed(key.strip().split(".")):
            parsed = {part: parsed}
        out = deep_merge(out, parsed)
    return out


def retrain(args) -> int:
    """``unclip retrain``: the retrain flow in-process; prints the run id and its metrics."""
    from unclip import storage
    from unclip.config import ConfigError, load_config, resolve_config_path
    from unclip.train import stages as train_stages

    workdir = storage.absolute(args.workdir)
    try:
        overrides = parse_sets(args.sets)
        chosen = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else \
            train_stages.default_retrain_stages()
        unknown = [s for s in chosen if s not in train_stages.REGISTRY]
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(train_stages.names())}")
        if not args.resume:  # a wrong config or override fails here, before any work
            load_config(resolve_config_path(args.config), overrides, variables={"workdir": workdir})
    except ConfigError as err:
        print(f"unclip: error: {err}", file=sys.stderr)
        return 2
    from unclip.flows.retrain import RetrainParams, retrain as retrain_flow

    params = RetrainParams(config=args.config, workdir=workdir, dataset_version=args.dataset_version,
                           stages=chosen, overrides=overrides, run_name=args.name, resume=args.resume)
    start = time.monotonic()
    try:
        run = retrain_flow(params)
    except ConfigError as err:  # the checks before the first stage: nothing ran, nothing to resume
        if args.verbose:
            raise
        print(f"unclip: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.verbose:
            raise
        print(f"unclip: error: the run failed after {time.monotonic() - start:.0f} s: {type(err).__name__}: {err}\n"
              "Its record and stage folders are kept; `unclip retrain --workdir ... --resume RUN_ID` continues it "
              "(`unclip runs` lists the run ids).", file=sys.stderr)
        return 1
    print(f"run {run['run_id']}: {run['state']} in {time.monotonic() - start:.0f} s on {run['release']} "
          f"{run['dataset_version']}; folder {run['run_dir']}")
    for name, version in run.get("models", {}).items():
        print(f"  model {name}: {version}")
    for k, v in sorted(run.get("metrics", {}).items()):
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    print(run["run_id"])
    return 0


def generate(args) -> int:
    """``unclip generate``: PNG files at the top of the chain and ``OUT/index.json``."""
    import io

    import torch
    from PIL import Image

    from unclip import catalog, storage
    from unclip import generate as gen

    where = args.catalog or catalog.locate(storage.absolute(args.workdir))[0]
    out = storage.absolute(args.out)
    try:
        up = None if args.upsampler_steps is None else tuple(int(v) for v in args.upsampler_steps.split(","))
        if (up is not None and (len(up) != 2 or min(up) < 1)) or args.n < 1:
            raise ValueError("--upsampler-steps takes two positive counts, e.g. 20,10; --n at least 1")
        if args.upsampler_eta is not None and not 0.0 <= args.upsampler_eta <= 1.0:
            raise ValueError(f"--upsampler-eta {args.upsampler_eta}: between 0 and 1")
        for flag, value in (("--prior-steps", args.prior_steps), ("--decoder-steps", args.decoder_steps),
                            ("--steps", args.steps)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}: at least 1")
        modes = [args.captions] if not (args.variations or args.interpolate or args.text_diff) else []
        if modes and not args.captions:
            raise ValueError("give at least one caption (or --variations / --interpolate / --text-diff)")
        if args.text_diff and len(args.captions) != 1:
            raise ValueError("--text-diff IMAGE takes exactly one caption: the new one")
        prior = f"prior_{args.prior}"
        stack = gen.Stack.load(where, run_id=args.run, kinds=(prior, *gen.IMAGE_STAGES),
                               device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, catalog.CatalogError) as err:
        print(f"unclip: error: {err}", file=sys.stderr)
        return 2
    settings, origin = gen.Settings.of_run(where, stack.records["decoder"].get("run_id"))
    given = {k: v for k, v in (("prior_guidance", args.prior_guidance), ("prior_steps", args.prior_steps),
                               ("decoder_guidance", args.decoder_guidance), ("decoder_steps", args.decoder_steps),
                               ("upsampler_steps", up), ("upsampler_eta", args.upsampler_eta)) if v is not None}
    settings = dataclasses.replace(settings, **given)
    sampling = {k: getattr(settings, k) for k in ("prior_guidance", "prior_steps", "decoder_guidance",
                                                  "decoder_steps", "upsampler_steps", "upsampler_eta")}
    print(f"sampling ({origin}{', options' if given else ''}): "
          + ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sampling.items()))

    def load(path: str):
        return gen.from_pil(Image.open(io.BytesIO(storage.read_bytes(path))), stack.size("upsampler2"))

    base = {"seed": args.seed, "prior": args.prior, "models": stack.versions, "sampling": sampling}
    entries: list[dict] = []
    start = time.monotonic()
    inversion_guidance = gen.INVERSION_GUIDANCE if args.inversion_guidance is None else args.inversion_guidance
    if args.variations:
        images = stack.variations(load(args.variations), args.n, caption=args.base_caption, eta=args.eta,
                                  s=settings, seed=args.seed, guidance=inversion_guidance)
        entries = gen.write_images(images, out, [{**base, "mode": "variation", "source": args.variations,
                                                  "caption": args.base_caption, "eta": args.eta,
                                                  "inversion_guidance": inversion_guidance, "index": i}
                                                 for i in range(args.n)], "variation")
    elif args.interpolate:
        a, b = (load(p) for p in args.interpolate)
        images = stack.interpolate(a, b, args.steps, caption=args.base_caption, s=settings, seed=args.seed)
        entries = gen.write_images(images, out, [{**base, "mode": "interpolation", "sources": args.interpolate,
                                                  "caption": args.base_caption, "t": i / max(1, args.steps - 1)}
                                                 for i in range(args.steps)], "interpolation")
    elif args.text_diff:
        images = stack.text_diff(load(args.text_diff), args.captions[0], args.steps, base_caption=args.base_caption,
                                 s=settings, seed=args.seed, guidance=inversion_guidance)
        entries = gen.write_images(images, out, [{**base, "mode": "text_diff", "source": args.text_diff,
                                                  "caption": args.captions[0], "base_caption": args.base_caption,
                                                  "inversion_guidance": inversion_guidance,
                                                  "t": i / max(1, args.steps - 1)} for i in range(args.steps)],
                                   "text-diff")
    else:
        captions = [c for c in args.captions for _ in range(args.n)]
        images = stack.generate(captions, mode=prior, s=settings, seed=args.seed)
        entries = gen.write_images(images, out, [{**base, "caption": c, "index": i % args.n}
                                                 for i, c in enumerate(captions)], "image")
    storage.write_json(storage.join(out, "index.json"), entries)
    print(f"{len(entries)} images of {entries[0]['size'] if entries else 0} px in {time.monotonic() - start:.0f} s "
          f"-> {out} (index.json); models: " + ", ".join(f"{k} {v}" for k, v in stack.versions.items()))
    return 0


def _ui_server(workdir: str) -> str:
    """The UI address of this workdir's local server; starts one in the background if none answers."""
    from unclip.prefect_server import PrefectServer, free_port, running_server

    state = running_server(Path(workdir) / "prefect")
    if state is None:
        server = PrefectServer(Path(workdir) / "prefect", port=free_port(preferred=4200)).start()
        state = {"api_url": server.api_url, "ui_url": server.ui_url, "pid": server.proc.pid}
        print(f"unclip: started a Prefect server in the background at {server.ui_url} (pid {server.proc.pid}); "
              f"stop it with `unclip server --workdir {workdir} --stop`", file=sys.stderr)
    os.environ["PREFECT_API_URL"] = state["api_url"]
    print(f"unclip: runs go to the Prefect server at {state['ui_url']}: watch them there", file=sys.stderr)
    return state["ui_url"]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve(args) -> int:
    """``unclip server``: run until Ctrl-C; everything it started stops with it."""
    import signal as _signal

    from unclip import locks
    from unclip.prefect_server import PrefectServer, running_server, stop_background

    home = Path(args.workdir).resolve() / "prefect"
    if args.stop:
        return 0 if stop_background(home) else 1
    if running_server(home):
        print(f"unclip: a server for this workdir is already running ({home / 'server.json'}); "
              "stop it first with --stop", file=sys.stderr)
        return 1
    server = PrefectServer(home, port=args.port, auth=args.auth).start()
    for sig in (_signal.SIGINT, _signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        _signal.signal(sig, _interrupt)
    try:
        server.ensure_pool()
        server.set_tag_limit(locks.GPU_TAG, args.gpus)
        deployments = server.deploy_all()
        worker = None if args.no_worker else server.start_worker()
        print(f"Prefect UI:  {server.ui_url}\nAPI:         {server.api_url}\ndatabase:    {server.database}\n"
              f"work pool:   unclip-process ({'worker running' if worker else 'no worker'})\n"
              f"deployments: {', '.join(sorted(d['name'] for d in deployments))}\n"
              f"run one:     PREFECT_API_URL={server.api_url} prefect deployment run data-refresh/data-refresh\n"
              "Ctrl-C stops the server and the worker.", flush=True)
        while server.proc.poll() is None and (worker is None or worker.poll() is None):
            time.sleep(1)
        print("unclip: the server or the worker exited; see " + str(home / "*.log"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def list_catalog(args) -> int:
    import json

    from unclip import catalog, storage

    where = args.catalog or catalog.locate(storage.absolute(args.workdir))[0]
    rows = {"datasets": catalog.datasets, "runs": catalog.runs, "models": catalog.models}[args.command](where)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no {args.command} in {where}")
        return 0
    if args.command == "datasets":
        head = f"{'dataset':<12}{'release':<9}{'version':<21}{'created':<27}{'rows':>10}{'shards':>8}  {'pca':<17}{'code':<28}previous"
        print(head + "\n" + "-" * len(head))
        for r in rows:
            print(f"{r['name']:<12}{r['release']:<9}{r['version']:<21}{r['created_at']:<27}{r['rows']:>10,}{r['shards']:>8,}  "
                  f"{str(r.get('pca_version')):<17}{r['code_version']:<28}{r.get('previous') or '-'}")
    elif args.command == "models":
        head = f"{'kind':<16}{'version':<30}{'created':<27}{'run':<30}{'dataset':<21}{'code':<28}key metrics"
        print(head + "\n" + "-" * len(head))
        for r in rows:
            key = {k: v for k, v in r.get("metrics", {}).items() if k in MODEL_KEY_METRICS}
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in key.items())
            print(f"{r['kind']:<16}{r['version']:<30}{r['created_at']:<27}{r['run_id']:<30}{r['dataset_version']:<21}"
                  f"{r['code_version']:<28}{shown or '-'}")
    else:
        head = f"{'run':<30}{'state':<12}{'dataset':<29}{'pca':<17}{'code':<28}key metrics"
        print(head + "\n" + "-" * len(head))
        for r in rows:
            key = {k: v for k, v in r.get("metrics", {}).items() if k.split("/")[-1] in KEY_METRICS}
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in key.items())
            state = "stopped" if catalog.run_stopped(r) else r["state"]
            print(f"{r['run_id']:<30}{state[:11]:<12}{r['release'] + ' ' + r['dataset_version']:<29}"
                  f"{str(r.get('pca_version')):<17}{r['code_version']:<28}{shown or '-'}")
    return 0


MODEL_KEY_METRICS = ("t2i_recall@5", "i2t_recall@5", "zeroshot_colour_acc", "zeroshot_shape_acc", "cosine_true",
                     "cosine_text_baseline", "nll_per_code")
KEY_METRICS = ("heldout_relative_mse_pca_quantised", "t2i_recall@5", "i2t_recall@5", "zeroshot_colour_acc",
               "explained_variance_ratio_kept", "cosine_true")


PRIOR_SUMMARY = ("cosine_true", "cosine_true_1", "cosine_text_baseline", "cosine_unrelated", "i2i_recall@1",
                 "i2i_recall@5", "i2i_recall@5_chance", "nll_per_code", "nll_per_code_uniform", "code_acc",
                 "code_acc_chance", "cosine_true_ceiling", "heldout_pairs")


def training_summary(run: dict) -> list[str]:
    """The demo's training run: its models and, from ``eval_priors``, both priors side by side."""
    lines = ["", f"training run {run['run_id']} ({run['state']}); `unclip runs --workdir ...` lists it"]
    lines += [f"  model {name}: {version}" for name, version in run.get("models", {}).items()]
    metrics = run.get("metrics", {})
    priors = [p for p in ("prior_diffusion", "prior_ar") if any(k.startswith(f"eval_priors/{p}/") for k in metrics)]
    if priors:
        lines += ["", "priors on the same held-out pairs (eval_priors):", f"  {'metric':<24}" +
                  "".join(f"{p:>18}" for p in priors)]
        for m in PRIOR_SUMMARY:
            vals = [metrics.get(f"eval_priors/{p}/{m}") for p in priors]
            if any(v is not None for v in vals):
                lines.append(f"  {m:<24}" + "".join(f"{'-':>18}" if v is None else f"{v:>18.4g}" for v in vals))
        sweep = sorted((float(k.rsplit("_", 1)[1]), v) for k, v in metrics.items()
                       if k.startswith("eval_priors/prior_diffusion/cosine_true@guidance_"))
        if sweep:
            lines.append("  diffusion prior cosine_true by guidance scale: " + ", ".join(f"{g:g}: {v:.4f}" for g, v in sweep))
    images = [s for s in ("decoder", "upsampler1", "upsampler2") if s in run.get("stages", {})]
    for stage in images:
        m = run["stages"][stage].get("metrics", {})
        got = ", ".join(f"{k} {m[k]:.4g}" for k in ("heldout_mse", "heldout_mse_zero_image", "psnr", "psnr_bicubic",
                                                   "psnr_mean", "psnr_posterior_mean", "detail", "detail_bicubic")
                        if isinstance(m.get(k), float))
        lines.append(f"{stage}: {m.get('steps')} steps; held-out {got}")
    gen = run.get("stages", {}).get("eval_generation")
    if gen:
        m = gen.get("metrics", {})
        modes = [k for k in ("real", "real_at_decoder_size", "real_upsampled", "prior_diffusion", "prior_ar",
                             "text_embedding", "caption_only") if f"{k}/clip_score" in m or f"{k}/colour_acc" in m]
        labels = {"real_at_decoder_size": "real shrunk", "real_upsampled": "real upsampled"}
        if modes:
            lines += ["", f"text -> image on {m.get('captions')} held-out captions, judged at {m.get('metrics_at_size')} "
                      f"px (eval_generation; real: the held-out images; real shrunk: them at the decoder's side; real "
                      "upsampled: those through the upsamplers; decoder_*: each mode's images at the decoder's side):",
                      f"  {'metric':<18}" + "".join(f"{labels.get(k, k):>17}" for k in modes)]
            for metric in GENERATION_SUMMARY:
                vals = [m.get(f"{k}/{metric}") for k in modes]
                if any(isinstance(v, float) for v in vals):
                    lines.append(f"  {metric:<18}" + "".join(f"{v:>17.4g}" if isinstance(v, float) else f"{'-':>17}"
                                                             for v in vals))
        elif m.get("skipped"):
            lines.append(f"eval_generation skipped: {m['skipped']}")
        out = gen.get("outputs", {})
        if out.get("grid"):
            lines.append(f"sample grid: {out['grid']}")
        if out.get("samples"):
            lines.append(f"generated images: {out['samples']} (index.json lists caption, mode, seed, models); "
                         f"more with `unclip generate --workdir ... --out DIR \"a caption\"`")
    return lines


GENERATION_SUMMARY = ("clip_score", "fd_clip", "colour_acc", "colour_acc_chance", "shape_acc", "shape_acc_chance",
                      "colour_auc", "shape_auc", "decoder_colour_auc", "decoder_shape_auc")


def summary(records: dict, workdir: str, config, seconds: float, release: dict | None = None) -> str:
    """The end-of-run report: per stage rows in/kept/dropped and top reasons, versions, outputs."""
    data = {k: v for k, v in records.items() if k != "train"}
    lines = [f"\nunclip: {len(data)} data stage(s)" + (f" and {len(records['train'].get('stages', {}))} training "
             "stage(s)" if "train" in records else "") + f" done in {seconds:.1f} s; workdir {workdir}", ""]
    head = f"{'stage':<16}{'rows in':>10}{'kept':>10}{'dropped':>10}   drops by reason"
    lines += [head, "-" * len(head)]
    for stage, r in data.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["drops_by_reason"].items(), key=lambda kv: -kv[1]))
        dropped = sum(r["drops_by_reason"].values())
        lines.append(f"{stage:<16}{r['rows_in']:>10,}{r['rows_kept']:>10,}{dropped:>10,}   {reasons or '-'}")
    last = data[list(data)[-1]]
    lines += ["", f"dataset version: {last.get('dataset_version')}   code version: {last.get('code_version')}"]
    if "pca" in records:
        m = records["pca"]["metrics"]
        lines.append(
            f"pca {records['pca']['pca_version']}: {m['n_components']} of {m.get('dim', 1024)} components keep "
            f"{m['explained_variance_ratio_kept']:.4f} of the variance; relative MSE {m['relative_mse_pca']:.5f} "
            f"(PCA), {m['relative_mse_pca_quantised']:.5f} (PCA + {config.pca.n_buckets} buckets)")
    if "clip" in records:
        m = records["clip"]["metrics"]
        how = "trained here" if m.get("trained") else "already in the catalog, not retrained"
        lines.append(f"clip model {m.get('model_version')} ({how}): held-out recall@5 text->image "
                     f"{m.get('t2i_recall@5', float('nan')):.3f}, image->text {m.get('i2t_recall@5', float('nan')):.3f} "
                     f"(chance {m.get('recall@5_chance', float('nan')):.4f}, gallery {m.get('gallery')}); zero-shot "
                     f"colour {m.get('zeroshot_colour_acc', float('nan')):.3f} (chance "
                     f"{m.get('zeroshot_colour_chance', float('nan')):.3f}), shape "
                     f"{m.get('zeroshot_shape_acc', float('nan')):.3f} (chance "
                     f"{m.get('zeroshot_shape_chance', float('nan')):.3f}); linear probe of the image embedding "
                     f"(AUC, chance 0.5): colour {m.get('probe_colour_auc', float('nan')):.3f}, shape "
                     f"{m.get('probe_shape_auc', float('nan')):.3f}")
    truth = {k[len("truth/"):]: v for k, v in records.get("semantic_filter", {}).get("metrics", {}).items()
             if k.startswith("truth/")}
    if truth:
        def pct(v):
            return "-" if v is None else f"{v:.2f}"

        lines.append(f"semantic filter against the demo's planted rows: clip_score precision "
                     f"{pct(truth.get('clip_score_precision'))} recall {pct(truth.get('clip_score_recall'))} "
                     f"(wrong captions); near_duplicate precision {pct(truth.get('near_duplicate_precision'))} "
                     f"recall {pct(truth.get('near_duplicate_recall'))}")
    if "embed" in records and config.embed.model.seed is not None:
        lines.append(f"note: embeddings come from a randomly initialised CLIP ({config.embed.model.arch}, seed "
                     f"{config.embed.model.seed}); CLIP scores and near-duplicate similarities are not meaningful "
                     "until a trained checkpoint is configured.")
    if "train" in records:
        lines += training_summary(records["train"])
    if release is not None:
        lines.append(f"released as dataset {release['name']} {release['release']} ({release['version']}); "
                     f"`unclip datasets|models --workdir {workdir}` lists the catalog")
    lines += ["", f"manifest:   {workdir}/manifest.json", f"drops:      {workdir}/drops/"]
    if "semantic_filter" in records:
        lines.append(f"embeddings: {workdir}/embeddings/")
    if "pca" in records:
        lines.append(f"pca:        {records['pca']['outputs']['pca']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
