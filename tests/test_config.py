"""Every shipped config validates; bad values are rejected with the key named."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO

from smalltalk.config import ConfigError, DataConfig, TokenizerConfig, load_config, validate_config

SHIPPED = [REPO / "config.yaml", *sorted((REPO / "tests" / "configs").glob("*.yaml"))]


def merged(path):
    """A test config as Snakemake sees it: --configfile extends the root config.yaml."""
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    if path.name == "config.yaml":
        return base
    for key, value in yaml.safe_load(path.read_text()).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = base[key] | value
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = validate_config(merged(path))
    DataConfig.from_config(config)
    TokenizerConfig.from_config(config)


def test_defaults_are_filled():
    config = load_config(REPO / "config.yaml")
    assert config["fields"] == {"text": "text", "id": "id", "source": "source"}
    assert config["on_bad_record"] == "error"


BASE = yaml.safe_load((REPO / "config.yaml").read_text())


def with_change(path: str, value):
    config = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


DELETE = object()

REJECTIONS = [
    ("unknown top-level key", "experts_count", 3, r"Additional properties .*'experts_count'"),
    ("unknown nested key", "tokenizer.vocab", 10, r"tokenizer: Additional properties .*'vocab'"),
    ("wrong type", "seq_len", "long", r"seq_len: 'long' is not of type 'integer'"),
    ("zero experts", "routing.n_experts", 0, r"routing.n_experts: 0 is less than the minimum"),
    ("prefix too long", "routing.prefix_len", 128, r"routing.prefix_len: .*M=128.*S=128"),
    ("splits do not sum to 1", "splits.val", 0.2, r"splits: fractions must sum to 1, got 1.15"),
    ("negative split", "splits.test", -0.05, r"splits.test: -0.05 is less than the minimum"),
    ("bad choice", "on_bad_record", "ignore", r"on_bad_record: 'ignore' is not one of"),
    ("missing required key", "inputs", DELETE, r"'inputs' is a required property"),
    ("empty inputs", "inputs", [], r"inputs: \[\] should be non-empty"),
    ("files per chunk", "files_per_chunk", 0, r"files_per_chunk: 0 is less than the minimum"),
    ("EM stop share", "routing.stop.changed_below", 5, r"routing.stop.changed_below: 5 is greater"),
    ("EM patience", "routing.stop.patience", 0, r"routing.stop.patience: 0 is less than the min"),
    (
        "EM stop typo",
        "routing.stop.changed",
        0.1,
        r"routing.stop: Additional properties .*'changed'",
    ),
]


@pytest.mark.parametrize(
    ("case", "key", "value", "message"), REJECTIONS, ids=[r[0] for r in REJECTIONS]
)
def test_rejections_name_the_key(case, key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(with_change(key, value))


def test_every_problem_is_reported_at_once():
    config = with_change("seq_len", "long")
    config["routing"]["n_experts"] = 0
    config["typo"] = 1
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    message = str(raised.value)
    assert "seq_len" in message and "routing.n_experts" in message and "typo" in message


def test_load_config_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
