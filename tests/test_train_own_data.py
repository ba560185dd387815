"""Your own data in one override (`data=files data.train=PATH`), data-dependent recipe settings, user recipe
folders that add to the shipped ones, and the synthetic text-image dataset."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.synthetic_text import make_split
from vlm.train import ConfigError, compose, list_options, run
from vlm.data.datasets import build_dataset
from vlm.eval.score import score_samples
from vlm.data.files import heldout_indices
from vlm.train.config import stage_config
from short_runs import short_run

ROOT = Path(__file__).resolve().parents[1]


def small_steps(cfg_stages: list[str]) -> list[str]:
    return short_run(cfg_stages, eval_limit=4, max_new_tokens=6, eval_batch_size=4)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """A small LLaVA-JSON dataset: 12 training images (36 records), 4 evaluation images, 40..56 px."""
    d = tmp_path_factory.mktemp("text_data")
    make_split(d, "train", 12, seed=0, min_size=40, max_size=56, font_sizes=(10, 12))
    make_split(d, "val", 4, seed=0, min_size=40, max_size=56, font_sizes=(10, 12))
    return d


def files_overrides(d: Path, *extra: str) -> list[str]:
    held = [] if any(e.startswith("data.eval=") for e in extra) else ["data.heldout=6"]  # with data.eval: an error
    return ["data=files", f"data.train={d / 'train.json'}", *held, *extra]


@pytest.mark.parametrize("recipe", ["tiny", "micro"])
@pytest.mark.parametrize("with_eval", [True, False], ids=["eval_file", "heldout"])
def test_data_files_trains_every_stage_of_a_shipped_recipe(recipe, with_eval, text_data, tmp_path):
    extra = [f"data.eval={text_data / 'val.json'}"] if with_eval else ["data.heldout=6"]
    base = compose(recipe, files_overrides(text_data, *extra))
    cfg = compose(recipe, files_overrides(text_data, *extra, *small_steps(list(base.stages)),
                                          f"output_dir={tmp_path}"))
    res = run(cfg)
    assert [s.name for s in res.stages] == list(base.stages)
    assert all(math.isfinite(s.final_loss) for s in res.stages)
    assert {"read", "compare", "grounding", "all"} <= set(res.eval)
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    ids = {p["id"] for p in preds}
    assert all(i.startswith("val_") for i in ids) if with_eval else all(i.startswith("train_") for i in ids)


@pytest.mark.parametrize("recipe", list_options("recipe"))
def test_every_shipped_recipe_takes_data_files(recipe, text_data):
    """``data=files`` with any shipped recipe: every stage reads the user's file (no shapes option merged into it)."""
    cfg = compose(recipe, files_overrides(text_data))
    for name in cfg.stages:
        if cfg.stage[name].objective.name == "dpo":
            # preference pairs are not SFT records: the user's pairs go in data.pairs.train (stage.dpo.data=pairs,
            # docs/training.md "Preference tuning"; tests/test_dpo_stage.py trains on such a file)
            assert cfg.data.pairs.name == "preference", recipe
            continue
        data = cfg.data[cfg.stage[name].data]
        assert data.name == "files" and data.train == str(text_data / "train.json"), (recipe, name)


def test_heldout_slice_is_fixed_disjoint_and_left_out_of_training(text_data):
    cfg = compose("tiny", files_overrides(text_data, "data.heldout=7", "data.seed=3"))
    train, sft, val = (build_dataset(cfg.data[k]) for k in ("pretrain", "sft", "val"))
    n = len(json.loads((text_data / "train.json").read_text()))
    assert len(val) == 7 and len(train) == len(sft) == n - 7
    assert set(val.indices).isdisjoint(train.indices) and sorted(val.indices + train.indices) == list(range(n))
    assert val.indices == build_dataset(cfg.data.val).indices == heldout_indices(n, 7, 3)
    assert heldout_indices(n, 7, 4) != heldout_indices(n, 7, 3)
    # the samples are the file's own records (ids), not renumbered
    records = json.loads((text_data / "train.json").read_text())
    assert [val.sample(k).id for k in range(len(val))] == [records[i]["id"] for i in val.indices]
    with_eval = compose("tiny", files_overrides(text_data, f"data.eval={text_data / 'val.json'}"))
    assert len(build_dataset(with_eval.data.sft)) == n
    assert len(build_dataset(with_eval.data.val)) == len(json.loads((text_data / "val.json").read_text()))


