"""The one config schema: flags and files merge, and bad input fails naming the field."""

import pytest

from zhchat.cli import main
from zhchat.config import ConfigError, RunConfig, check_stage_inputs, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_defaults_validate_and_chain_paths():
    cfg = load_config(None, {"workdir": "/w"}).resolved()
    assert cfg.ingest.out == "/w/ingest"
    assert cfg.preprocess.input == "/w/ingest" and cfg.preprocess.out == "/w/data"
    assert cfg.train.data == "/w/data" and cfg.eval.model == "/w/train" and cfg.serve.model == "/w/train"


def test_flags_override_file_and_none_keeps_file(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 7\n  preset: tiny\n")
    cfg = load_config(path, {"train": {"max_steps": 9, "preset": None}})
    assert cfg.train.max_steps == 9 and cfg.train.preset == "tiny"


@pytest.mark.parametrize("text, field, reason", [
    ("train:\n  max_stepz: 3\n", "train.max_stepz", "unknown key"),
    ("train:\n  max_steps: many\n", "train.max_steps", "integer"),
    ("train:\n  max_steps: 0\n", "train.max_steps", "greater than or equal to 1"),
    ("preprocess:\n  split:\n    validation: 0.6\n    test: 0.5\n", "preprocess.split", "below 1"),
    ("preprocess:\n  clean:\n    rules: [['(unclosed', 'x']]\n", "preprocess.clean.rules", "not a valid regex"),
    ("ingest:\n  inputs: [/definitely/not/here]\n", "ingest.inputs", "does not exist"),
    ("serve:\n  min_replicas: 5\n  max_replicas: 2\n", "serve", "min_replicas"),
    ("crawl:\n  seeds: ['ftp://x']\n", "crawl.seeds", "http"),
    ("- just\n- a list\n", "mapping", "mapping"),
])
def test_bad_config_names_field_and_reason(tmp_path, text, field, reason):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert field in str(e.value) and reason in str(e.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_config_from_environment_variable(monkeypatch):
    monkeypatch.setenv("ZC", "train:\n  max_steps: 5\n")
    assert load_config("env://ZC").train.max_steps == 5
    with pytest.raises(ConfigError, match="NOPE_VAR"):
        load_config("env://NOPE_VAR")


def test_stage_inputs_checked_before_work(tmp_path):
    cfg = load_config(None, {"preprocess": {"in": str(tmp_path / "missing")}}).resolved()
    with pytest.raises(ConfigError, match="preprocess.in: path does not exist"):
        check_stage_inputs(cfg, "preprocess")


def test_cli_exits_2_with_field_name(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nothing.txt")]) == 2
    assert "ingest.inputs" in capsys.readouterr().err
    assert main(["train", "--config", write(tmp_path, "train: {lr: -1}\n")]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert isinstance(RunConfig(), RunConfig)
