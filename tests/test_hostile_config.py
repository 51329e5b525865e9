"""Hostile configs (issue 24's second pass): a value of the wrong type for any key of any
model, any bytes in a config file, any option of ``data build`` and any synthetic knob end in a
:class:`DataError` naming the key or the file, checked before any data loads; never a
``TypeError`` deep inside, never ``none`` taken for a number.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffkg_fast.cli import main
from diffkg_fast.data.build import build_dataset
from diffkg_fast.data.errors import DataError
from diffkg_fast.data.synthetic import SyntheticKnobs
from diffkg_fast.model.registry import MODELS
from diffkg_fast.train.config import RunConfig, config_defaults, resolve_config
from diffkg_fast.train.config_file import MAX_YAML_NODES, load_config_file

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
# Every (model, key, default) a config can hold; "model" and "patience" have tests of their own.
KEYS = [(m, k, v) for m in sorted(MODELS) for k, v in config_defaults(m).items()
        if k not in ("model", "patience")]


def wrong_for(default: Any) -> st.SearchStrategy:
    """Values of another type than ``default``'s (none included: only patience takes it)."""
    text = st.text(max_size=8).filter(lambda s: not s.strip().lstrip("[").rstrip("]").isdigit())
    common = st.one_of(st.none(), text, st.lists(st.text(max_size=3), min_size=1, max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    if isinstance(default, bool):
        return st.one_of(common, st.integers(), st.floats())
    if isinstance(default, int):
        return st.one_of(common, st.booleans(),
                         st.floats().filter(lambda f: not float(f).is_integer()))
    if isinstance(default, float):
        return st.one_of(common, st.booleans(), st.integers(min_value=10**309))
    if isinstance(default, str):
        return st.one_of(common.filter(lambda v: not isinstance(v, str)), st.integers(),
                         st.floats(), st.booleans())
    return st.one_of(st.none(), st.booleans(), st.lists(st.text(max_size=3), min_size=1))


@SETTINGS
@given(st.data())
def test_a_value_of_the_wrong_type_for_any_key_is_an_error_naming_it(data) -> None:
    model, key, default = data.draw(st.sampled_from(KEYS))
    value = data.draw(wrong_for(default))
    with pytest.raises(DataError) as exc:
        resolve_config(sets={"model": model, key: value})
    assert key in str(exc.value)
    # The same value in a config read back from a checkpoint (no explicit_values on the way).
    with pytest.raises(ValueError, match=key):
        RunConfig({"model": model, key: value})


@pytest.mark.parametrize("key", ["epoch", "batch", "test_batch", "lr", "seed", "eval_every",
                                 "device", "topk", "valid_metric"])
def test_none_is_a_value_only_of_patience(key) -> None:
    with pytest.raises(DataError, match=f"field '{key}': expected"):
        resolve_config(sets={key: None})
    assert resolve_config(sets={"patience": None})["patience"] is None


@pytest.mark.parametrize(("key", "value"), [("patient_codes", None), ("use_diffusion", None),
                                            ("triplet_num", None), ("res_lambda", None),
                                            ("lr", 10**400), ("reg", -(10**500))])
def test_diffkg_options_none_and_huge(key, value) -> None:
    """``patient_codes=none`` trained as false, ``triplet_num=none`` crashed in the range check,
    ``lr`` of 400 digits overflowed ``float()``."""
    with pytest.raises(DataError, match=f"field '{key}': expected"):
        resolve_config(sets={key: value})


# ------------------------------------------------------------------ config files
@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([".yaml", ".json"]))
def test_any_bytes_in_a_config_file_give_a_mapping_or_a_data_error(tmp_path_factory, raw,
                                                                   suffix) -> None:
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    path.write_bytes(raw)
    try:
        loaded = load_config_file(path)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(loaded, dict)


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("deep.yaml", "epoch: " + "[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ("deep.json", '{"epoch": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply"),
    ("digits.yaml", "epoch: " + "1" * 5000, "not valid YAML"),
    ("digits.json", '{"epoch": ' + "1" * 5000 + "}", "not valid JSON"),
    ("many.yaml", "reg: [" + ",".join(["1"] * (MAX_YAML_NODES + 1)) + "]", "more than 10,000"),
    ("big.json", '{"reg": "' + "x" * (1 << 20) + '"}', "larger than 1,048,576 bytes"),
])
def test_hostile_config_files_are_one_error_naming_the_file(tmp_path, name, text,
                                                            needle) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=needle) as exc:
        load_config_file(path)
    assert str(exc.value).startswith(str(path))