def test_images_resolve_against_the_files_folder_or_image_root(text_data, tmp_path):
    records = json.loads((text_data / "train.json").read_text())
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "train.json").write_text(json.dumps(records))  # its paths (images/...) are relative to text_data
    cfg = compose("micro", ["data=files", f"data.train={moved / 'train.json'}", f"data.image_root={text_data}",
                            "data.heldout=6"])
    sample = build_dataset(cfg.data.sft).sample(0)
    assert Path(sample.images[0]) == text_data / records[0]["image"]
    with pytest.raises(ConfigError, match=r"^data\.train=.*: none of the images .*image file not found.*; and 35 "
                                          r"more\); .*or set data\.image_size=N"):
        compose("tiny", ["data=files", f"data.train={moved / 'train.json'}", "data.heldout=6"])


def test_image_size_is_measured_past_a_missing_image(text_data, tmp_path):
    """One unreadable image does not stop the measurement (the data set's bad-sample policy handles that sample)."""
    records = json.loads((text_data / "train.json").read_text())
    records[0] = {**records[0], "image": "images/no_such_file.png"}
    bad = text_data / "one_missing.json"
    bad.write_text(json.dumps(records))
    want = compose("tiny", files_overrides(text_data)).encoder.image_size
    assert compose("tiny", ["data=files", f"data.train={bad}", "data.heldout=6"]).encoder.image_size == want


def test_any_reader_format_is_detected(text_data, tmp_path):
    """A messages-format jsonl (OpenAI style) trains like the LLaVA json."""
    records = json.loads((text_data / "train.json").read_text())
    lines = [{"id": r["id"], "task": r["task"], "images": [str(text_data / r["image"])],
              "messages": [{"role": "user", "content": "<image>" + r["conversations"][0]["value"][len("<image>\n"):]},
                           {"role": "assistant", "content": r["conversations"][1]["value"]}]} for r in records]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    # absolute image paths outside the file's folder: refused unless allowed (data.md: image paths outside ...)
    cfg = compose("micro", ["data=files", f"data.train={path}", "data.heldout=4", "data.allow_outside_root=true"])
    ds = build_dataset(cfg.data.val)
    assert ds.format == "messages" and len(ds) == 4 and ds.sample(0).meta["task"] in ("read", "compare", "grounding")


def test_shapes_options_live_in_the_data_option_and_data_files_replaces_them(text_data):
    tiny = compose("tiny")
    assert tiny.data.sft.size == 100000 and tiny.data.pretrain.size == 20000
    assert dict(tiny.data.sft.tasks) == {"vqa": 4.0, "grounding": 3.0, "caption": 0.5, "vqa_color": 3.0,
                                         "vqa_shape": 3.0, "vqa_count": 1.0, "vqa_position": 0.5}
    assert tiny.encoder.image_size == 48 and tiny.connector.pos_embed == 9 and tiny.data.sft.image_size == 48
    micro = compose("micro")
    assert (micro.data.sft.size, micro.data.eval.size, micro.data.sft.image_size) == (64, 8, 32)
    own = compose("tiny", files_overrides(text_data))
    for key in ("pretrain", "sft", "val"):
        assert own.data[key].name == "files"
        assert not {"size", "tasks", "split", "image_size"} & set(own.data[key])
    assert own.eval.data == "val"
    sides = [max(Image.open(text_data / r["image"]).size)
             for r in json.loads((text_data / "train.json").read_text())]
    assert own.data.image_size == max(sides)  # tiny's input follows the data, rounded up to its stride
    assert own.encoder.image_size == math.ceil(max(sides) / 16) * 16
    assert own.connector.pos_embed == math.ceil(max(sides) / 16) ** 2
    assert compose("micro", files_overrides(text_data)).encoder.image_size == 32  # micro fixes its own size
    # what else tiny takes from the data: its stem's stage, digit tokens, the SFT loss weighting
    assert (tiny.stages[0], tiny.tokenizer.number_tokens, tiny.stage.sft.loss_weighting) == ("align", 1000, "token")
    assert (own.stages[0], own.tokenizer.number_tokens, own.stage.sft.loss_weighting) == ("readout", 0, "square")
    # ... and the typed stage config the run uses resolves that interpolation against the whole config (merged
    # alone into its schema, `${oc.select:data.loss_weighting,token}` silently took its default)
    assert stage_config(own, "sft").loss_weighting == "square" and stage_config(tiny, "sft").loss_weighting == "token"


def test_tokenizer_corpus_is_the_users_text(text_data):
    from vlm.train.build import build_tokenizer

    cfg = compose("tiny", files_overrides(text_data))
    tok = build_tokenizer(cfg, [cfg.stage[s].template for s in cfg.stages])
    vocab = tok.get_vocab()
    # the file's frequent words are single tokens (they are not in the shapes data)
    assert any(w in vocab for w in ("Ġwritten", "written", "Ġlarger", "larger")), sorted(vocab)[:50]


