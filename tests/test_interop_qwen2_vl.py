"""Qwen2-VL / Qwen2.5-VL interop against transformers' own classes (tiny random models saved to tmp_path, no
downloads): ``vlm.load`` of a transformers directory gives the class's logits for what its processor returns, whole;
vlm's processor gives the directory's processor outputs; from_hf -> to_hf -> from_hf is exact; the exported directory
answers ``model.chat`` exactly under plain transformers over two turns; bad inputs are clear errors."""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

import vlm
from tests.conftest import TINY_TEXT, picture, user
from vlm.data.processor import Processor
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference.chat import image_placement, processor_for, prompt_item
from vlm.inference.generate import decode
from vlm.interop import from_hf, to_hf

#: Qwen2-VL's chat template (its structure: a default system turn, images as <|vision_start|><|image_pad|>
#: <|vision_end|>), written into a byte tokenizer
TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
            "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
            "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
            "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
            "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GEOMETRY = {"min_pixels": 16 * 16, "max_pixels": 64 * 64, "patch_size": 8, "merge_size": 2, "temporal_patch_size": 2}
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320, "rope_parameters": ROPE}
FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, "qwen2_vl_text",
                 {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2}),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, "qwen2_5_vl_text",
                   {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 32,
                    "window_size": 32, "fullatt_block_indexes": [1]}),
}


def qwen_tokenizer():
    return byte_tokenizer(TEMPLATE, extra_tokens=SPECIAL, eos_token="<|im_end|>")