def test_a_config_read_from_dev_zero_stops_at_the_limit() -> None:
    with pytest.raises(DataError, match="/dev/zero: larger than"):
        load_config_file("/dev/zero")


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path) -> None:
    doc = '&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for i in range(1, 9):
        doc = f"[{doc}, &a{i} [{','.join([f'*a{i - 1}'] * 10)}]]"
    path = tmp_path / "bomb.yaml"
    path.write_text(f"reg: {doc}\n")
    with pytest.raises(DataError, match="field 'reg': expected a number") as exc:
        resolve_config(str(path))
    assert len(str(exc.value)) < 300


def test_a_megabyte_key_is_quoted_as_an_excerpt() -> None:
    with pytest.raises(DataError) as exc:
        resolve_config(sets={"k" * 1_000_000: 1})
    assert len(str(exc.value)) < 2000 and "kkk…" in str(exc.value)


# ------------------------------------------------------------------ data build options, knobs
@pytest.mark.parametrize(("key", "value"), [
    ("seed", None), ("n_patients", None), ("split", None), ("ddi", None), ("name", 5),
    ("cooc_min_lift", 10**400), ("cooc_top_k", "many")])
def test_build_options_are_typed_none_only_where_optional(key, value) -> None:
    """``seed=none`` built a random cohort, ``name=5`` a file the loader then refused."""
    with pytest.raises(DataError, match=f"field '{key}': expected"):
        build_dataset("synthetic", **{"n_patients": 30, key: value})


KNOBS = sorted(f for f in SyntheticKnobs.__dataclass_fields__)


@SETTINGS
@given(st.sampled_from(KNOBS), st.one_of(
    st.none(), st.booleans(), st.text(max_size=5), st.integers(-5, 5),
    st.floats(-2, 4), st.sampled_from([math.nan, math.inf, -math.inf, 1e300]),
    st.lists(st.floats(-1, 2), max_size=3)))
def test_any_knob_value_builds_or_is_an_error_naming_the_knob(knob, value) -> None:
    try:
        ds = build_dataset("synthetic", n_patients=30, **{knob: value})
    except DataError as exc:
        assert f"field '{knob}'" in str(exc)
    else:
        ds.validate()


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize(("args", "needle"), [
    (["--data", "missing.npz", "--set", "epoch=0"], "epoch must be >= 1"),
    (["--data", "missing.npz", "--set", "latdmi=8"], "field 'latdmi'"),
    (["--data", "missing.npz", "--set", "epoch=none"], "field 'epoch'"),
    (["--data", ""], "field '--data': empty"),
])
def test_train_checks_its_config_before_the_data(tmp_path, monkeypatch, capsys, args,
                                                 needle) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.parametrize("argv", [["data", "stats", "x.npz", "--max-bytes", "-5"],
                                  ["compare", "--threads", "0"],
                                  ["compare", "--threads", "-1"]])
def test_counts_must_be_positive(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "invalid positive integer value" in capsys.readouterr().err


def test_config_json_round_trip_keeps_its_types(tmp_path) -> None:
    cfg = resolve_config(sets={"latdim": 8, "dims": [16], "patience": None})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert resolve_config(str(path)).to_dict() == cfg.to_dict()
