"""What a new user's own file hits next (`data=files`): the bad-sample limit named by the override that raises it, a
text-only file without data.image_size, a file of one object, unknown roles named, policy skips worded apart from bad
data, and data.heldout beside data.eval."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import open_dict

from vlm.data.dataset import BadSamples, SampleDataset, TooManyBadSamples
from vlm.data.files import check_files_options
from vlm.data.readers import SampleError, make_reader
from vlm.data.synthetic_text import make_split
from vlm.train import ConfigError, compose, run
from vlm.train.resolvers import data_image_size
from short_runs import short_run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 training images (36 records), 40..56 px."""
    d = tmp_path_factory.mktemp("files_first_hour")
    make_split(d, "train", 12, seed=0, min_size=40, max_size=56, font_sizes=(10, 12))
    return d


def quick(stages: list[str]) -> list[str]:
    return short_run(stages, steps=1, max_new_tokens=2)


def text_records(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} + 1?"},
                                              {"from": "gpt", "value": str(i + 1)}]} for i in range(start, start + n)]


# ------------------------------------------------------------------- the bad-sample limit, named by its override
def test_the_bad_sample_hint_names_an_override_that_works(data, tmp_path):
    """The stop names data.max_bad_fraction (the key data=files sets it at; it named `max_bad_fraction`, no key),
    and that override, run as the message spells it, trains."""
    records = json.loads((data / "train.json").read_text())
    for k in range(8):
        records[k] = {**records[k], "image": "gone.png"}
    bad = data / "bad.json"
    bad.write_text(json.dumps(records))
    base = ["data=files", f"data.train={bad}", *quick(["pretrain", "sft"])]
    with pytest.raises(TooManyBadSamples) as e:
        run(compose("micro", [*base, f"output_dir={tmp_path / 'stop'}"]))
    msg = str(e.value)
    assert "more than data.max_bad_fraction=0.05 allows" in msg and "missing_image" in msg
    override = re.search(r"raise the limit: (\S+)=FRACTION", msg).group(1)
    assert override == "data.max_bad_fraction"
    res = run(compose("micro", [*base, f"{override}=0.5", f"output_dir={tmp_path / 'ok'}"]))
    assert [s.skipped_samples["by_reason"] for s in res.stages] == [{"missing_image": 7}] * 2


def test_the_override_is_the_key_the_limit_is_read_from(data):
    from vlm.train.stage import max_bad_fraction_key

    cfg = compose("micro", ["data=files", f"data.train={data / 'train.json'}"])
    assert [max_bad_fraction_key(cfg, k) for k in ("pretrain", "sft", "val")] == ["data.max_bad_fraction"] * 3
    assert cfg.data.sft.max_bad_fraction == 0.05
    one = compose("micro", ["data=files", f"data.train={data / 'train.json'}", "data.sft.max_bad_fraction=0.2"])
    assert max_bad_fraction_key(one, "sft") == "data.sft.max_bad_fraction" and one.data.sft.max_bad_fraction == 0.2
    assert one.data.pretrain.max_bad_fraction == 0.05
    with open_dict(cfg):  # a data set that does not hold the key: it is added with +
        cfg.data.sft = {"name": "llava_json", "path": str(data / "train.json")}
    assert max_bad_fraction_key(cfg, "sft") == "+data.sft.max_bad_fraction"
    err = TooManyBadSamples.over_limit("f.json", 3, 10, 0.05, "skipped 3", "max_bad_fraction")
    again = err.for_key("data.sft.max_bad_fraction", "+data.sft.max_bad_fraction")
    assert "more than data.sft.max_bad_fraction=0.05" in str(again)
    assert "raise the limit: +data.sft.max_bad_fraction=FRACTION" in str(again)


# ----------------------------------------------------------------------------------- text-only, one object, roles
def test_a_text_only_file_needs_no_image_size(data, tmp_path):
    """No image to size: data.image_size is null and tiny takes its own 48 px (it stopped, blaming
    data.image_size); a file whose first 64 samples are text-only is measured on its later images."""
    path = tmp_path / "text.json"
    path.write_text(json.dumps(text_records(40)))
    assert data_image_size(str(path)) is None
    cfg = compose("tiny", ["data=files", f"data.train={path}"])
    assert cfg.data.image_size is None and cfg.encoder.image_size == 48
    res = run(compose("micro", ["data=files", f"data.train={path}", *quick(["pretrain", "sft"]),
                                f"output_dir={tmp_path / 'run'}"]))
    assert [s.steps for s in res.stages] == [1, 1] and "answer" in res.eval
    later = json.loads((data / "train.json").read_text())
    (data / "late_images.json").write_text(json.dumps(text_records(70) + later))
    assert data_image_size(str(data / "late_images.json")) == data_image_size(str(data / "train.json")) == 56


