"""Collation: padding (right/left), greedy packing, packed dataset, padding report, packed == unpacked logits."""
from __future__ import annotations

import re

import pytest
import torch
from data_fixtures import processor
from PIL import Image

from vlm.data.collate import PackCollator, PackedDataset, PadCollator, concat_items, greedy_pack
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.train.loop import samples_in

PAD = 256
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def item(n: int, sid: str, n_images: int = 0, color: int = 0) -> dict:
    ids = torch.arange(1, n + 1)
    labels = torch.where(ids > n // 2, ids, -100)
    pv = torch.full((n_images, 3, 4, 4), float(color)) if n_images else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pv, "meta": {"id": sid}}


def test_pad_right():
    b = PadCollator(PAD)([item(3, "a", 1, 1), item(5, "b"), item(2, "c", 2, 3)])
    assert b["input_ids"].tolist() == [[1, 2, 3, PAD, PAD], [1, 2, 3, 4, 5], [1, 2, PAD, PAD, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 3, 4, 5], [-100, 2, -100, -100, -100]]
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 3.0]
    assert b["meta"]["ids"] == ["a", "b", "c"]
    assert b["meta"]["padding"] == {"tokens": 10, "padded": 15, "waste": pytest.approx(1 / 3)}
    assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values", "meta"}


def test_pad_left_multiple_and_positions():
    b = PadCollator(PAD, "left", pad_to_multiple_of=4, return_position_ids=True)([item(3, "a"), item(5, "b")])
    assert b["input_ids"].tolist() == [[PAD] * 5 + [1, 2, 3], [PAD] * 3 + [1, 2, 3, 4, 5]]
    assert b["attention_mask"].tolist() == [[0] * 5 + [1] * 3, [0] * 3 + [1] * 5]
    assert b["position_ids"].tolist() == [[0] * 5 + [0, 1, 2], [0] * 3 + [0, 1, 2, 3, 4]]
    assert "pixel_values" not in b and b["meta"]["padding"]["padded"] == 16


def test_pad_errors():
    with pytest.raises(ValueError, match="different shapes"):
        PadCollator(PAD)([item(2, "a", 1), {**item(2, "b"), "pixel_values": torch.zeros(1, 3, 8, 8)}])
    with pytest.raises(ValueError, match="padding_side"):
        PadCollator(PAD, "middle")


def test_greedy_pack_best_fit_decreasing():
    assert greedy_pack([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]
    assert greedy_pack([7, 7], 7) == [[0], [1]]
    # longest first, each into the row with the least room that fits: 6 -> r0 (room 4), 5 -> r1 (5), 4 -> r0 (exact),
    # 3 -> r1 (2), 2 -> r1 (exact), 1 -> r2; rows longest first (ties: first item), items in data order
    assert greedy_pack([3, 6, 1, 5, 2, 4], 10) == [[0, 3, 4], [1, 5], [2]]
    # first-fit in data order needs three rows here (5 | 6 | 4 joins 5 | 5 opens a third); best-fit decreasing two
    assert greedy_pack([5, 6, 4, 5], 10) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="item 1 has 9 tokens, more than the packing budget max_length=8"):
        greedy_pack([2, 9], 8)


