"""Readers: formats -> Sample, auto-detection, record sources (json/jsonl/parquet/save_to_disk), bad input."""
from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from data_fixtures import processor
from PIL import Image

from vlm.data.dataset import ProcessedDataset, SampleDataset, read_samples
from vlm.data.errors import DataError
from vlm.data.readers import READERS, SampleError, detect_format, load_records, make_reader
from vlm.data.readers.records import JsonlRecords
from vlm.data.sample import ImageRef, Message


def llava(id="x", image="a.png", q="<image>\nWhat colour?", a="Red."):
    rec = {"id": id, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        rec["image"] = image
    return rec


def parts(sample):
    return [(m.role, m.parts) for m in sample.messages]


# ------------------------------------------------------------------------------------------------------- formats
def test_llava_single_multi_and_text_only(root):
    r = make_reader("llava", image_folder=root)
    s = r.convert(llava(), index=0)
    assert parts(s) == [("user", [ImageRef(0), "\nWhat colour?"]), ("assistant", ["Red."])]
    assert s.images == [str(root / "a.png")] and s.id == "x" and s.meta["index"] == 0
    multi = llava(image=["a.png", "b.png"], q="<image> vs <image>: which is redder?")
    s = r.convert(multi)
    assert parts(s)[0] == ("user", [ImageRef(0), " vs ", ImageRef(1), ": which is redder?"])
    assert s.images == [str(root / "a.png"), str(root / "b.png")]
    s = r.convert(llava(image=None, q="Hello?"))
    assert s.images == [] and parts(s)[0] == ("user", ["Hello?"])


def test_llava_images_across_turns_and_system(root):
    rec = {"id": 7, "image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nQ1"},
        {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Now <image>"}, {"from": "gpt", "value": "A2"}]}
    s = make_reader("llava", image_folder=root).convert(rec)
    assert [m.role for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[3].parts == ["Now ", ImageRef(1)]


def test_qwen_vl_images_and_grounding_text(root):
    rec = {"id": "q", "conversations": [
        {"from": "user", "value": "Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nCompare."},
        {"from": "assistant", "value": "<ref>the red one</ref><box>(10,20),(300,400)</box>"},
        {"from": "user", "value": "And <img>c.jpg</img>?"}, {"from": "assistant", "value": "Blue."}]}
    assert detect_format(rec) == "qwen_vl"
    s = make_reader("qwen_vl", image_folder=root).convert(rec)
    assert s.messages[0].parts == ["Picture 1: ", ImageRef(0), "\nPicture 2: ", ImageRef(1), "\nCompare."]
    assert s.messages[1].parts == ["<ref>the red one</ref><box>(10,20),(300,400)</box>"]
    assert s.messages[2].parts == ["And ", ImageRef(2), "?"]
    assert s.images == [str(root / n) for n in ("a.png", "b.png", "c.jpg")]


def test_query_response_images_before_query_and_json_response(root):
    rec = {"image": ["a.png", "b.png"], "query": "Locate the red box.",
           "response": [{"bbox_2d": [1, 2, 30, 40], "label": "red"}]}
    assert detect_format(rec) == "query_response"
    s = make_reader("query_response", image_folder=root).convert(rec, index=3)
    assert s.messages[0].parts == [ImageRef(0), ImageRef(1), "Locate the red box."]
    assert json.loads(s.messages[1].parts[0]) == [{"bbox_2d": [1, 2, 30, 40], "label": "red"}]
    s = make_reader("query_response", image_folder=root).convert(
        {"image": "a.png", "query": "Q", "response": '{"bbox_2d": [0, 0, 5, 5]}', "system": "S",
         "history": [["H1", "R1"]]})
    assert [m.role for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[1].parts == [ImageRef(0), "H1"] and s.messages[3].parts == ["Q"]
    s = make_reader("query_response", image_folder=root).convert(
        {"images": ["a.png"], "query": "Look: <image> ok", "response": "fine"})
    assert s.messages[0].parts == ["Look: ", ImageRef(0), " ok"]


def test_messages_formats(root):
    r = make_reader("messages", image_folder=root)
    rec = {"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": [{"type": "text", "text": "Q2"}, {"type": "image", "path": "b.png"},
                                     {"type": "image_url", "image_url": {"url": str(root / "c.jpg")}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A2"}]}]}
    s = r.convert(rec)
    assert s.messages[1].parts == [ImageRef(0), "Q1"] and s.messages[3].parts == ["Q2", ImageRef(1), ImageRef(2)]
    assert s.images == [str(root / "a.png"), str(root / "b.png"), str(root / "c.jpg")]
    # {"type": "image"} parts and "<image>" in strings take entries of a top-level "images" list, in order
    rec = {"images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q", "image": None}]},
        {"role": "assistant", "content": "A"}, {"from": "human", "value": "<image> again"},
        {"from": "gpt", "value": "B"}]}
    s = r.convert(rec)
    assert s.messages[0].parts == [ImageRef(0), "Q"] and s.messages[2].parts == [ImageRef(1), " again"]
    assert s.images == [str(root / "a.png"), str(root / "b.png")]
    with pytest.raises(DataError, match="1 image placeholder.*2 image"):
        r.convert({"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": "<image> hi"},
                                                              {"role": "assistant", "content": "x"}]})


def test_pil_and_hf_image_dict_sources(root):
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    r = make_reader("messages")
    s = r.convert({"messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                             {"type": "image", "image": {"bytes": buf.getvalue(),
                                                                                         "path": None}}]},
                                {"role": "assistant", "content": "ok"}]})
    assert s.images[0] is img and s.images[1].getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------------------------- registry/detection
