"""The bad-input list, for every reader, from a data file with real (good and broken) image files.

Each bad record must raise a ``SampleError`` naming the data file, the sample (index and id), the image file where
there is one, and the problem; with ``skip_bad=True`` it is skipped, counted by reason and reported at the end of
the run (and through ``batch["meta"]["skipped"]`` for DataLoader workers).
"""
from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch
from data_fixtures import processor
from PIL import Image

from vlm.data.collate import PadCollator
from vlm.data.dataset import BadSamples, ProcessedDataset, SampleDataset
from vlm.data.readers import SampleError

FORMATS = ("llava", "qwen_vl", "query_response", "messages")
URL = "https://example.com/x.png"

# name -> (images, user text with <image> placeholders, answer, reason, problem, image file named in the error)
CASES = {
    "missing file": (["nope.png"], "<image>\nQ", "A", "missing_image", "not found|no such file", "nope.png"),
    "corrupt file": (["corrupt.jpg"], "<image>\nQ", "A", "corrupt_image", "cannot read image", "corrupt.jpg"),
    "zero-byte file": (["empty.png"], "<image>\nQ", "A", "corrupt_image", "cannot read image", "empty.png"),
    "1-pixel image": (["tiny.png"], "<image>\nQ", "A", "tiny_image", "degenerate image of 1x1", "tiny.png"),
    "1xN image": (["thin.png"], "<image>\nQ", "A", "tiny_image", "degenerate image of 1x40", "thin.png"),
    "more images than <image>": (["a.png", "b.png"], "<image>\nQ", "A", "image_count", "placeholder", None),
    "more <image> than images": (["a.png"], "<image> and <image>", "A", "image_count", "placeholder", None),
    "JSON box outside the image": (["a.png"], "<image>\nWhere?", '{"bbox_2d": [0, 0, 50, 20]}', "box",
                                   r"outside the 40x30 image", "a.png"),
    "JSON box x2 < x1": (["a.png"], "<image>\nWhere?", '{"bbox_2d": [30, 0, 10, 20]}', "box", "x2 < x1", "a.png"),
    "JSON box negative": (["a.png"], "<image>\nWhere?", '{"bbox_2d": [-1, 0, 10, 20]}', "box", "negative", "a.png"),
    "JSON box wrong arity": (["a.png"], "<image>\nWhere?", '{"bbox_2d": [1, 2, 3]}', "box", "4 coordinates", "a.png"),
    "Qwen box malformed": (["a.png"], "<image>\nWhere?", "<ref>x</ref><box>(10,10),(5)</box>", "box",
                           "malformed box", "a.png"),
    "Qwen box outside [0,1000)": (["a.png"], "<image>\nWhere?", "<box>(10,10),(1000,20)</box>", "box",
                                  r"\[0, 1000\)", "a.png"),
    "Qwen box in the question": (["a.png"], "<image>\nWhat is in <box>(500,10),(20,20)</box>?", "x", "box",
                                 "x2 < x1", "a.png"),
    "URL while fetching is off": ([URL], "<image>\nQ", "A", "url", "allow_urls=True", URL),
}


def record(fmt: str, rid: str, images: list[str], user: str, answer: str) -> dict | None:
    """The same conversation in each format (``None`` where the format cannot express it)."""
    if fmt == "llava":
        return {"id": rid, "image": images, "conversations": [{"from": "human", "value": user},
                                                              {"from": "gpt", "value": answer}]}
    if fmt == "qwen_vl":
        if user.count("<image>") != len(images):
            return None  # images are given by their <img> tags: their count cannot disagree
        for path in images:
            user = user.replace("<image>", f"<img>{path}</img>", 1)
        return {"id": rid, "conversations": [{"from": "user", "value": user},
                                             {"from": "assistant", "value": answer}]}
    if fmt == "query_response":
        return {"id": rid, "image": images, "query": user, "response": answer}
    return {"id": rid, "images": images, "messages": [{"role": "user", "content": user},
                                                      {"role": "assistant", "content": answer}]}


