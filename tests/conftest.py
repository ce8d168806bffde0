"""Shared fixtures: a quiet, offline environment and a temporary Prefect API for the flow tests."""

from __future__ import annotations

import os

# nothing may try the network; set before Prefect or img2dataset are imported
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server and database for the session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def data_half_config(cfg: dict) -> dict:
    """The demo config as the data half's tests use it: embeddings from a seeded random
    initialisation of ``unclip-tiny-vit`` (the score distributions their thresholds were chosen
    against) and no CLIP training in the pipeline; the demo's trained-CLIP story has its own test."""
    cfg["embed"]["model"] = {"arch": "unclip-tiny-vit", "seed": 0}
    cfg["train"]["clip_in_data_pipeline"] = False
    cfg["semantic_filter"] = {"min_clip_score": None, "near_dup": None}
    return cfg


def tar_headers(pattern: str) -> tuple[int, int]:
    """(members, members with a PAX extended header) over the tar files matching the glob ``pattern``
    (recursive): the shards the ingest's workers write have none (``egress.set_tar_format_from_env``)."""
    import glob
    import tarfile

    members = pax = 0
    for path in glob.glob(pattern, recursive=True):
        with tarfile.open(path) as tar:
            for member in tar:
                members += 1
                pax += bool(member.pax_headers)
    return members, pax
