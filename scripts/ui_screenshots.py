"""Screenshots of the Prefect UI as an engineer sees it after a data refresh (docs/ui.md).

Opens the real UI of a running server in headless Chromium (Debian's ``chromium``) and saves one PNG
per page: the refresh's flow-run page, its subflow runs, the artifacts of the run tree (counts
tables, lineage, the PCA plot, the dataset release), and the deployments page.

    python scripts/ui_screenshots.py --ui http://127.0.0.1:4200 --flow-run <id> --out docs/img/ui

Exit status 0 when every page was captured; pages are listed with their URLs on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from unclip.prefect_server import flow_run_tree

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-quic"]
# artifacts shown, in this order, when the refresh published them (key -> file name)
ARTIFACTS = {"dataset-release": "05-dataset-release", "ingest-counts": "06-ingest-counts",
             "basic-filter-counts": "07-basic-filter-counts", "semantic-filter-lineage": "08-semantic-filter-lineage",
             "pca-plot": "09-pca-plot", "pca-figures": "10-pca-figures", "ingest-progress": "11-ingest-progress"}


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def run_tree(api: str, flow_run: str) -> dict[str, str]:
    """id -> name of the flow run and all its subflow runs."""
    subflows = flow_run_tree(lambda path, body: _post(api, path, body), flow_run)
    return {flow_run: "", **{r["id"]: r["name"] for r in subflows}}


def pages(ui: str, flow_run: str) -> list[tuple[str, str]]:
    api = ui.rstrip("/") + "/api"
    tree = run_tree(api, flow_run)
    arts = {a["key"]: a for a in _post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": list(tree)}},
                                                                  "limit": 200}) if a.get("key")}
    stage = {name.split(":")[0]: i for i, name in tree.items() if name}
    # the UI opens a run page on its Logs tab (a ?tab= link is reset while the run loads), so the
    # subflows and task runs are shown through their own pages and the runs list
    out = [("01-refresh-flow-run", f"{ui}/runs/flow-run/{flow_run}"),
           ("02-runs", f"{ui}/runs"),
           ("03-basic-filter-flow-run", f"{ui}/runs/flow-run/{stage.get('basic-filter', flow_run)}"),
           ("04-embed-flow-run", f"{ui}/runs/flow-run/{stage.get('embed', flow_run)}")]
    out += [(name, f"{ui}/artifacts/artifact/{arts[key]['id']}") for key, name in ARTIFACTS.items() if key in arts]
    out += [("12-deployments", f"{ui}/deployments"), ("13-artifacts", f"{ui}/artifacts"),
            ("14-concurrency", f"{ui}/concurrency-limits")]
    return out


def screenshot(chromium: str, url: str, png: Path, width: int = 1440, height: int = 1100,
               wait_ms: int = 12000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={png}", url]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium failed on {url} ({res.returncode}): {res.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ui", required=True, help="the UI address, e.g. http://127.0.0.1:4200")
    p.add_argument("--flow-run", required=True, help="id of a finished data-refresh flow run")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    args = p.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no chromium on PATH (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, url in pages(args.ui.rstrip("/"), args.flow_run):
        screenshot(chromium, url, out / f"{name}.png")
        print(f"{name}.png  {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