def structural(fmt: str) -> dict[str, tuple[dict, str, str]]:
    """Format-specific bad conversations: name -> (record, reason, problem)."""
    if fmt == "query_response":  # one query and one response: no empty or misordered conversation to write
        return {"missing response": ({"id": "bad", "image": ["a.png"], "query": "<image>Q", "response": None},
                                     "format", "missing 'response'")}
    key, role, text = {"llava": ("conversations", "from", "value"), "qwen_vl": ("conversations", "from", "value"),
                       "messages": ("messages", "role", "content")}[fmt]
    user, assistant = ("human", "gpt") if fmt == "llava" else ("user", "assistant")
    turns = [{role: assistant, text: "A"}, {role: user, text: "Q"}]
    return {"empty conversation": ({"id": "bad", key: []}, "empty", "empty conversation"),
            "roles out of order": ({"id": "bad", key: turns}, "role_order", "roles out of order at turn 0"),
            "unknown role": ({"id": "bad", key: [{role: "narrator", text: "Q"}]}, "role", "unknown role")}


def all_cases(fmt: str) -> list[tuple[str, dict, str, str, str | None]]:
    out = []
    for name, (images, user, answer, reason, problem, file) in CASES.items():
        rec = record(fmt, "bad", images, user, answer)
        if rec is not None:
            out.append((name, rec, reason, problem, file))
    out += [(name, rec, reason, problem, None) for name, (rec, reason, problem) in structural(fmt).items()]
    return out


def good(fmt: str, rid: str) -> dict:
    return record(fmt, rid, ["a.png"], "<image>\nWhat colour?", "Red.")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_bad_input_names_file_sample_image_and_problem(fmt, root, tok, tmp_path):
    cases = all_cases(fmt)
    assert len(cases) >= 15
    for name, rec, reason, problem, file in cases:
        path = tmp_path / f"{fmt}.json"
        path.write_text(json.dumps([good(fmt, "ok"), rec]))
        ds = ProcessedDataset(SampleDataset(path, fmt, image_folder=root), processor(tok))
        assert ds[0]["meta"]["id"] == "ok"
        with pytest.raises(SampleError, match=problem) as ei:
            ds[1]
        e = ei.value
        assert e.reason == reason, (name, str(e))
        assert str(e).startswith(f"{path}: sample #1 (id 'bad')"), (name, str(e))
        assert e.index == 1 and e.sample_id == "bad" and e.source == str(path)
        if file is not None:
            assert e.file is not None and e.file.endswith(file) and f"image '{e.file}'" in str(e), (name, str(e))


def test_zero_size_in_memory_image_is_named(tok):
    rec = {"id": "z", "messages": [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (0, 5))},
                                                                {"type": "text", "text": "Q"}]},
                                   {"role": "assistant", "content": "A"}]}
    with pytest.raises(SampleError, match=r"sample #0 \(id 'z'\).*degenerate image of 0x5") as ei:
        ProcessedDataset(SampleDataset([rec]), processor(tok))[0]
    assert ei.value.reason == "tiny_image"


@pytest.mark.parametrize("fmt", FORMATS)
def test_skip_mode_counts_every_bad_input_and_reports_at_the_end(fmt, root, tok, tmp_path, caplog):
    cases = all_cases(fmt)
    records = [good(fmt, "g0")] + [{**rec, "id": f"b{i}"} for i, (_, rec, *_) in enumerate(cases)] \
        + [good(fmt, "g1")]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = ProcessedDataset(SampleDataset(path, fmt, image_folder=root, skip_bad=True), processor(tok))
    with caplog.at_level(logging.WARNING, logger="vlm.data.dataset"):
        items = list(ds)
    assert [it["meta"]["id"] for it in items] == ["g0", "g1"]
    want = Counter(reason for _, _, reason, _, _ in cases)
    assert ds.bad.counts == want and ds.bad.total == len(cases)
    report = ds.report()
    assert report.startswith(f"skipped {len(cases)} bad sample(s)")
    assert all(f"{r}: {n}" in report for r, n in want.items())
    assert f"{path}: sample #1 (id 'b0')" in report  # examples name the sample
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{path}: skipped {len(cases)} bad sample(s)") for m in logged), logged
    # map-style access (DataLoader): skips travel in batch["meta"]["skipped"] and aggregate in the main process
    fresh = ProcessedDataset(SampleDataset(path, fmt, image_folder=root, skip_bad=True), processor(tok))
    loader = torch.utils.data.DataLoader(fresh, batch_size=2, collate_fn=PadCollator(tok.pad_token_id),
                                         sampler=[0, 1])  # index 1 is bad: skipped forward to the next good one
    total = BadSamples()
    for batch in loader:
        total.update(batch["meta"]["skipped"])
    assert batch["meta"]["ids"] == ["g0", "g1"] and total.counts == want


