"""Checks that run before any work, so a wrong configuration fails in seconds with the field named.

pydantic already rejects unknown fields and bad values when the YAML is loaded; this module checks
what needs the outside world: that each source's URL lists exist and have the configured columns,
that the CLIP architecture is registered and its checkpoint exists, and that the environment will
not break Prefect's server.
"""

from __future__ import annotations

import importlib.util

import os
import site

from unclip import storage
from unclip.config import ConfigError, RunConfig


def check_environment() -> None:
    """img2dataset depends on the ``dataclasses`` backport, which shadows the standard library in
    Prefect's server process (site-packages first on its path) and kills it at start-up."""
    for d in site.getsitepackages():
        if os.path.exists(os.path.join(d, "dataclasses.py")):
            raise ConfigError(
                f"the obsolete 'dataclasses' backport is installed in {d}; it breaks Prefect's server on "
                "Python 3.11. Remove it with: pip uninstall -y dataclasses"
            )


def check_config(config: RunConfig, stages: tuple[str, ...]) -> None:
    from unclip.data import inputs

    ray_fields = [f for f, v in (("orchestration.task_runner", config.orchestration.task_runner),
                                 ("ingest.distributor", config.ingest.distributor if "ingest" in stages else ""))
                  if v == "ray"]
    if ray_fields and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"{ray_fields[0]}: 'ray' needs the ray package (pip install prefect-ray)")
    if "ingest" in stages:
        if config.ingest.distributor == "pyspark" and importlib.util.find_spec("pyspark") is None:
            raise ConfigError("ingest.distributor: 'pyspark' needs the pyspark package (pip install pyspark) "
                              "and Java 17 or newer")
        found = []
        for i, source in enumerate(config.sources):
            try:
                found.append(inputs.discover(source))
            except ConfigError as err:
                raise ConfigError(str(err).replace(f"sources[{source.name}]", f"sources[{i}]")) from None
        for i, (source, files) in enumerate(zip(config.sources, found)):
            inputs.check_columns(source, i, files)
    if "embed" in stages:
        from unclip.data.clip import known_architectures

        model = config.embed.model
        if model.catalog is None and model.arch not in known_architectures():
            raise ConfigError(f"embed.model.arch: unknown open_clip architecture {model.arch!r}")
        if model.checkpoint is not None and storage.is_local(model.checkpoint) and not storage.exists(model.checkpoint):
            raise ConfigError(f"embed.model.checkpoint: file not found: {model.checkpoint}")
        if model.pretrained is not None:
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(model.arch)
            if model.pretrained not in tags:
                raise ConfigError(f"embed.model.pretrained: {model.pretrained!r} is not a pretrained tag of "
                                  f"{model.arch} (known: {tags or 'none'})")
