"""``vlm.load(DIR, quantize=...)`` (vlm.quantize): int8 (torchao) and int4 (optimum-quanto, packed two per byte)
quantize the LLM's linear layers on CPU, generate, stay close to fp32, store what they claim; bad values and nf4 on
CPU are clear errors; a quantized model is not saved. One tiny random model per module, loaded once per scheme."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vlm
from tests.conftest import tiny_cfg
from vlm.bench.quantize import agreement
from vlm.quantize import linear_weight_bytes, storage_bytes, target_names


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random clip + llama model (64 wide: int4 groups are whole rows below 128 inputs) with the byte
    tokenizer; init std 0.2 so that greedy choices are not near-ties of an untrained model's flat logits."""
    from vlm.data.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    cfg = tiny_cfg("clip", "llama")
    cfg["llm"]["config"].update(hidden_size=64, intermediate_size=128, initializer_range=0.2)
    model = vlm.build(cfg, tokenizer=byte_tokenizer("chatml"))
    model.set_template("chatml")
    return model.eval().save_pretrained(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def models(model_dir):
    return {s: vlm.load(model_dir, quantize=s) for s in (None, "int8", "int4")}


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (4, 12), generator=g)


def test_the_llm_linears_are_quantized_head_and_embeddings_kept(models):
    ref = models[None]
    names = target_names(ref)
    llm_linears = [n for n, m in ref.llm.named_modules() if isinstance(m, nn.Linear)]
    assert len(names) == len(llm_linears) - 1 == 2 * 7  # q k v o gate up down per layer; not lm_head
    for scheme in ("int8", "int4"):
        q = models[scheme]
        assert q.quantization["scheme"] == scheme and q.quantization["modules"] == names
        for name in names:
            assert type(q.get_submodule(name).weight) not in (torch.Tensor, nn.Parameter), name
        assert type(q.llm.output_head.weight) is nn.Parameter
        assert type(q.llm.model.get_input_embeddings().weight) is nn.Parameter
        assert all(type(m.weight) is nn.Parameter for m in q.encoder.modules() if isinstance(m, nn.Linear))
        assert torch.equal(q.llm.output_head.weight, ref.llm.output_head.weight)


@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("int4", 4)])
def test_dequantized_weights_are_within_half_a_step(models, scheme, bits):
    """Each row's rounding error is at most half a quantization step of a symmetric grid over that row
    (2 max|w| / (2^bits - 1): torchao's int8 grid; quanto's int4 grid, min-max per group, is finer), and not zero
    (the weights were quantized)."""
    ref, q = models[None], models[scheme]
    for name in target_names(ref):
        w = ref.get_submodule(name).weight.detach()
        deq = q.get_submodule(name).weight.dequantize().float()
        assert deq.shape == w.shape
        step = 2 * w.abs().amax(1, keepdim=True) / (2 ** bits - 1)
        err = (deq - w).abs()
        assert (err <= step / 2 * 1.05 + 1e-6).all(), (name, (err / step).max())
        assert err.max() > 0


def test_int4_is_packed_two_per_byte_and_bytes_are_counted(models):
    ref = models[None]
    names = target_names(ref)
    fp32 = linear_weight_bytes(ref, names)
    assert fp32["bytes"] == fp32["fp32_bytes"] == sum(ref.get_submodule(n).weight.numel() * 4 for n in names)
    int4 = linear_weight_bytes(models["int4"], names)
    int8 = linear_weight_bytes(models["int8"], names)
    assert int4["bytes"] <= 0.2 * fp32["fp32_bytes"] and int8["bytes"] <= 0.3 * fp32["fp32_bytes"]
    assert int4["bytes"] < int8["bytes"]
    for name in names:
        w = models["int4"].get_submodule(name).weight
        packed = w._data._data  # quanto's PackedTensor: uint8, two 4-bit values per byte
        assert packed.dtype == torch.uint8 and packed.numel() * 2 == w.numel()
        assert storage_bytes(w) == packed.numel() + storage_bytes(w._scale) + storage_bytes(w._shift)
        q8 = models["int8"].get_submodule(name).weight
        assert q8.qdata.dtype == torch.int8 and storage_bytes(q8) >= q8.qdata.numel()