def test_registry_exact_lookup_and_unknown_name():
    assert set(READERS.names()) >= {"llava", "qwen_vl", "query_response", "messages"}
    with pytest.raises(KeyError, match="known readers: llava, messages, query_response, qwen_vl"):
        make_reader("llav")


@pytest.mark.parametrize("rec,fmt", [
    (llava(), "llava"), (llava(image=None, q="hi"), "llava"),
    ({"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}, "qwen_vl"),
    ({"query": "q", "response": "r"}, "query_response"), ({"messages": []}, "messages")])
def test_detect_format(rec, fmt):
    assert detect_format(rec) == fmt


def test_detect_format_none_matches_lists_formats():
    with pytest.raises(DataError, match=r"no reader formats match a record with keys \['foo'\].*known formats"):
        detect_format({"foo": 1})


def test_auto_detection_on_dataset(root):
    ds = SampleDataset([{"query": "q", "response": "r", "image": "a.png"}], image_folder=root)
    assert ds.format == "query_response" and ds[0].messages[0].parts[0] == ImageRef(0)


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("rec,reason,text", [
    (llava(image=["a.png", "b.png"]), "image_count", "1 <image> placeholder(s) in the text but 2 image"),
    (llava(q="no placeholder"), "image_count", "0 <image> placeholder"),
    ({"id": "x", "conversations": []}, "empty", "empty conversation"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}, "role_order",
     "roles out of order at turn 0"),
    ({"id": "x", "conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}]}, "role_order",
     "roles out of order at turn 1"),
    ({"id": "x", "conversations": [{"from": "alien", "value": "Q"}]}, "role", "unknown role 'alien'"),
    (llava(image="nope.png"), "missing_image", "image file not found"),
    ({"id": "x", "conversations": "oops"}, "format", "malformed"),
])
def test_bad_records_raise_named_errors(root, rec, reason, text):
    r = make_reader("llava", image_folder=root, source="train.json")
    with pytest.raises(SampleError) as ei:
        r.convert(rec, index=12)
    e = ei.value
    assert isinstance(e, ValueError) and e.reason == reason and text in str(e)
    assert str(e).startswith("train.json: sample #12 (id 'x')")
    if reason == "missing_image":
        assert e.file == str(root / "nope.png") and "nope.png" in str(e)
    assert pickle.loads(pickle.dumps(e)).reason == reason  # survives DataLoader workers


@pytest.mark.parametrize("name,reason", [("corrupt.jpg", "corrupt_image"), ("empty.png", "corrupt_image"),
                                         ("tiny.png", "tiny_image"), ("thin.png", "tiny_image")])
def test_bad_image_files_named_by_processor(root, tok, name, reason):
    samples = SampleDataset([llava(id="ok"), llava(id="bad", image=name)], image_folder=root)
    ds = ProcessedDataset(samples, processor(tok))
    assert ds[0]["input_ids"].numel() > 0
    with pytest.raises(SampleError) as ei:
        ds[1]
    assert ei.value.reason == reason and ei.value.index == 1 and ei.value.sample_id == "bad"
    assert name in str(ei.value) and "sample #1 (id 'bad')" in str(ei.value)


def test_skip_bad_counts_by_reason_and_reports(root, tok):
    recs = [llava(id="0"), llava(id="1", image="corrupt.jpg"), llava(id="2", image="missing.png"),
            llava(id="3", image="tiny.png"), llava(id="4", image=["a.png", "b.png"]), llava(id="5")]
    ds = ProcessedDataset(SampleDataset(recs, image_folder=root, skip_bad=True), processor(tok))
    item = ds[1]  # 1..4 are bad: skipped to 5
    assert item["meta"]["id"] == "5"
    assert [s["reason"] for s in item["meta"]["skipped"]] == ["corrupt_image", "missing_image", "tiny_image",
                                                              "image_count"]
    assert dict(ds.bad.counts) == {"corrupt_image": 1, "missing_image": 1, "tiny_image": 1, "image_count": 1}
    assert "skipped 4 bad sample(s)" in ds.report() and "corrupt.jpg" in ds.report()
    fresh = ProcessedDataset(SampleDataset(recs, image_folder=root, skip_bad=True), processor(tok))
    assert [it["meta"]["id"] for it in fresh] == ["0", "5"] and fresh.bad.total == 4
    strict = ProcessedDataset(SampleDataset(recs, image_folder=root), processor(tok))
    with pytest.raises(DataError):
        list(strict)


def test_urls_refused_unless_allowed(root, tok, monkeypatch):
    rec = {"image": "https://example.com/cat.png", "query": "What?", "response": "A cat."}
    with pytest.raises(SampleError, match="image URL 'https://example.com/cat.png' refused.*allow_urls=True") as ei:
        make_reader("query_response").convert(rec, index=0)
    assert ei.value.reason == "url"
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (0, 0, 255)).save(buf, format="PNG")
    calls = []

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def fake_urlopen(url, timeout=None):
        calls.append((url, timeout))
        return Resp(buf.getvalue())

    from vlm.data import images

    monkeypatch.setattr(images.urllib.request, "urlopen", fake_urlopen)
    ds = ProcessedDataset(SampleDataset([rec], allow_urls=True), processor(tok))
    item = ds[0]
    assert item["pixel_values"].shape == (1, 3, 16, 16)
    assert calls and calls[0][0] == "https://example.com/cat.png" and calls[0][1] is not None


# -------------------------------------------------------------------------------------------------- record sources
def test_json_jsonl_lazy_and_bad_line(root, tmp_path):
    recs = [llava(id=str(i)) for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n{broken\n")
    assert [s.id for s in read_samples(tmp_path / "d.json", image_folder=root)] == ["0", "1", "2"]
    lines = load_records(tmp_path / "d.jsonl")
    assert isinstance(lines, JsonlRecords) and len(lines) == 4 and lines[2]["id"] == "2"
    with pytest.raises(DataError, match=r"d.jsonl: sample #3: invalid JSON on line 5"):
        lines[3]
    ds = SampleDataset(tmp_path / "d.jsonl", image_folder=root, skip_bad=True)
    assert [s.id for s in ds] == ["0", "1", "2"] and dict(ds.bad.counts) == {"format": 1}


def test_hf_datasets_parquet_save_to_disk_and_image_column(root, tmp_path, tok):
    import datasets

    rows = [{**llava(id=str(i), q="<image>\nQ" if i % 2 else "Q"), "image": "a.png" if i % 2 else None}
            for i in range(4)]
    ds = datasets.Dataset.from_list(rows)  # text-only rows hold image=None
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "d.parquet", tmp_path / "saved"):
        out = SampleDataset(src, image_folder=root)
        assert out.format == "llava" and [len(s.images) for s in out] == [0, 1, 0, 1]
    out = SampleDataset(tmp_path / "d.parquet", image_folder=root, backend="datasets")
    assert len(out) == 4
    # an Image() column: rows decode to PIL only on access (inside DataLoader workers)
    img = Image.new("RGB", (12, 12), (0, 255, 0))
    feats = datasets.Features({"image": datasets.Image(), "query": datasets.Value("string"),
                               "response": datasets.Value("string")})
    hf = datasets.Dataset.from_dict({"image": [img, img], "query": ["Q1", "Q2"], "response": ["A1", "A2"]},
                                    features=feats)
    sd = ProcessedDataset(SampleDataset(hf), processor(tok))
    loader = torch.utils.data.DataLoader(sd, batch_size=None, num_workers=1)
    items = list(loader)
    assert [it["meta"]["id"] for it in items] == [0, 1] and items[0]["pixel_values"].shape == (1, 3, 16, 16)


def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.json")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file extension '.csv'"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="not a datasets.save_to_disk"):
        load_records(tmp_path / "dir")


def test_message_text_helper():
    assert Message("user", [ImageRef(0), "hi"]).text() == "<image>hi"


def test_adding_a_reader_as_documented(root):
    """The "Adding a reader" example of docs/data.md, executed as written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    section = doc.split("### Adding a reader", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    try:
        exec(compile(code, "docs/data.md", "exec"), {})  # noqa: S102 (our own documentation)
        assert "my_format" in READERS
        rec = {"uid": "d1", "pictures": ["a.png"],
               "dialog": [{"speaker": "human", "text": "<image>\nHi"}, {"speaker": "gpt", "text": "Hello."}]}
        ds = SampleDataset([rec], image_folder=root)  # auto-detected among the registered formats
        assert ds.format == "my_format"
        s = ds[0]
        assert s.id == "d1" and s.messages[0].parts == [ImageRef(0), "\nHi"] and s.images == [str(root / "a.png")]
        with pytest.raises(SampleError, match="sample #0 \\(id 'd1'\\).*1 <image> placeholder.*2 image") as ei:
            ds.reader.convert({**rec, "pictures": ["a.png", "b.png"]}, index=0)
        assert ei.value.reason == "image_count"
    finally:
        READERS._entries.pop("my_format", None)