def save_family(path, family, tied=False, seed=0):
    """A tiny random transformers model of ``family`` with its processor, saved to ``path``."""
    config_class, model_class, processor_class, text_type, vision = FAMILIES[family]
    tok = qwen_tokenizer()
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(f"<|{v}|>") for k, v in
           [("image", "image_pad"), ("video", "video_pad"), ("vision_start", "vision_start"),
            ("vision_end", "vision_end")]}
    text = {**TEXT, "model_type": text_type, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "tie_word_embeddings": tied}
    vision = {**vision, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
    torch.manual_seed(seed)
    hf = model_class(config_class(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)).eval()
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.pad_token_id = tok.pad_token_id
    hf.save_pretrained(str(path))
    geometry = dict(GEOMETRY)
    processor_class(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=tok,
                    video_processor=Qwen2VLVideoProcessor(**geometry), chat_template=TEMPLATE).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    path = save_family(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path, vlm.load(path), AutoProcessor.from_pretrained(str(path))


CASES = {  # images per sample (sizes): one odd-sized image; several of different sizes; a batch, different counts
    "one_odd_image": [[(37, 53)]],
    "several_sizes": [[(40, 24), (30, 61), (64, 64)]],
    "batch_left_padded": [[(50, 30)], [(24, 70), (45, 45)], []],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_for_its_processor_output(saved, case):
    family, path, model, processor = saved
    hf = FAMILIES[family][1].from_pretrained(str(path)).eval()
    processor.tokenizer.padding_side = "left"
    texts, images = [], []
    for i, sizes in enumerate(CASES[case]):
        texts.append(processor.apply_chat_template(user(len(sizes), f"what is in picture {i}?" * (i + 1)),
                                                   add_generation_prompt=True))
        images += [picture(10 * i + j, s) for j, s in enumerate(sizes)]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert {"mm_token_type_ids", "image_grid_thw", "pixel_values"} <= set(inputs)
    with torch.no_grad():
        ref, ours = hf(**inputs).logits, model(**inputs).logits
    keep = inputs["attention_mask"].bool()
    diff = (ref - ours).abs()[keep].max().item()
    assert diff <= 1e-4, diff


def hub_layout(path, min_pixels, max_pixels):
    """Rewrite ``path``'s processor files as hub checkpoints have them: a flat ``preprocessor_config.json`` with
    ``min_pixels`` / ``max_pixels`` (no ``size``), no image processor inside ``processor_config.json``."""
    nested = json.loads((path / "processor_config.json").read_text())
    image = {k: v for k, v in nested.pop("image_processor").items() if k != "size"}
    image.update(min_pixels=min_pixels, max_pixels=max_pixels, processor_class=nested["processor_class"])
    (path / "preprocessor_config.json").write_text(json.dumps(image))
    (path / "processor_config.json").write_text(json.dumps(nested))


def test_processor_for_model_gives_the_directory_processors_outputs(saved):
    _, _, model, processor = saved
    # odd-sized, over max_pixels (scaled down), under min_pixels (scaled up)
    images = [picture(1, (37, 53)), picture(2, (90, 20)), picture(3, (120, 90)), picture(4, (9, 11))]
    sample = Sample([Message("user", [*map(ImageRef, range(4)), "compare them"]), Message("assistant", ["the same"]),
                     Message("user", ["sure?"])], images=images)
    ours = Processor.for_model(model, model.tokenizer, "auto")(sample, add_generation_prompt=True)
    messages = [{"role": "user", "content": [{"type": "image"}] * 4 + [{"type": "text", "text": "compare them"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "the same"}]},
                {"role": "user", "content": [{"type": "text", "text": "sure?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(text=[text], images=images, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max().item() <= 1e-5
    h, w = ours["image_grid_thw"][2, 1:].tolist()  # the image over max_pixels was scaled into the budget
    assert h * w * 8 * 8 <= GEOMETRY["max_pixels"] < 120 * 90


def test_a_hub_layout_processor_is_read(tmp_path):
    """Hub checkpoints state the pixel budget as min_pixels / max_pixels in a flat preprocessor_config.json."""
    path = save_family(tmp_path, "qwen2_vl")
    hub_layout(path, 32 * 32, 48 * 48)
    model, processor = from_hf(path), AutoProcessor.from_pretrained(str(path))
    assert {k: model.image_preprocessing["tiling"][k] for k in ("min_pixels", "max_pixels")} == {
        "min_pixels": 32 * 32, "max_pixels": 48 * 48}
    images = [picture(1, (100, 60)), picture(2, (10, 20))]
    sample = Sample([Message("user", [ImageRef(0), ImageRef(1), "hi"])], images=images)
    ours = Processor.for_model(model, model.tokenizer, "auto")(sample, add_generation_prompt=True)
    theirs = processor(text=[processor.apply_chat_template(user(2, "hi"), add_generation_prompt=True)],
                       images=images, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tmp_path, tied):
    for family in FAMILIES:
        src = save_family(tmp_path / f"{family}_src", family, tied=tied)
        first = from_hf(src)
        out = to_hf(first, tmp_path / f"{family}_out")
        second = from_hf(out)
        a, b = first.state_dict(), second.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), family
        assert second.image_preprocessing == first.image_preprocessing
        assert second.image_token == "<|image_pad|>" and second.image_token_id == first.image_token_id
        assert second.tokenizer.chat_template == first.tokenizer.chat_template
        assert second.generation == first.generation
        assert type(AutoProcessor.from_pretrained(str(out))).__name__ == FAMILIES[family][2].__name__
        assert (tied == (second.llm.model.get_output_embeddings().weight.data_ptr()
                         == second.llm.model.get_input_embeddings().weight.data_ptr()))


def assert_answers_as_model_chat(model, out):
    """The exported directory ``out``, under plain transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``,
    ``apply_chat_template``, greedy ``generate``), answers two turns as ``model.chat``, and vlm's second-turn prompt
    is transformers' token for token."""
    hf = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    image, new = picture(5, (41, 29)), 6
    r1, history = model.chat(image, "what is it?", max_new_tokens=new)
    r2, _ = model.chat(None, "and then?", history, max_new_tokens=new)
    messages = user(1, "what is it?")
    for reply, follow_up in ((r1, "and then?"), (r2, None)):
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        assert decode(processor.tokenizer, ids, model.generation["eos_token_id"])[0] == reply  # as chat decodes
        messages += [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        if follow_up:
            messages += [{"role": "user", "content": [{"type": "text", "text": follow_up}]}]
    ours = prompt_item(processor_for(model), history, None, "and then?", placement=image_placement(model))[0]
    text = processor.apply_chat_template(messages[:3], add_generation_prompt=True)
    assert ours["input_ids"].tolist() == processor(text=[text], images=[image])["input_ids"][0]
    return hf


def test_the_exported_directory_answers_as_model_chat(saved, tmp_path):
    family, _, model, _ = saved
    hf = assert_answers_as_model_chat(model, to_hf(model, tmp_path / "out"))
    assert type(hf) is FAMILIES[family][1]


def test_grids_that_disagree_with_the_pixels_are_named(saved):
    _, _, model, processor = saved
    text = processor.apply_chat_template(user(1, "hi"), add_generation_prompt=True)
    inputs = processor(text=[text], images=[picture(0, (40, 40))], return_tensors="pt")
    bad = {**inputs, "image_grid_thw": inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])}
    with pytest.raises(ValueError, match="image_grid_thw disagrees with the pixels.*pixel_values"):
        model(**bad)
    types = inputs["mm_token_type_ids"].clone()
    types[0, 0] = 1
    with pytest.raises(ValueError, match="mm_token_type_ids row 0"):
        model(**{**inputs, "mm_token_type_ids": types})


def test_video_inputs_give_transformers_logits(saved):
    """The processor's video output, whole (``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``,
    ``mm_token_type_ids``), beside an image."""
    family, path, model, processor = saved
    hf = FAMILIES[family][1].from_pretrained(str(path)).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}]}]
    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    inputs = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)], videos=[frames],
                       images=[picture(0, (40, 40))], return_tensors="pt")
    assert "pixel_values_videos" in inputs and model.video_token_id == hf.config.video_token_id
    with torch.no_grad():
        assert (hf(**inputs).logits - model(**inputs).logits).abs().max().item() <= 1e-4