@pytest.mark.parametrize("raised,cls,reason", [
    (FileNotFoundError(2, "No such file or directory"), "MissingImage", "missing_image"),
    (IsADirectoryError(21, "Is a directory"), "MissingImage", "missing_image"),
    (PermissionError(13, "Permission denied"), "UnreadableImage", "unreadable_image"),
    (OSError("image file is truncated"), "CorruptImage", "corrupt_image"),
])
def test_image_errors_carry_their_reason_by_type(tmp_path, monkeypatch, raised, cls, reason):
    """What opening an image raises is classified by its type (not its message), the reason survives pickling (the
    trip from a DataLoader worker) and ``locate`` (the trip into a ``SampleError``)."""
    import pickle

    from PIL import UnidentifiedImageError

    from vlm.data import errors, images
    from vlm.data.readers import reason_of
    from vlm.data.readers.base import locate

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(images.Image, "open", fail)
    with pytest.raises(errors.DataError) as ei:
        images.load_image(tmp_path / "ok.png", sample_id="s1")
    err = ei.value
    assert type(err) is getattr(errors, cls) and err.reason == reason == reason_of(err)
    assert "cannot read image" in str(err) and "ok.png" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and back.reason == reason and str(back) == str(err)
    located = locate(err, index=3, source="data.json")
    assert isinstance(located, SampleError) and located.reason == reason and "sample #3" in str(located)
    assert errors.open_error(UnidentifiedImageError("x")) is errors.CorruptImage


def test_image_errors_raised_where_detected(tmp_path):
    from vlm.data import errors, images

    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    (tmp_path / "dir.png").mkdir()
    cases = [(tmp_path / "nope.png", errors.MissingImage), (tmp_path / "dir.png", errors.MissingImage),
             (tmp_path / "tiny.png", errors.TinyImage), (URL, errors.URLRefused),
             ("data:image/png,abc", errors.CorruptImage)]
    for source, cls in cases:
        with pytest.raises(cls):
            images.load_image(source)
    assert errors.DataError("x").reason == "invalid" and errors.DataError("x", reason="box").reason == "box"


def test_processed_dataset_over_any_samples_and_its_policy(root, tok, tmp_path):
    """One wrapper processes a plain dataset of Samples (shapes) exactly like calling the processor, and over a
    SampleDataset shares its skip policy, counts and config key (also in a copy, as DataLoader workers get it)."""
    import copy

    from vlm.data.datasets import build_dataset
    from vlm.data.shapes import build_shapes

    proc = processor(tok)
    shapes = build_shapes(split="train", size=4, tasks={"vqa": 1.0}, image_size=32, seed=0)
    ds = build_dataset({"name": "shapes", "split": "train", "size": 4, "tasks": {"vqa": 1.0}, "image_size": 32,
                        "seed": 0}, processor=proc)
    assert isinstance(ds, ProcessedDataset) and len(ds) == 4 and not hasattr(ds, "config_key")
    for i in range(4):
        want, got = proc(shapes[i]), ds[i]
        assert torch.equal(want["input_ids"], got["input_ids"]) and torch.equal(want["labels"], got["labels"])
        assert torch.equal(want["pixel_values"], got["pixel_values"])
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good("llava", "g0"), {**all_cases("llava")[0][1], "id": "b"}, good("llava", "g1")]))
    samples = SampleDataset(path, "llava", image_folder=root, skip_bad=True, max_bad_fraction=0.5)
    wrapped = ProcessedDataset(samples, proc)
    wrapped.config_key = "data.sft"
    assert samples.config_key == wrapped.config_key == "data.sft" and wrapped.max_bad_fraction == 0.5
    back = copy.deepcopy(wrapped)  # the reconstruction path of pickling (this fixture's processor holds a lambda)
    assert back[1]["meta"]["id"] == "g1" and back.bad.total == 1 and back.config_key == "data.sft"
    assert wrapped[1]["meta"]["skipped"][0]["id"] == "b" and wrapped.bad is samples.bad and samples.bad.total == 1
