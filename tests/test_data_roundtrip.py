"""Round trip per reader through every record source, on fixture files with real image files written by the tests.

For each format (llava, qwen_vl, query_response, messages) the same records are written as a ``.json`` array, a
``.jsonl`` file, read through HF ``datasets`` (json, jsonl, parquet) and a ``save_to_disk`` directory (a ``Dataset``
and a ``DatasetDict`` split). Each source must give back the same canonical samples (auto-detected format, parts,
resolved image paths) and the same processed items (image colours in token order, image tokens, trained text), with
no image opened before an item is asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import K, mean_color, processor, trained_text

from vlm.data.dataset import ProcessedDataset, SampleDataset
from vlm.data.images import load_image
from vlm.data.sample import ImageRef

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
COLOR = {"a.png": RED, "b.png": GREEN, "c.jpg": BLUE}
I0, I1, I2 = ImageRef(0), ImageRef(1), ImageRef(2)

# format -> (records, expected per record: (roles/parts, image names in order, trained text))
CASES = {
    "llava": (
        [{"id": "l0", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "Green."}]},
         {"id": "l1", "image": ["c.jpg"], "conversations": [
             {"from": "human", "value": "Describe <image> please."}, {"from": "gpt", "value": "Blue."}]}],
        [([("user", [I0, "\nWhat colour?"]), ("assistant", ["Red."]), ("user", ["And ", I1, "?"]),
           ("assistant", ["Green."])], ["a.png", "b.png"], "Red.<|im_end|>Green.<|im_end|>"),
         ([("user", ["Describe ", I0, " please."]), ("assistant", ["Blue."])], ["c.jpg"], "Blue.<|im_end|>")]),
    "qwen_vl": (
        [{"id": "q0", "conversations": [
            {"from": "user", "value": "Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nWhich is red?"},
            {"from": "assistant", "value": "<ref>the red one</ref><box>(0,0),(999,999)</box>"},
            {"from": "user", "value": "And <img>c.jpg</img>?"}, {"from": "assistant", "value": "Blue."}]},
         {"id": "q1", "conversations": [
             {"from": "user", "value": "<img>b.png</img>Colour?"}, {"from": "assistant", "value": "Green."}]}],
        [([("user", ["Picture 1: ", I0, "\nPicture 2: ", I1, "\nWhich is red?"]),
           ("assistant", ["<ref>the red one</ref><box>(0,0),(999,999)</box>"]), ("user", ["And ", I2, "?"]),
           ("assistant", ["Blue."])], ["a.png", "b.png", "c.jpg"],
          "<ref>the red one</ref><box>(0,0),(999,999)</box><|im_end|>Blue.<|im_end|>"),
         ([("user", [I0, "Colour?"]), ("assistant", ["Green."])], ["b.png"], "Green.<|im_end|>")]),
    # a.png is 40x30: the absolute box follows the resize to 16x16 (x * 0.4, y * 16/30, rounded)
    "query_response": (
        [{"id": "r0", "image": ["a.png"], "query": "Locate the red box.",
          "response": '{"bbox_2d": [4, 3, 40, 30], "label": "red"}'},
         {"id": "r1", "image": ["c.jpg"], "query": "Colour?", "response": "Blue."}],
        [([("user", [I0, "Locate the red box."]), ("assistant", ['{"bbox_2d": [4, 3, 40, 30], "label": "red"}'])],
          ["a.png"], '{"bbox_2d": [2, 2, 16, 16], "label": "red"}<|im_end|>'),
         ([("user", [I0, "Colour?"]), ("assistant", ["Blue."])], ["c.jpg"], "Blue.<|im_end|>")]),
    "messages": (
        [{"id": "m0", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Q1"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            {"role": "user", "content": [{"type": "text", "text": "Q2 "}, {"type": "image", "image": "c.jpg"},
                                         {"type": "image", "image": "b.png"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue, green."}]}]},
         {"id": "m1", "messages": [
             {"role": "user", "content": [{"type": "image", "image": "b.png"}, {"type": "text", "text": "Q"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]}],
        [([("system", ["Be brief."]), ("user", [I0, "Q1"]), ("assistant", ["Red."]), ("user", ["Q2 ", I1, I2]),
           ("assistant", ["Blue, green."])], ["a.png", "c.jpg", "b.png"], "Red.<|im_end|>Blue, green.<|im_end|>"),
         ([("user", [I0, "Q"]), ("assistant", ["Green."])], ["b.png"], "Green.<|im_end|>")]),
}
SOURCES = ["json", "jsonl", "datasets_json", "datasets_jsonl", "parquet", "save_to_disk", "save_to_disk_dict"]


def write_source(kind: str, records: list[dict], d: Path) -> tuple[Path, dict]:
    """Write ``records`` as source ``kind`` under ``d``; return the path and the ``SampleDataset`` options."""
    if kind in ("json", "datasets_json"):
        path = d / "data.json"
        path.write_text(json.dumps(records))
        return path, {"backend": "datasets"} if kind == "datasets_json" else {}
    if kind in ("jsonl", "datasets_jsonl"):
        path = d / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path, {"backend": "datasets"} if kind == "datasets_jsonl" else {}
    import datasets

    ds = datasets.Dataset.from_list(records)
    if kind == "parquet":
        path = d / "data.parquet"
        ds.to_parquet(str(path))
        return path, {}
    path = d / "saved"
    if kind == "save_to_disk_dict":
        datasets.DatasetDict({"train": ds.select([0]), "validation": ds}).save_to_disk(str(path))
        return path, {"split": "validation"}
    ds.save_to_disk(str(path))
    return path, {}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("fmt", list(CASES))
def test_reader_roundtrip_through_every_source(fmt, source, root, tok, tmp_path):
    records, expected = CASES[fmt]
    path, options = write_source(source, records, tmp_path)
    opened: list[str] = []

    def counting_loader(src, **kw):
        opened.append(Path(src).name)
        return load_image(src, **kw)

    proc = processor(tok, image_loader=counting_loader)
    ds = ProcessedDataset(SampleDataset(path, image_folder=root, **options), proc)
    assert ds.format == fmt and len(ds) == len(records)
    if source.startswith(("datasets", "parquet", "save_to_disk")):
        import datasets

        assert isinstance(ds.records, datasets.Dataset)  # memory-mapped Arrow: rows materialize on access
    assert opened == []  # nothing decoded until an item is asked for (i.e. in the DataLoader workers)
    for i, (msgs, names, trained) in enumerate(expected):
        sample = ds.sample(i)
        assert sample.id == records[i]["id"] and sample.meta["index"] == i
        assert [(m.role, m.parts) for m in sample.messages] == msgs
        assert sample.images == [str(root / n) for n in names]
        opened.clear()
        item = ds[i]
        assert opened == names  # exactly this sample's images, in token order
        got = [mean_color(p) for p in item["pixel_values"]]
        assert len(got) == len(names)
        for c, n in zip(got, names):  # c.jpg is lossy: allow a few levels
            assert max(abs(x - y) for x, y in zip(c, COLOR[n])) <= 3, (c, n)
        assert int((item["input_ids"] == proc.image_token_id).sum()) == K * len(names)
        assert trained_text(tok, item) == trained
        assert item["meta"]["id"] == records[i]["id"]
    assert ds.bad.total == 0


def test_hf_rows_with_missing_keys_are_read_like_the_json(root, tmp_path):
    """Arrow unifies the schema of rows that differ (absent keys become ``None``): the readers ignore them."""
    import datasets

    rows = [{"id": "a", "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]},
            {"id": "b", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "Yo."}]}]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    native = SampleDataset(tmp_path / "d.json", image_folder=root)
    hf = SampleDataset(datasets.Dataset.from_list(rows), image_folder=root)
    for i in range(2):
        a, b = native.sample(i), hf.sample(i)
        assert [(m.role, m.parts) for m in a.messages] == [(m.role, m.parts) for m in b.messages]
        assert a.images == b.images
    assert hf.records[0]["messages"][0]["content"][0]["text"] is None  # the filled-in key