def test_logits_stay_close_to_fp32(models, ids):
    with torch.no_grad():
        ref = models[None](ids).logits.flatten()
        cos = {s: torch.nn.functional.cosine_similarity(models[s](ids).logits.flatten(), ref, dim=0).item()
               for s in ("int8", "int4")}
    # through two layers of a random model with large weights int4's error grows; each layer alone stays close
    assert cos["int8"] > 0.999 and cos["int4"] > 0.8, cos
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    for name in target_names(models[None]):
        ref_layer, q_layer = models[None].get_submodule(name), models["int4"].get_submodule(name)
        with torch.no_grad():
            a, b = ref_layer(x[:, :ref_layer.in_features]), q_layer(x[:, :ref_layer.in_features])
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99, name


def test_generation_and_greedy_agreement(models, ids):
    """int8's greedy tokens mostly equal fp32's (a tiny random model: int4's may not); int4 generates, under
    ``torch.inference_mode`` too."""
    out = {}
    for s in (None, "int8"):
        out[s] = models[s].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out[s].shape == (4, 8)
    assert agreement(out[None].tolist(), out["int8"].tolist())[0] >= 80.0
    with torch.inference_mode():
        int4 = models["int4"].generate(ids[:1], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                                       eos_token_id=None)
    assert int4.shape == (1, 2)


def test_chat_cli_with_quantize(model_dir, capsys):
    from vlm.chat import main

    assert main([str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--quantize", "int4"]) == 0
    assert main([str(model_dir), "--prompt", "hi", "--quantize", "nf4"]) == 2
    assert "'nf4' (bitsandbytes) runs on cuda only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(model_dir), "--prompt", "hi", "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_bad_values_name_the_accepted_ones(model_dir):
    for bad in ("int3", "INT8", "", 8):
        with pytest.raises(ValueError, match=r"quantize=.* is not a quantization scheme; accepted: None \(no "
                                             r"quantization\), 'int4', 'int8', 'nf4'"):
            vlm.load(model_dir, quantize=bad)
    with pytest.raises(ValueError, match=r"quantize='nf4' \(bitsandbytes\) runs on cuda only; this model is on cpu, "
                                         r"where the accepted schemes are: 'int4', 'int8'"):
        vlm.load(model_dir, quantize="nf4")


def test_a_quantized_model_is_not_saved(models, tmp_path):
    with pytest.raises(ValueError, match=r"this model is quantized \(int8, for inference only\).*vlm.load\(DIR, "
                                         r"quantize='int8'\)"):
        models["int8"].save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_vision_and_head_options(model_dir):
    q = vlm.load(model_dir, quantize="int8", quantize_vision=True, quantize_head=True)
    enc = [m for m in q.encoder.modules() if isinstance(m, nn.Linear)]
    assert enc and all(type(m.weight) is not nn.Parameter for m in enc)
    assert type(q.llm.output_head.weight) is not nn.Parameter
    assert len(q.quantization["modules"]) == 2 * 7 + 1 + len(enc)
    with pytest.raises(ValueError, match="already quantized"):
        from vlm.quantize import quantize_model

        quantize_model(q, "int4")


def test_a_pre_quantized_transformers_checkpoint_is_refused_by_name(tmp_path):
    """A GPTQ / AWQ directory (config.json with quantization_config) is named as such, not misread."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "quantization_config":
                                                      {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(ValueError, match=r"pre-quantized checkpoint \(quantization_config.quant_method='awq'\); "
                                         r"vlm does not import GPTQ / AWQ"):
        vlm.load(tmp_path)