def test_pack_collator_rows_positions_segments_labels_pixels():
    items = [item(4, "a", 1, 1), item(3, "b"), item(5, "c", 2, 2), item(2, "d", 1, 3)]
    b = PackCollator(PAD, max_length=8)(items)
    # best-fit decreasing: c(5) opens row 0, a(4) row 1, b(3) fills row 0 exactly, d(2) joins a: b+c | a+d
    assert b["meta"]["ids"] == [["b", "c"], ["a", "d"]]
    assert b["input_ids"].tolist() == [[1, 2, 3, 1, 2, 3, 4, 5], [1, 2, 3, 4, 1, 2, PAD, PAD]]
    assert b["position_ids"].tolist()[0] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]]
    # each sample's first label is -100 (here b's and d's first tokens would otherwise be trained)
    items[1]["labels"] = items[1]["input_ids"].clone()
    items[3]["labels"] = items[3]["input_ids"].clone()
    b = PackCollator(PAD, max_length=8, pad_to_multiple_of=8)(items)
    assert b["labels"].tolist() == [[-100, 2, 3, -100, -100, 3, 4, 5], [-100, -100, 3, 4, -100, 2, -100, -100]]
    assert b["segment_ids"][1, -1] == 0 and b["attention_mask"][1].tolist() == [1] * 6 + [0, 0]
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [2.0, 2.0, 1.0, 3.0]  # row-major token order
    assert b["meta"]["padding"] == {"tokens": 14, "padded": 16, "waste": pytest.approx(2 / 16)}
    # the training loop counts samples, not rows (metrics.jsonl `samples`)
    assert samples_in(b["meta"], b) == 4 and b["input_ids"].shape[0] == 2
    padded = PadCollator(PAD)(items[:3])
    assert samples_in(padded["meta"], padded) == 3


def test_concat_renumbers_packed_items():
    row = concat_items([item(2, "a"), item(2, "b")])
    again = concat_items([row, item(3, "c")])
    assert again["segment_ids"].tolist() == [1, 1, 2, 2, 3, 3, 3]
    assert again["position_ids"].tolist() == [0, 1, 0, 1, 0, 1, 2] and again["meta"]["ids"] == ["a", "b", "c"]


def test_packed_dataset_with_dataloader():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10]
    data = [item(n, str(i)) for i, n in enumerate(lengths)]
    for workers in (0, 2):
        ds = PackedDataset(data, max_length=12, buffer_size=4, seed=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=PadCollator(PAD), num_workers=workers)
        seen = []
        for b in loader:
            assert b["input_ids"].shape[1] <= 12 and "segment_ids" in b and "position_ids" in b
            assert b["meta"]["padding"]["tokens"] == int((b["segment_ids"] > 0).sum())
            seen += [s for row in b["meta"]["ids"] for s in row]
        assert sorted(seen, key=int) == [str(i) for i in range(10)]
    a, b = (list(PackedDataset(data, 12, 4, seed=s)) for s in (1, 1))
    assert [r["meta"]["ids"] for r in a] == [r["meta"]["ids"] for r in b]


def test_padding_report_on_shapes_mixture(capsys):
    pytest.importorskip("vlm.data.shapes")
    from vlm.data.report_padding import main, padding_waste, shapes_items

    items, pad = shapes_items(24)
    rep = padding_waste(items, batch_size=4, max_length=512, pad_token_id=pad)
    assert rep["padding"]["tokens"] == rep["packing"]["tokens"] == sum(it["input_ids"].numel() for it in items)
    assert rep["packing"]["waste"] < rep["padding"]["waste"] and rep["packing"]["batches"] < 6
    rep = main(["--samples", "12", "--batch-size", "4", "--max-length", "400"])
    out = capsys.readouterr().out
    printed = dict(re.findall(r"^\s+(padding|packing)\s.*waste=\s*([\d.]+)%$", out, re.MULTILINE))
    assert set(printed) == {"padding", "packing"}, out  # the figure is printed, one line per strategy
    for name, waste in printed.items():
        assert float(waste) == pytest.approx(100 * rep[name]["waste"], abs=0.05)
    assert float(printed["packing"]) < float(printed["padding"])


