"""A new user's first hour with their own data (`data=files`): stage lengths that follow the data size, a held-out
slice that is proportional and said, mistakes named by the key that was set, image paths outside the image folder
refused, and bad samples reported the same way by every stage."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlm.data.readers import SampleError, make_reader
from vlm.data.synthetic_text import make_split
from vlm.registry import close_matches
from vlm.train import ConfigError, compose, run
from vlm.train.config_check import schema_keys
from vlm.data.files import _Part, check_files_options, heldout_indices, heldout_size
from vlm.train.resolvers import data_image_size
from short_runs import short_run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 training images (36 records), 40..56 px."""
    d = tmp_path_factory.mktemp("first_hour")
    make_split(d, "train", 12, seed=0, min_size=40, max_size=56, font_sizes=(10, 12))
    return d


def quick(stages: list[str], steps: int = 2) -> list[str]:
    return short_run(stages, steps=steps)


# ------------------------------------------------------------------------------------------- stage lengths
def test_each_stage_trains_at_most_data_epochs_passes(data, tmp_path, capsys):
    """micro on 36 records (4 held out: 32 train, 8 steps of 4 per epoch): sft's 1000 recipe steps are capped at
    data.epochs=2 passes (16 steps); pretrain's 2 steps are below the cap and stay."""
    cfg = compose("micro", ["data=files", f"data.train={data / 'train.json'}", "data.epochs=2",
                            *quick(["pretrain", "sft"]), "stage.sft.max_steps=1000", f"output_dir={tmp_path}"])
    res = run(cfg)
    assert [s.steps for s in res.stages] == [2, 16]
    out = capsys.readouterr().out
    assert "[sft] data.sft: 32 samples, at most 2 epochs (data.epochs): 16 steps of 4 = 2.0 epochs (the recipe's " \
           "1000 steps would be 125.0)" in out
    assert "[pretrain] data.pretrain: 32 samples, at most 2 epochs (data.epochs): 2 steps of 4" in out
    # the held-out slice is said: in each stage and for the evaluation set
    assert f"held out 4 of 36 samples of {data / 'train.json'} for evaluation (data.heldout=auto" in out
    assert f"[sft] data.sft: 32 of the 36 samples of {data / 'train.json'}: 4 are held out" in out


def test_data_epochs_null_keeps_the_recipe_steps(data):
    cfg = compose("micro", ["data=files", f"data.train={data / 'train.json'}", "data.epochs=null"])
    from vlm.data.datasets import build_dataset

    assert cfg.data.sft.epochs is None and build_dataset(cfg.data.sft).max_epochs is None
    assert build_dataset(compose("micro", ["data=files", f"data.train={data / 'train.json'}"]).data.sft).max_epochs \
        == 50


# -------------------------------------------------------------------------------------------- held-out slice
@pytest.mark.parametrize("n,want", [(2, 1), (5, 1), (36, 4), (300, 30), (2000, 200), (18000, 200)])
def test_heldout_auto_is_ten_percent_at_least_one_at_most_200(n, want):
    assert heldout_size(n) == want and len(heldout_indices(n, "auto", 0)) == want
    assert heldout_size(n, 7) == 7 and heldout_size(n, "7") == 7


# --------------------------------------------------------------------------------- errors naming their key
@pytest.mark.parametrize("word,best", [("lr_rate", "lr"), ("min_lr", "min_lr_ratio"), ("max_lenght", "max_length"),
                                       ("gloabl_batch_size", "global_batch_size"), ("epoch", "epochs"),
                                       ("wieght_decay", "weight_decay"), ("warmup_ratoi", "warmup_ratio"),
                                       ("grad_norm", "max_grad_norm"), ("lrr", "lr"), ("eval_evry", "eval_every")])
def test_did_you_mean_prefers_the_closest_key(word, best):
    assert close_matches(word, schema_keys(["stage", "sft"]))[0] == best


def test_stage_key_typo_suggests_the_close_key():
    with pytest.raises(ConfigError, match=r"stage\.sft\.lr_rate=1: unknown key; .*did you mean 'lr'"):
        compose("micro", ["stage.sft.lr_rate=1"])


@pytest.mark.parametrize("setting", ["stage.sft.max_length=-5", "stage.sft.max_length=0", "stage.pretrain.lr=-1",
                                     "stage.sft.warmup_ratio=2", "stage.sft.min_lr_ratio=1.5", "stage.sft.eps=0",
                                     "stage.sft.betas=[0.9]", "stage.pretrain.max_grad_norm=0",
                                     "stage.sft.weight_decay=-0.1"])
def test_stage_values_are_checked_before_anything_trains(setting):
    key = setting.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        compose("micro", [setting])
    assert str(e.value).startswith(f"{key}=") and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("text", ["{bad", "", '{"a": 1}', "[]", "5", '"x"'],
                         ids=["invalid", "empty", "no_format", "no_records", "number", "string"])