def test_other_compositions_are_refused_with_their_problems(tmp_path):
    tok = qwen_tokenizer()
    clip = vlm.build({"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                  "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
                      "connector": {"name": "mlp"},
                      "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])}}, tokenizer=tok)
    with pytest.raises(ValueError, match="vision tower is 'qwen2_vl_vit'.*merger is 'patch_merger'.*text model"):
        to_hf(clip, tmp_path / "a", format="qwen2_vl")
    model = from_hf(save_family(tmp_path / "src", "qwen2_5_vl"))
    with pytest.raises(ValueError, match="tower is 'qwen2_5_vl_vision'.*norm='rms_norm'.*'qwen2_5_vl_text'"):
        to_hf(model, tmp_path / "b", format="qwen2_vl")
    # the Qwen2.5-VL tower + merger before a Llama (1-D positions): no format holds it
    llama = vlm.build({"encoder": model.encoder.export_config(), "connector": {"name": "patch_merger",
                                                                              "norm": "rms_norm"},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])}}, tokenizer=tok)
    with pytest.raises(ValueError, match=r"no transformers format can hold.*qwen2_5_vl: the LLM is 'llama'; "
                                         r"Qwen2.5-VL's text model is 'qwen2_5_vl_text'"):
        to_hf(llama, tmp_path / "c")