def test_padding_report_runs_as_a_command(capsys, monkeypatch):
    """``python -m vlm.data.report_padding`` (run in-process through runpy, as ``-m`` does)."""
    import runpy
    import sys

    pytest.importorskip("vlm.data.shapes")
    monkeypatch.setattr(sys, "argv", ["report_padding", "--samples", "9", "--batch-size", "3"])
    monkeypatch.delitem(sys.modules, "vlm.data.report_padding", raising=False)  # fresh, like a new process
    runpy.run_module("vlm.data.report_padding", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert out.startswith("9 shapes samples") and re.search(r"packing .* waste=\s*[\d.]+%", out)


# --------------------------------------------------------------------------------------- packing == unpacked
TINY = {"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                    "num_heads": 4, "intermediate_size": 64},
        "connector": {"name": "mlp", "depth": 2},
        "llm": {"name": "hf_causal_lm", "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "vocab_size": 300}}}


def samples() -> list[Sample]:
    img = [Image.new("RGB", (24 + 8 * i, 32), c) for i, c in enumerate(COLORS)]
    return [
        Sample([Message("user", [ImageRef(0), "\nWhat colour?"]), Message("assistant", ["Red."])], [img[0]], id="a"),
        Sample([Message("user", ["Say hi."]), Message("assistant", ["Hi there, friend."])], [], id="b"),
        Sample([Message("user", [ImageRef(0), " vs ", ImageRef(1)]), Message("assistant", ["Green, blue."]),
                Message("user", ["Sure?"]), Message("assistant", ["Yes."])], [img[1], img[2]], id="c"),
        Sample([Message("user", [ImageRef(0), "?"]), Message("assistant", ["Yellow!"])], [img[3]], id="d"),
    ]


def test_packed_rows_give_the_same_logits_as_samples_alone():
    vlm = pytest.importorskip("vlm")
    from vlm.data.processor import Processor

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = vlm.build(TINY, tokenizer=tok).eval()
    proc = Processor.for_model(model, tok, "chatml")
    items = [proc(s) for s in samples()]
    lengths = [it["input_ids"].numel() for it in items]
    budget = lengths[0] + lengths[1] + lengths[2]  # rows: a+b+c | d (padded)
    batch = PackCollator(tok.pad_token_id, max_length=budget)(items)
    assert batch["meta"]["ids"] == [["a", "b", "c"], ["d"]]
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items if it["pixel_values"]
                                                         is not None]))
    meta = batch.pop("meta")
    with torch.no_grad():
        packed = model(**batch)
        alone = [model(it["input_ids"][None], pixel_values=it["pixel_values"], labels=it["labels"][None])
                 for it in items]
        leaky = model(**{k: v for k, v in batch.items() if k not in ("segment_ids", "position_ids")}).logits
    pos = {"a": (0, 0), "b": (0, lengths[0]), "c": (0, lengths[0] + lengths[1]), "d": (1, 0)}
    for it, out, sid in zip(items, alone, "abcd"):
        row, start = pos[sid]
        got = packed.logits[row, start:start + it["input_ids"].numel()]
        torch.testing.assert_close(got, out.logits[0], atol=1e-4, rtol=0)
    # without segment ids the later samples attend to earlier ones: the check above can fail
    assert (leaky[0, lengths[0]:lengths[0] + lengths[1]] - alone[1].logits[0]).abs().max() > 1e-3
    # the packed loss is the token-weighted mean of the per-sample losses
    n = [int((it["labels"][1:] != -100).sum()) for it in items]
    expected = sum(o.loss * k for o, k in zip(alone, n)) / sum(n)
    torch.testing.assert_close(packed.loss, expected, atol=1e-5, rtol=0)
    assert meta["padding"]["waste"] == pytest.approx(1 - sum(lengths) / (2 * budget))


def test_pad_collator_batch_runs_through_model_like_alone():
    vlm = pytest.importorskip("vlm")
    from vlm.data.processor import Processor

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = vlm.build(TINY, tokenizer=tok).eval()
    items = [Processor.for_model(model, tok)(s) for s in samples()[:2]]
    batch = PadCollator(tok.pad_token_id)(items)
    batch.pop("meta")
    with torch.no_grad():
        out = model(**batch).logits
        ref = model(items[1]["input_ids"][None]).logits[0]
    torch.testing.assert_close(out[1, : ref.shape[0]], ref, atol=1e-4, rtol=0)
    assert processor(tok)(samples()[0])["pixel_values"].shape == (1, 3, 16, 16)