def test_unreadable_images_are_named_by_the_data_file_and_what_to_set(tmp_path):
    path = tmp_path / "gone.json"
    path.write_text(json.dumps([{**r, "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, r["conversations"][1]]} for r in text_records(3)]))
    with pytest.raises(ConfigError) as e:
        data_image_size(str(path))
    msg = str(e.value)
    assert msg.startswith(f"data.train={str(path)!r}: none of the images") and "image file not found" in msg
    assert "set data.image_size=N" in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("text", [json.dumps(text_records(1)[0]), json.dumps({"id": 1, "image": "a.png"})],
                         ids=["record", "other"])
def test_a_file_of_one_object_is_named_with_what_was_expected(text, tmp_path):
    path = tmp_path / "one.json"
    path.write_text(text)
    for key in ("data.train", "data.eval"):
        other = tmp_path / "ok.json"
        other.write_text(json.dumps(text_records(4)))
        overrides = [f"data.train={path}"] if key == "data.train" else [f"data.train={other}", f"data.eval={path}"]
        with pytest.raises(ConfigError) as e:
            compose("micro", ["data=files", *overrides])
        msg = str(e.value)
        assert msg.startswith(f"{key}={str(path)!r}: holds a single JSON object") and "[{...}]" in msg, msg
        assert len(msg.splitlines()) == 1
    path.write_text(json.dumps({"data": text_records(3)}))  # an object whose 'data' is the list still reads
    assert len(SampleDataset(str(path))) == 3


@pytest.mark.parametrize("fmt,record", [
    ("llava", {"id": "r1", "conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]}),
    ("messages", {"id": "r1", "messages": [{"role": "user", "content": "Q"}, {"role": "Narrator", "content": "A"}]}),
    ("messages", {"id": "r1", "messages": [{"role": "user", "content": "Q"}, {"content": "A"}]}),
])
def test_an_unknown_role_names_the_sample_the_role_and_the_accepted_ones(fmt, record):
    with pytest.raises(SampleError) as e:
        make_reader(fmt, source="my.json").convert(record, index=4)
    msg = str(e.value)
    assert msg.startswith("my.json: sample #4 (id 'r1'): ") and e.value.reason == "role"
    role = next((m.get("role", m.get("from")) for m in record.get("messages", record.get("conversations", []))
                 if m.get("role", m.get("from")) not in ("user", "human")), None)
    assert (f"unknown role {role!r}" if role else "no role") in msg
    assert "expected one of assistant, system, user (or an alias: bot, chatgpt, gpt, human, model)" in msg


# ------------------------------------------------------------------------------------------ policy skips
def test_policy_skips_are_not_worded_as_bad_samples():
    bad = BadSamples()
    bad.update([{"index": 1, "reason": "images_per_sample", "message": "m1"},
                {"index": 2, "reason": "images_per_sample", "message": "m2"}])
    assert "bad sample" not in bad.summary()
    assert bad.summary().startswith("left out 2 sample(s) this stage does not train on, by its own choice, not bad "
                                    "data (images_per_sample: 2)")
    bad.update([{"index": 3, "reason": "missing_image", "message": "m3"}])
    assert bad.summary().startswith("skipped 1 bad sample(s) (missing_image: 1); left out 2 sample(s)")


def test_a_stage_none_of_whose_samples_suits_it_says_so(tmp_path):
    from data_fixtures import processor

    from vlm.data.dataset import ProcessedDataset
    from vlm.data.tokenizer import byte_tokenizer

    path = tmp_path / "text.json"
    path.write_text(json.dumps(text_records(4)))
    ds = ProcessedDataset(SampleDataset(str(path), skip_bad=True), processor(byte_tokenizer(), "chatml", k=2))
    ds.images_per_sample = 1
    with pytest.raises(TooManyBadSamples) as e:
        ds[0]
    msg = str(e.value)
    assert "none of its 4 samples can train in this stage" in msg and "are bad" not in msg
    assert "bad sample" not in msg.splitlines()[0]


# --------------------------------------------------------------------------------- data.heldout beside data.eval
@pytest.mark.parametrize("setting,key", [("data.heldout=10", "data.heldout"), ("data.heldout=0", "data.heldout"),
                                         ("data.sft.heldout=3", "data.sft.heldout")])
def test_heldout_beside_an_evaluation_file_is_a_config_error(setting, key, data, tmp_path):
    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads((data / "train.json").read_text())[:4]))
    with pytest.raises(ConfigError) as e:
        compose("micro", ["data=files", f"data.train={data / 'train.json'}", f"data.eval={val}", setting])
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "data.eval=" in msg and "data.heldout would be ignored" in msg
    assert len(msg.splitlines()) == 1
    compose("micro", ["data=files", f"data.train={data / 'train.json'}", f"data.eval={val}", "data.heldout=auto"])
    with pytest.raises(ValueError, match="data.heldout would be ignored"):
        check_files_options(str(data / "train.json"), str(val), heldout=5)
