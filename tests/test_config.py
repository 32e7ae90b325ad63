"""Every shipped config validates; bad values are rejected with the key named."""

from __future__ import annotations

import copy
import math

import pytest
import yaml
from conftest import REPO

from smalltalk import cli
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


@pytest.mark.parametrize(
    "overlay", sorted((REPO / "benchmarks" / "study").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_study_overlay_validates_over_the_shipped_config(overlay):
    """benchmarks/study/run.sh runs each overlay over config.yaml (--configfile, merged key by
    key): it validates, and it changes the settings it names and no other."""

    def leaves(node, path=()):
        if isinstance(node, dict):
            return {
                k: v for key, child in node.items() for k, v in leaves(child, (*path, key)).items()
            }
        return {path: node}

    shipped = leaves(load_config(REPO / "config.yaml"))
    changes = leaves(yaml.safe_load(overlay.read_text()))
    assert leaves(load_config(REPO / "config.yaml", overlay)) == shipped | changes


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
    ("seed too large", "seed", 10**23, r"seed: 100000000000000000000000 is greater than the max"),
    ("prefix too long", "routing.prefix_len", 128, r"routing.prefix_len: .*M=128.*S=128"),
    ("splits do not sum to 1", "splits.val", 0.2, r"splits: fractions must sum to 1, got 1.15"),
    ("negative split", "splits.test", -0.05, r"splits.test: -0.05 is less than the minimum"),
    ("bad choice", "on_bad_record", "ignore", r"on_bad_record: 'ignore' is not one of"),
    ("missing required key", "inputs", DELETE, r"'inputs' is a required property"),
    ("empty inputs", "inputs", [], r"inputs: \[\] should be non-empty"),
    ("files per chunk", "files_per_chunk", 0, r"files_per_chunk: 0 is less than the minimum"),
    ("topk above E", "eval.topk", 5, r"eval.topk: 5 experts to mix, but there are only E=4"),
    ("infinite lr", "training.expert.lr", math.inf, r"training.expert.lr: inf is not a finite"),
    ("nan min_lr", "training.router.min_lr", math.nan, r"training.router.min_lr: nan is not a fin"),
    ("too few EM sequences", "routing.sequences_per_round", 6, r"sequences_per_round: N=6 .*E=4"),
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


def test_checks_across_keys_are_reported_beside_values_out_of_range():
    config = with_change("routing.prefix_len", 128)
    config["files_per_chunk"] = 0
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    assert "routing.prefix_len: the routing prefix" in str(raised.value)
    assert "files_per_chunk: 0 is less than the minimum" in str(raised.value)


def test_load_config_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


SECTIONS = ["routing", "splits", "eval", "training", "models", "harness", "tokenizer"]


@pytest.mark.parametrize("value", [None, "text", [1]], ids=["null", "string", "list"])
@pytest.mark.parametrize("key", [*SECTIONS, "training.router"])
def test_a_section_of_the_wrong_type_is_reported_by_its_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: .* is not of type 'object'"):
        validate_config(with_change(key, value))


def test_a_null_list_is_reported_by_its_key():
    with pytest.raises(ConfigError, match=r"eval.prefix_lens: None is not of type 'array'"):
        validate_config(with_change("eval.prefix_lens", None))


def test_an_unset_topk_mixes_two_experts_or_all_of_them_when_fewer():
    assert validate_config(with_change("eval.topk", DELETE))["eval"]["topk"] == 2
    config = with_change("eval.topk", DELETE)
    config["routing"]["n_experts"] = 1
    assert validate_config(config)["eval"]["topk"] == 1


def test_em_rounds_that_leave_every_router_some_data_are_accepted():
    for sequences in (4, 7, 8, 4096):  # E = 4: ceil(7/4) = 2 leaves the last router 1
        validate_config(with_change("routing.sequences_per_round", sequences))
    config = with_change("routing.sequences_per_round", 2)
    config["routing"]["method"] = "random"  # no router to train
    validate_config(config)


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text((REPO / "config.yaml").read_text() + "seq_len: 64\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: .*duplicate key 'seq_len'"):
        load_config(path)


def test_check_config_merges_overlays_like_configfile(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("seq_len: 256\nrouting:\n  prefix_len: 64\n")
    argv = ["check-config", "--config", str(REPO / "config.yaml"), str(overlay), "--print"]
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seq_len"] == 256 and printed["routing"]["prefix_len"] == 64
    assert printed["routing"]["n_experts"] == BASE["routing"]["n_experts"]  # merged, not replaced
    assert cli.main(["check-config", "--config", str(overlay)]) == 1  # a partial file alone
    error = capsys.readouterr().err
    assert "'inputs' is a required property" in error and "Traceback" not in error


def test_a_train_config_built_in_python_has_the_schemas_defaults():
    import dataclasses

    from smalltalk.config import TrainConfig, load_schema

    schema = load_schema()["$defs"]["training"]["properties"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    shared = {key: spec["default"] for key, spec in schema.items() if "default" in spec}
    assert {"lr", "min_lr", "ckpt_every"} <= shared.keys()
    assert {key: defaults[key] for key in shared} == shared
