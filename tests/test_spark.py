"""img2dataset's pyspark distributor: the ingest stage on a local Spark gives the demo's planted
outcome, the URL policy's refusals at redirect hops and the body and pixel caps included, which only
the egress policy inside Spark's Python workers can produce."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from unclip.config import load_config
from conftest import data_half_config, tar_headers
from unclip.data import demo_source

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("java") is None, reason="pyspark needs Java 17 or newer (Debian: openjdk-17-jre)")
def test_ingest_on_pyspark_enforces_the_policy_in_sparks_workers(tmp_path, prefect_api):
    from unclip.flows.data import data_pipeline

    cfg = data_half_config(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    cfg["ingest"]["distributor"] = "pyspark"
    path = tmp_path / "spark.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(path, variables={"workdir": str(tmp_path / "w")})
    spec = demo_source.generate_demo_for_config(str(tmp_path / "w" / "demo"), config, size=160, seed=4)
    with spec.server():
        records = data_pipeline(config=config, workdir=str(tmp_path / "w"), until="ingest")
    planted = {r: n for (stage, r), n in spec.expected_drop_counts().items() if stage == "ingest"}
    assert records["ingest"]["drops_by_reason"] == planted
    assert {"url_policy:loopback", "url_policy:link_local", "body_too_large", "pixel_cap"} <= set(planted)
    assert records["ingest"]["rows_in"] == 160
    members, pax = tar_headers(str(tmp_path / "w" / "shards" / "**" / "*.tar"))  # Spark's workers: plain headers
    assert members > 0 and pax == 0, (members, pax)