@pytest.mark.parametrize("extra,fragments", [
    ([], ["data.train=???", "not set"]),
    (["data.train=nope.json"], ["data.train='nope.json'", "does not exist"]),
    (["data.train=TRAIN", "data.heldout=1000"], ["data.heldout=1000", "has 36 samples", "data.eval=PATH"]),
    (["data.train=TRAIN", "data.eval=nope.json"], ["data.eval='nope.json'", "does not exist"]),
    (["data.train=TRAIN", "data.image_root=nope"], ["data.image_root='nope'", "not a folder"]),
    (["data.train=TRAIN", "data.format=llva"], ["format='llva': unknown reader", "did you mean 'llava'?"]),
])
def test_data_files_mistakes_are_one_line(extra, fragments, text_data):
    extra = [e.replace("TRAIN", str(text_data / "train.json")) for e in extra]
    with pytest.raises(ConfigError) as e:
        compose("tiny", ["data=files", *extra])
    assert len(str(e.value).splitlines()) == 1
    for f in fragments:
        assert f in str(e.value)


def test_scores_per_task_with_grounding_iou():
    from vlm.data.sample import Message, Sample

    def s(answer, task=None):
        meta = {"task": task} if task else {}
        return Sample([Message("user", ["q"]), Message("assistant", [answer])], meta=meta)

    box = "<ref>42</ref><box>(100,100),(300,300)</box>"
    samples = [s("42", "read"), s("red", "compare"), s("Blue.", "compare"), s(box, "grounding"), s(box), s("x")]
    preds = ["42", "blue", "blue", "<ref>42</ref><box>(100,100),(300,320)</box>", "(no box)", "x"]
    m, _ = score_samples(preds, samples)
    assert m["read"] == 1.0 and m["compare"] == 0.5 and m["compare/n"] == 2
    assert m["grounding"] == 0.5 and m["grounding/n"] == 2 and m["grounding/iou"] == pytest.approx(40000 / 44000 / 2)
    assert m["answer"] == 1.0 and m["all"] == pytest.approx(4 / 6)


def test_synthetic_text_is_deterministic(tmp_path):
    a, b = make_split(tmp_path / "a", "train", 5, seed=1), make_split(tmp_path / "b", "train", 5, seed=1)
    assert a.read_text() == b.read_text()
    for r in json.loads(a.read_text()):
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
        w, h = Image.open(tmp_path / "a" / r["image"]).size
        assert 64 <= w <= 96 and 64 <= h <= 96
    assert make_split(tmp_path / "c", "train", 5, seed=2).read_text() != a.read_text()


# ------------------------------------------------------------------------------------------ user recipe folders
USER_RECIPE = "# @package _global_\ndefaults:\n  - tiny\nname: mine\nstage:\n  sft: {max_steps: 7}\n"


def test_user_recipes_folder_adds_to_the_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(USER_RECIPE)
    monkeypatch.setenv("VLM_RECIPES", str(tmp_path))
    cfg = compose("mine")
    assert cfg.name == "mine" and cfg.stage.sft.max_steps == 7 and cfg.stage.pretrain.max_steps == 500
    assert cfg.encoder.model_name == "resnet10t"  # the rest is tiny's
    assert {"mine", "tiny", "micro"} <= set(list_options("recipe"))
    assert compose("micro").name == "micro"  # shipped recipes are still there
    (tmp_path / "recipe" / "micro.yaml").write_text("# @package _global_\nname: shadow\n")
    with pytest.raises(ConfigError, match=r"recipe/micro.yaml is a shipped option.*my_micro.yaml"):
        compose("mine")