def test_convert_cli_both_ways_keeps_logits(saved, tmp_path):
    from vlm.convert import main

    _, path, model, processor = saved
    assert main([str(path), str(tmp_path / "vlm")]) == 0
    assert main([str(tmp_path / "vlm"), str(tmp_path / "hf")]) == 0
    text = processor.apply_chat_template(user(1, "hi"), add_generation_prompt=True)
    inputs = processor(text=[text], images=[picture(3, (33, 47))], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits
        for d in ("vlm", "hf"):
            loaded = vlm.load(tmp_path / d)
            assert loaded.image_preprocessing == model.image_preprocessing
            assert torch.equal(loaded(**inputs).logits, ref), d


@pytest.mark.parametrize("template", [None, "chatml"])
def test_a_model_built_from_parts_exports(tmp_path, template):
    """qwen2_vl_vit + patch_merger + qwen2_vl_text built by vlm (not imported; with Qwen's chat template, or trained
    with vlm's chatml) exports as Qwen2-VL with its processor: transformers' class gives our logits for the exported
    processor's output and answers as model.chat."""
    tok = qwen_tokenizer()
    torch.manual_seed(1)
    vision = {"model_type": "qwen2_vl_vision", **FAMILIES["qwen2_vl"][4], "patch_size": 8, "spatial_merge_size": 2}
    model = vlm.build({"encoder": {"name": "qwen2_vl_vit", "image_size": 32, "config": vision},
                       "connector": {"name": "patch_merger"}, "image_token": "<|image_pad|>",
                       "llm": {"name": "hf_causal_lm", "config": {**TEXT, "model_type": "qwen2_vl_text"}}},
                      tokenizer=tok).eval()
    if template is not None:
        model.set_template(template)
    model.image_preprocessing = {"resize_mode": "resize", "tiling": {"kind": "native", **GEOMETRY,
                                                                     "resample": "torchvision"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full processor is written
        out = to_hf(model, tmp_path)
    hf = assert_answers_as_model_chat(model, out)
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(hf) is Qwen2VLForConditionalGeneration and type(processor) is Qwen2VLProcessor
    text = processor.apply_chat_template(user(2, "hi"), add_generation_prompt=True)
    inputs = processor(text=[text], images=[picture(0, (45, 23)), picture(1, (30, 30))], return_tensors="pt")
    with torch.no_grad():
        assert (hf(**inputs).logits - model(**inputs).logits).abs().max().item() <= 1e-4
    assert from_hf(out).image_preprocessing == model.image_preprocessing


def test_a_template_without_image_tokens_warns_on_export(saved, tmp_path):
    _, _, model, _ = saved
    model = copy.deepcopy(model)
    model.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}"
                                     "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                                     "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}")
    with pytest.warns(UserWarning, match=r"chat template writes no <\|image_pad\|> for an image part"):
        to_hf(model, tmp_path)


def test_a_transformers_4_layout_checkpoint_imports_identically(tmp_path):
    """Hub checkpoints (e.g. Qwen2.5-VL-3B-Instruct) are in transformers 4's layout: text keys at the top of
    config.json, weights ``model.layers.*`` / ``visual.*`` / ``lm_head``. transformers 5 converts them on load; the
    import is the same model, weight for weight (tied embeddings, as the 3B's)."""
    from safetensors.torch import load_file, save_file

    src = save_family(tmp_path, "qwen2_5_vl", tied=True)
    ref = from_hf(src)
    renames = (("model.language_model.", "model."), ("model.visual.", "visual."))
    legacy = {}
    for key, value in load_file(str(src / "model.safetensors")).items():
        old, new = next(((o, n) for o, n in renames if key.startswith(o)), ("", ""))
        legacy[new + key[len(old):]] = value
    save_file(legacy, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.update({k: v for k, v in config.pop("text_config").items() if k != "model_type"})
    (src / "config.json").write_text(json.dumps(config))
    got = from_hf(src)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got.llm.model.get_output_embeddings().weight.data_ptr() == got.llm.model.get_input_embeddings().weight.data_ptr()


def test_the_label_only_head_takes_the_processor_output_too():
    """The lm objective's label-only path (``VLM.hidden_states``; the model supports it) takes the batch the family's processor returns,
    ``mm_token_type_ids`` included, and gives forward's loss."""
    import vlm
    from vlm.objectives import build as build_objective
    from tests.test_native_resolution import LLMS, TOWER

    torch.manual_seed(0)
    model = vlm.build({"encoder": dict(TOWER), "connector": {"name": "patch_merger"},
                       "llm": {"name": "hf_causal_lm", "config": dict(LLMS["qwen2_vl_text"])}})
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([[5, 6] + [model.image_token_id] * 4 + [7, 8, 9]])
    assert model.supports_label_only_head
    batch = {"input_ids": ids, "labels": ids.clone(), "pixel_values": torch.randn(16, 3 * 2 * 8 * 8),
             "image_grid_thw": grid, "mm_token_type_ids": (ids == model.image_token_id).long()}
    head = build_objective({"name": "lm", "label_only_head": True})(model, batch).loss
    full = build_objective({"name": "lm", "label_only_head": False})(model, batch).loss
    torch.testing.assert_close(head, full, atol=1e-5, rtol=1e-5)
