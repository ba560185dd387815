"""Every ``python -m vlm.bench`` bench runs at tiny sizes (``--quick``) and writes well-formed JSON: the machine, the
versions, the device, a table of finite positive numbers. No timing is asserted (the machine is shared)."""
from __future__ import annotations

import json
import math

import pytest

from vlm.bench import BENCHES
from vlm.bench.__main__ import main
from vlm.bench.common import table
from vlm.bench.mfu import counted
from vlm.bench.models import FAMILIES, SIZES, build_pair, get_family, size

QUICK = ["--quick", "--repeats", "1", "--warmup", "0", "--memory-repeats", "1"]
# columns that may be 0 or blank by design: waste of a perfect packing, a row that has no such measurement; a tiny
# random model's quantized greedy tokens may all differ from fp32's, and the fp32 row drops nothing against itself
MAY_BE_ZERO = {"waste_pct", "wait_pct", "agreement_pct", "same_reply_pct", "max_drop_points"}


def numbers(rows, columns):
    for row in rows:
        for col in columns:
            value = row.get(col)
            if isinstance(value, float):
                yield col, value


@pytest.mark.parametrize("name", BENCHES.names())
def test_bench_quick_writes_its_json(tmp_path, name):
    out = tmp_path / f"{name}.json"
    returned = main([name, *QUICK, "--workers", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["bench"] == name and result["rows"] == json.loads(json.dumps(returned["rows"], default=str))
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")  # the plot of its table, beside the JSON
    for key in ("cpu", "torch", "transformers", "device"):
        assert result["machine"][key]
    assert result["machine"]["device"] == "cpu"
    values = list(numbers(result["rows"], result["columns"]))
    assert values, result["rows"]
    for col, v in values:
        assert math.isfinite(v) and (v >= 0 if col in MAY_BE_ZERO else v > 0), (col, v)


def test_train_step_compares_identical_models(tmp_path):
    result = main(["train_step", *QUICK, "--out", str(tmp_path / "t.json")])
    assert [r["model"] for r in result["rows"]] == ["transformers", "ours", "ours_selective", "ours_full_logits"]
    assert result["rows"][0]["time_ratio"] == 1.0 and result["rows"][0]["memory_ratio"] == 1.0
    assert result["first_loss_abs_diff"] <= 1e-5      # same weights, same batch: the same loss


def test_train_step_qwen2_5_vl_compares_identical_models(tmp_path, capsys):
    """Ours (qwen2_vl_vit + rms_norm patch_merger + Qwen2.5-VL text) vs Qwen2_5_VLForConditionalGeneration loaded
    from its to_hf export, on native-resolution images of different sizes: the same first loss, measured numbers."""
    result = main(["train_step", "--family", "qwen2_5_vl", *QUICK, "--out", str(tmp_path / "q.json")])
    assert result["setup"]["family"] == "qwen2_5_vl"
    assert [r["model"] for r in result["rows"]] == ["transformers", "ours", "ours_selective", "ours_full_logits"]
    for col, v in numbers(result["rows"], result["columns"]):
        assert math.isfinite(v) and v > 0, (col, v)
    assert result["first_loss_abs_diff"] <= 1e-4      # same weights, same batch: the same loss
    assert "Qwen2_5_VL" in FAMILIES["qwen2_5_vl"].hf_class and "ours_selective" in capsys.readouterr().out


def test_qwen2_5_vl_batch_is_what_the_processor_returns():
    """The bench batch: images of different sizes as flat patches + image_grid_thw, one placeholder per merged
    token, mm_token_type_ids 1 exactly there, equally long rows; transformers gets mm_token_type_ids, ours not."""
    import torch

    spec = size(True, None, "qwen2_5_vl")
    ours, theirs = build_pair(spec, torch.device("cpu"), family="qwen2_5_vl")
    fam = get_family("qwen2_5_vl")
    b = fam.batch(ours, spec, torch.device("cpu"))
    grid = b["image_grid_thw"]
    assert len({tuple(g) for g in grid.tolist()}) == grid.shape[0] > 1
    assert b["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    assert int((b["input_ids"] == ours.image_token_id).sum()) == int(grid.prod(dim=1).sum()) // 4
    assert torch.equal(b["mm_token_type_ids"].bool(), b["input_ids"] == ours.image_token_id)
    assert "mm_token_type_ids" not in fam.ours_batch(b) and set(fam.ours_batch(b)) < set(b)
    with torch.no_grad():
        ref = theirs(**b).logits
        got = ours(**fam.ours_batch(b)).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_unknown_family_or_size_is_a_clear_error():
    with pytest.raises(ValueError, match="--family 'nope'; expected one of .*qwen2_5_vl"):
        get_family("nope")
    with pytest.raises(ValueError, match="--size 'gpu_1b' for --family qwen2_5_vl; expected one of"):
        size(False, "gpu_1b", "qwen2_5_vl")


def test_mfu_counts_the_head_only_where_labels_are():
    spec = SIZES["full"]
    f = counted(spec, rows=8, length=324, labelled=8 * 63, image_tokens=196)
    assert f["total_all"] - f["total_labels"] == pytest.approx(f["lm_head_all"] - f["lm_head_labels"])
    # the head over every position: 3 x 2 x tokens x hidden x vocab
    assert f["lm_head_all"] == pytest.approx(3 * 2 * 8 * 324 * 512 * 32000)


def test_table_formats_rows():
    text = table([{"a": 1.23456, "b": "x"}, {"a": 2.0, "b": "yy"}])
    assert text.splitlines()[0].split() == ["a", "b"] and "1.235" in text


def test_train_step_smolvlm_compares_identical_models(tmp_path):
    """Ours (idefics3_vision + pixel_shuffle_mlp head=linear + Llama) vs SmolVLMForConditionalGeneration loaded from
    its to_hf export, on rows of 5, 3 (2, 1) views padded per row as SmolVLM's processor pads: the same first loss
    and logits, measured numbers."""
    import torch

    result = main(["train_step", "--family", "smolvlm", *QUICK, "--out", str(tmp_path / "s.json")])
    assert result["setup"]["family"] == "smolvlm"
    assert [r["model"] for r in result["rows"]] == ["transformers", "ours", "ours_selective", "ours_full_logits"]
    assert result["first_loss_abs_diff"] <= 1e-4
    spec = size(True, None, "smolvlm")
    ours, theirs = build_pair(spec, torch.device("cpu"), family="smolvlm")
    assert type(theirs).__name__ == "SmolVLMForConditionalGeneration"
    b = get_family("smolvlm").batch(ours, spec, torch.device("cpu"))
    assert b["pixel_values"].ndim == 5 and int(b["pixel_attention_mask"].flatten(2).any(2).sum()) == 5 + 3
    with torch.no_grad():
        assert (theirs(**b).logits - ours(**b).logits).abs().max().item() <= 1e-4