def test_a_bad_data_file_is_named_by_data_train(text, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        data_image_size(str(path))  # the first thing that reads data.train (tiny's input size)
    msg = str(e.value)
    assert msg.startswith(f"data.train={str(path)!r}: ") and "image_size" not in msg and len(msg.splitlines()) == 1
    with pytest.raises(ValueError, match=r"^train="):  # the option check (micro: no measured size) says the same
        check_files_options(str(path))


def test_bad_files_and_formats_name_the_key_set(data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    train = f"data.train={data / 'train.json'}"
    for overrides, start in ((["data.train=" + str(bad)], "data.train="),
                             ([train, f"data.eval={bad}"], "data.eval="),
                             ([train, "data.format=llava2"], "data.format='llava2': unknown reader"),
                             ([train, "data.format=qwen"], "data.format='qwen': unknown reader"),
                             ([train, "data.sft.format=llava2"], "data.sft.format='llava2': unknown reader"),
                             ([train, "data.heldout=500"], "data.heldout=500: the training file has 36")):
        with pytest.raises(ConfigError) as e:
            compose("tiny", ["data=files", *overrides])
        assert str(e.value).startswith(start) and len(str(e.value).splitlines()) == 1, (overrides, str(e.value))


@pytest.mark.parametrize("setting,key", [("stage.sft.max_length=8", "stage.sft.max_length"),
                                         ("stage.sft.global_batch_size=64", "stage.sft.global_batch_size")])
def test_a_later_stage_that_cannot_run_stops_before_the_first_trains(setting, key, data, tmp_path):
    cfg = compose("micro", ["data=files", f"data.train={data / 'train.json'}", *quick(["pretrain", "sft"]),
                            setting, f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert key in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not list(tmp_path.glob("pretrain/checkpoints/step_*")) and not (tmp_path / "pretrain" / "DONE.json").exists()


# ------------------------------------------------------------------------------- images outside the folder
def test_image_paths_outside_the_image_folder_are_refused_unless_allowed(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for p in (root / "in.png", root / "sub" / "in2.png", elsewhere / "out.png"):
        p.write_bytes(b"x")
    os.symlink(elsewhere / "out.png", root / "link.png")
    os.symlink(root / "in.png", root / "sub" / "link_in.png")
    strict = make_reader("llava", image_folder=root)
    loose = make_reader("llava", image_folder=root, allow_outside_root=True)
    for src in ("in.png", "sub/in2.png", "sub/../in.png", str(root / "in.png"), "sub/link_in.png"):
        assert os.path.isfile(strict.image(src)) and loose.image(src) == strict.image(src)
    for src in ("../elsewhere/out.png", str(elsewhere / "out.png"), "link.png", f"file://{elsewhere / 'out.png'}",
                "sub/../../elsewhere/out.png"):
        with pytest.raises(SampleError) as e:
            strict.image(src)
        assert e.value.reason == "outside_root" and "allow_outside_root" in str(e.value)
        assert os.path.isfile(loose.image(src))


def test_files_count_an_outside_image_as_a_named_skip(data, tmp_path):
    records = json.loads((data / "train.json").read_text())
    records[0]["image"] = "../" + data.name + "_outside.png"
    records[1]["image"] = str(data / records[1]["image"])  # absolute but inside: fine
    (data.parent / (data.name + "_outside.png")).write_bytes((data / records[2]["image"]).read_bytes())
    path = data / "outside.json"
    path.write_text(json.dumps(records))
    ds = _Part(str(path), None, image_folder=str(data), skip_bad=True)
    ds.scan()
    assert dict(ds.bad.counts) == {"outside_root": 1}
    ok = _Part(str(path), None, image_folder=str(data), skip_bad=True, allow_outside_root=True)
    ok.scan()
    assert ok.bad.total == 0


# ----------------------------------------------------------------------- the same report from every stage
def test_every_stage_reports_the_same_missing_image(data, tmp_path):
    """One missing image in 36 records: pretrain (2 steps of 4: 8 samples read) and sft (4 steps) report it the same
    way, whichever samples their steps reach."""
    records = json.loads((data / "train.json").read_text())
    held = set(heldout_indices(len(records), "auto", 0))
    k = next(i for i in range(len(records)) if i not in held)
    records[k]["image"] = "images/missing.png"
    path = data / "missing.json"
    path.write_text(json.dumps(records))
    cfg = compose("micro", ["data=files", f"data.train={path}", *quick(["pretrain", "sft"]),
                            f"output_dir={tmp_path}"])
    res = run(cfg)
    reports = [s.skipped_samples for s in res.stages]
    assert [(r["total"], r["by_reason"]) for r in reports] == [(1, {"missing_image": 1})] * 2, reports
