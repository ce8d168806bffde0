"""Run configuration: the shipped YAML files load; wrong configs fail before any work, naming the field."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from unclip import cli
from unclip.config import ConfigError, load_config, parse_config, stages_until
from unclip.preflight import check_config

ROOT = Path(__file__).resolve().parent.parent


def _demo_dict() -> dict:
    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def test_shipped_configs_load():
    demo = load_config(ROOT / "configs" / "demo.yaml", variables={"workdir": "/w"})
    assert [s.name for s in demo.sources] == ["clip", "dalle"]
    assert demo.sources[0].url_list == "/w/demo/lists/clip/*.parquet"
    assert demo.ingest.url_policy.allow_hosts == ("127.0.0.1",)
    # the demo trains its CLIP in the data pipeline and embeds with that model version
    assert demo.embed.model.catalog == "clip@latest" and demo.train.clip_in_data_pipeline
    assert demo.train.clip.arch == "unclip-tiny-timm" and demo.semantic_filter.min_clip_score == 0.6
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert (paper.pca.n_components, paper.pca.n_buckets) == (319, 1024)
    assert paper.embed.model.arch == "unclip-ViT-H-16-256"
    assert [s.for_generative for s in paper.sources] == [False, True]
    assert paper.ingest.url_policy.allow_hosts == ()
    # the paper run scales out: Ray for shard tasks and downloads, FSDP over 8 GPUs for training
    assert (paper.orchestration.task_runner, paper.ingest.distributor) == ("ray", "ray")
    assert (paper.train.launch.strategy, paper.train.launch.nproc_per_node) == ("fsdp", 8)
    assert (demo.train.launch.strategy, demo.orchestration.task_runner) == ("ddp", "thread")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["ingest"].update(bogus=1), "ingest.bogus: unknown field"),
        (lambda d: d["ingest"].update(threads=0), "ingest.threads"),
        (lambda d: d["pca"].update(n_buckets=1), "pca.n_buckets"),
        (lambda d: d["orchestration"].update(task_runner="dask"), "orchestration.task_runner"),
        (lambda d: d["train"]["launch"].update(nnodes=2), "train.launch: Value error, rdzv_endpoint"),
        (lambda d: d["train"]["launch"].update(strategy="zero"), "train.launch.strategy"),
        (lambda d: d["sources"][1].update(name="Bad Name"), "sources[1].name"),
        (lambda d: d["sources"][0].pop("url_list"), "sources[0].url_list"),
        (lambda d: d.update(sources=[]), "sources"),
        (lambda d: d["embed"]["model"].update(checkpoint="/x.pt"), "embed.model"),
        (lambda d: d["ingest"]["url_policy"].update(allow_hosts=["10.0.0.0/33"]), "ingest.url_policy.allow_hosts"),
        (lambda d: d["ingest"]["url_policy"].update(allowed_schemes=["ftp"]), "ingest.url_policy.allowed_schemes"),
        (lambda d: d["basic_filter"].update(min_caption_chars=10, max_caption_chars=5), "basic_filter"),
        (lambda d: d["sources"].append(dict(d["sources"][0])), "source names must be unique"),
        (lambda d: d["embed"]["model"].update(arch="unclip-tiny"), "arch comes from the catalog"),
        (lambda d: d["train"]["clip"].update(init="checkpoint"), "train.clip: Value error, init: checkpoint needs"),
        (lambda d: d["train"]["clip"].update(batch_size=0), "train.clip.batch_size"),
        (lambda d: d["train"]["clip"].update(stepz=3), "train.clip.stepz: unknown field"),
        (lambda d: d["orchestration"].update(shards_per_task=4),
         "orchestration: Value error, `shards_per_task` was renamed to `filter_shards_per_task`"),
    ],
)
def test_bad_values_name_the_field(mutate, field):
    d = _demo_dict()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        parse_config(d, "demo.yaml")
    assert field in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_until_names_a_stage():
    assert stages_until("embed") == ("ingest", "basic_filter", "clip", "embed")
    with pytest.raises(ConfigError, match="--until"):
        stages_until("train")


def _config_with_list(tmp_path, columns: dict) -> "object":
    lists = tmp_path / "lists"
    lists.mkdir()
    pq.write_table(pa.table(columns), lists / "a.parquet")
    d = _demo_dict()
    d["sources"] = [{"name": "mine", "url_list": str(lists / "*.parquet"), "caption_col": "text"}]
    return parse_config(d)


def test_preflight_missing_source_files(tmp_path):
    d = _demo_dict()
    d["sources"] = [{"name": "a", "url_list": str(tmp_path / "x.parquet")},
                    {"name": "b", "url_list": str(tmp_path / "none/*.csv")}]
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"sources\[1\]\.url_list: no \.parquet or \.csv file"):
        check_config(parse_config(d), ("ingest",))
    d["sources"].pop()
    with pytest.raises(ConfigError, match=r"sources\[0\]\.url_list: cannot read .*x\.parquet"):
        check_config(parse_config(d), ("ingest",))


def test_preflight_missing_column(tmp_path):
    cfg = _config_with_list(tmp_path, {"url": ["http://a/b.jpg"], "caption": ["x"]})
    with pytest.raises(ConfigError, match=r"sources\[0\]\.caption_col: column 'text' not found"):
        check_config(cfg, ("ingest",))


def test_preflight_names_the_package_a_distributor_needs(tmp_path, monkeypatch):
    import importlib.util

    cfg = _config_with_list(tmp_path, {"url": ["http://a/b.jpg"], "text": ["x"]})
    d = cfg.model_dump(mode="json")
    for distributor in ("ray", "pyspark"):  # the URL policy reaches both (tests/test_ray.py, test_spark.py)
        d["ingest"]["distributor"] = distributor
        check_config(parse_config(d), ("ingest",))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ray", "pyspark")
                        else find_spec(name, *a))
    with pytest.raises(ConfigError, match="ingest.distributor: 'pyspark' needs the pyspark package"):
        check_config(parse_config(d), ("ingest",))
    d["ingest"]["distributor"] = "multiprocessing"
    d["orchestration"]["task_runner"] = "ray"
    with pytest.raises(ConfigError, match="orchestration.task_runner: 'ray' needs the ray package"):
        check_config(parse_config(d), ("ingest",))


def test_preflight_unknown_architecture(tmp_path):
    cfg = _config_with_list(tmp_path, {"url": ["http://a/b.jpg"], "text": ["x"]})
    check_config(cfg, ("ingest", "embed"))  # the shipped demo model is registered
    d = cfg.model_dump(mode="json")
    d["embed"]["model"] = {"arch": "no-such-clip", "seed": 0}
    with pytest.raises(ConfigError, match="embed.model.arch: unknown open_clip architecture"):
        check_config(parse_config(d), ("embed",))


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    d = _demo_dict()
    d["ingest"]["partition_rows"] = -5
    bad.write_text(yaml.safe_dump(d))
    rc = cli.main(["data", "--config", str(bad), "--workdir", str(tmp_path / "w")])
    assert rc == 2
    assert "ingest.partition_rows" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_set_overrides_take_dotted_paths_and_yaml_values():
    from unclip.cli import parse_sets

    got = parse_sets(["train.clip.steps=200", "train.clip.source_weights={clip: 1, dalle: 3}",
                      "semantic_filter.near_dup=null", "name=other"])
    assert got == {"train": {"clip": {"steps": 200, "source_weights": {"clip": 1, "dalle": 3}}},
                   "semantic_filter": {"near_dup": None}, "name": "other"}
    cfg = load_config(ROOT / "configs" / "demo.yaml", got, variables={"workdir": "/w"})
    assert cfg.train.clip.steps == 200 and cfg.train.clip.source_weights == {"clip": 1.0, "dalle": 3.0}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_sets(["train.clip.steps"])
    with pytest.raises(ConfigError, match="train.clip.steps"):
        load_config(ROOT / "configs" / "demo.yaml", parse_sets(["train.clip.steps=-1"]))