def test_user_recipes_on_the_command_line(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(USER_RECIPE)
    cmd = [sys.executable, "-m", "vlm.train"]
    env_run = subprocess.run([*cmd, "--cfg", "job", "recipe=mine"], capture_output=True, text=True, cwd=ROOT,
                             env={**_env(), "VLM_RECIPES": str(tmp_path)}, timeout=300)
    assert env_run.returncode == 0 and "name: mine" in env_run.stdout, env_run.stderr
    flag_run = subprocess.run([*cmd, "recipe=mine", "--config-dir", str(tmp_path), "--cfg", "job"],
                              capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert flag_run.returncode == 0 and "max_steps: 7" in flag_run.stdout, flag_run.stderr
    missing = subprocess.run([*cmd, "recipe=mine", "--cfg", "job"], capture_output=True, text=True, cwd=ROOT,
                             env=_env(), timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("error: recipe=mine")


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "VLM_RECIPES"}


def test_max_length_is_checked_against_the_data_naming_the_longest_sample(text_data, tmp_path):
    records = json.loads((text_data / "train.json").read_text())
    records[5]["conversations"][1]["value"] = "a much longer answer than any other " * 4
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    base = ["data=files", f"data.train={path}", f"data.image_root={text_data}", "data.heldout=6"]
    cfg = compose("micro", base + small_steps(["pretrain", "sft"]) + ["stage.pretrain.max_length=60",
                                                                      f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"id {records[5]['id']!r}" in msg and "max_length=60" in msg
    longest = int(msg.split(" tokens long")[0].rsplit(" ", 1)[1])
    assert longest > 60 and f"expected max_length >= {longest}" in msg
    assert f"set stage.pretrain.max_length={longest}" in msg  # the stage's own key
    # the longest is the one named: it fits exactly at that length, and nothing else is longer
    from vlm.data.files import check_samples_fit

    ok = compose("micro", base + [f"stage.pretrain.max_length={longest}"])
    from vlm.data.processor import Processor
    from vlm.train.build import build_model, build_tokenizer

    tok = build_tokenizer(ok, ["plain"])
    proc = Processor.for_model(build_model(ok, tok), tok, template="plain", max_length=longest)
    assert check_samples_fit(build_dataset(ok.data.sft), proc) == longest
    off = compose("micro", base + small_steps(["pretrain", "sft"]) + [
        "stage.pretrain.max_length=60", "data.check_length=false", f"output_dir={tmp_path / 'off'}"])
    assert run(off).stages  # cut or dropped per the processor's policy instead


def test_text_only_samples_are_counted_skips_of_stages_whose_objective_needs_an_image(text_data, tmp_path, capsys):
    """A mixture of image and text-only samples (every SFT mixture): ``tiny``'s readout stage (one image per
    sample, ``Objective.images_per_sample``) skips the text-only ones as named skips; the lm stages train on all."""
    records = json.loads((text_data / "train.json").read_text())
    text_only = [{"id": f"txt{i}", "conversations": [{"from": "human", "value": f"What is {i} + 1?"},
                                                     {"from": "gpt", "value": str(i + 1)}]} for i in range(12)]
    (text_data / "mixed.json").write_text(json.dumps(records + text_only))  # beside the images it names
    extra = [f"data.train={text_data / 'mixed.json'}", f"data.eval={text_data / 'val.json'}"]
    base = compose("tiny", files_overrides(text_data, *extra))
    cfg = compose("tiny", files_overrides(text_data, *extra, *small_steps(list(base.stages)), "stage.readout.max_steps=6",
                                          f"output_dir={tmp_path / 'run'}"))
    res = run(cfg)
    by_stage = {s.name: s for s in res.stages}
    assert all(math.isfinite(s.final_loss) for s in res.stages)
    readout = by_stage["readout"].skipped_samples.get("by_reason", {})
    assert readout.get("images_per_sample", 0) >= 1, by_stage["readout"].skipped_samples
    for name in ("pretrain", "sft"):
        assert "images_per_sample" not in by_stage[name].skipped_samples.get("by_reason", {})
    # worded as the stage's choice, not as bad data
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[readout] data.")]
    summary = next(line for line in said if "images_per_sample" in line)
    assert "this stage does not train on, by its own choice, not bad data" in summary and "bad sample" not in summary


def test_an_unreadable_evaluation_sample_is_dropped_not_replaced_by_its_neighbour(text_data, tmp_path):
    """A held-out sample whose image is missing is reported as dropped (eval_dropped, its record named); the others
    are each scored once (indexing a skipping dataset used to score the next sample in its place)."""
    val = json.loads((text_data / "val.json").read_text())[:6]
    val[1] = {**val[1], "image": "gone.png"}
    (text_data / "val_bad.json").write_text(json.dumps(val))
    cfg = compose("micro", files_overrides(text_data, f"data.eval={text_data / 'val_bad.json'}",
                                           # 1 of 6 is over data.max_bad_fraction: a dropped evaluation
                                           # sample is counted, it stops nothing
                                           *small_steps(["pretrain", "sft"]), "eval.limit=6",
                                           f"output_dir={tmp_path}"))
    res = run(cfg)
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    ids = [p["id"] for p in preds]
    assert len(ids) == len(set(ids)) == 6  # each sample once
    dropped = [p for p in preds if p.get("dropped")]
    assert len(dropped) == 1 and "missing_image" in dropped[0]["dropped"]
    assert res.eval.get("eval_dropped") == 1
