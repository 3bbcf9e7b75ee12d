"""RunConfig.from_dict / to_dict: the record round-trips what the results database stores, and an older row
reads back with the documented defaults and the key it was stored under."""

import json
from dataclasses import fields, replace
from types import SimpleNamespace

from iqa.cache.results import ResultsDB
from iqa.heads.training.config import RunConfig, complete_run, run_key
from iqa.heads.training.trainer import TrainSettings

PLAIN = RunConfig("koniq10k", "koniq10k", "swin-t", "baseline", "relu", "relu", 8)
CONFIGS = [
    PLAIN,
    replace(PLAIN, layers=(4, 3)),
    replace(PLAIN, layers=(4, 3), fuse="attention", head="sig", act1="sigmoid", act2="lrelu"),
    replace(PLAIN, head="ridge", act1="ridge", act2="ridge"),
    replace(PLAIN, head="hyper", act1="hyper", act2="hyper", layers=(2,), mask_k=50.0),
    replace(PLAIN, head="hyper", act1="hyper", act2="hyper", hyper_target="eq16", dropout="input", keep=0.7),
    replace(PLAIN, regime="lora", tag="tiny", lora_rank=8, backbone_lr=1e-5, physical_batch=4, accumulate=3,
            optimizer="adamw", weight_decay=0.01, compute_dtype="bfloat16", select="val", l2norm=True),
]


def outcome(status="done"):
    return SimpleNamespace(status=status, best_epoch=3, best_srcc=0.8, best_plcc=0.7, last_srcc=0.79, last_plcc=0.69,
                           diverged_epoch=None, curves={"srcc": [0.8]}, gates=None)


def test_a_config_round_trips_through_its_dict_json_and_the_database(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    db.record([(run_key(c, "fp", "rows"), c.to_dict(), "fp", outcome()) for c in CONFIGS])
    for config, stored in zip(CONFIGS, db.runs()):
        assert RunConfig.from_dict(config.to_dict()) == config
        assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        back = RunConfig.from_dict(stored)  # the config merged with its outcome columns
        assert back == config and back.to_dict() == config.to_dict()
        assert run_key(back, "fp", "rows") == stored["key"]


def test_an_older_row_reads_back_with_the_documented_defaults_and_its_key():
    # a row stored before `layers` and `fuse` existed has neither; its key is pinned (tests/test_heads_layers.py)
    old = RunConfig("a", "a", "swin-t", "baseline", "relu", "relu", 8).to_dict()
    assert "layers" not in old and "fuse" not in old
    config = RunConfig.from_dict(old)
    assert config.layers is None and config.fuse is None
    assert run_key(config, "f", "r") == "987571350937d50a6b9a519460c360fc7d066ce2e45f6417a02d78191cb849bf"
    # a hand-made row of only the grid's axes: every other field at the default a run without it trained with
    minimal = {"train_dataset": "clive", "test_dataset": "clive", "backbone": "siglip2", "head": "baseline",
               "act1": "relu", "act2": "relu", "seed": 19, "status": "done", "best_srcc": 0.8}
    filled = complete_run(minimal)
    defaults = {"mask_k": 100.0, "dropout": None, "keep": 1.0, "regime": "frozen", "tag": None, "layers": None,
                "fuse": None, "select": "test", "micro_batch": 2, "compute_dtype": None, "lora_rank": None}
    assert {k: filled[k] for k in defaults} == defaults
    assert filled["status"] == "done" and filled["best_srcc"] == 0.8  # the outcome is kept
    assert RunConfig.from_dict(filled) == RunConfig.from_dict(minimal)


def test_values_are_taken_as_stored_so_a_stored_row_gives_back_its_own_dict():
    row = PLAIN.to_dict() | {"mask_k": 100}  # an int mask_k, as a hand-written grid may have stored it
    assert RunConfig.from_dict(row).to_dict() == row
    assert json.dumps(RunConfig.from_dict(row).to_dict(), sort_keys=True) == json.dumps(row, sort_keys=True)


def test_a_config_sets_every_train_setting_but_the_hidden_width_the_recipe_fixes():
    for config in CONFIGS:
        options = config.trainer_options()
        assert set(options) == {f.name for f in fields(TrainSettings)} - {"hidden"}
        settings = TrainSettings(**options)
        assert all(getattr(settings, name) == getattr(config, name) for name in options)
