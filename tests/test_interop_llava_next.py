"""LLaVA-NeXT interop against transformers' own classes (tiny random models saved to tmp_path, no downloads):
``vlm.load`` of a ``LlavaNextForConditionalGeneration`` directory gives the class's logits for what
``LlavaNextProcessor`` returns, whole (``pixel_values (N, max_views, 3, S, S)``, ``image_sizes``), for images of
three aspect ratios, several images in one sample and a batch with different image counts; vlm's own processor gives
the same ids and logits; from_hf -> to_hf is exact; the exported directory answers ``model.chat`` exactly under plain
transformers; ``python -m vlm.convert`` both ways; bad geometry is refused when the model is composed."""
import copy

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import vlm
from tests.conftest import TINY_TEXT, picture, user
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference.chat import processor_for
from vlm.inference.generate import decode
from vlm.interop import from_hf, to_hf

#: a chat template that writes each image as ``<image>`` (LLaVA-NeXT's convention), chatml turns
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
            "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
S = 56  # tile size: 56 px, patch 14 -> a 4x4 token grid per tile
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168]]
VISION = {"clip": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "image_size": S, "patch_size": 14},
          "siglip": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": S, "patch_size": 14,
                     "vision_use_head": False}}
#: (tower, text, strategy): CLIP drops its CLS ('default'); SigLIP has none and keeps every token ('full')
FAMILIES = {"clip-llama": ("clip", "llama", "default"), "siglip-qwen2": ("siglip", "qwen2", "full")}


def tokenizer():
    return byte_tokenizer(TEMPLATE, extra_tokens=["<|im_start|>", "<|im_end|>", "<image>"], eos_token="<|im_end|>")


def save_llava_next(path, family, seed=0, pinpoints=PINPOINTS):
    """A tiny random ``LlavaNextForConditionalGeneration`` (every tensor randomized) + its processor, in ``path``."""
    tower, text, strategy = FAMILIES[family]
    tok = tokenizer()
    text_cfg = {**copy.deepcopy(TINY_TEXT[text]), "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id}
    cfg = LlavaNextConfig(vision_config=copy.deepcopy(VISION[tower]), text_config=text_cfg,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_select_strategy=strategy, vision_feature_layer=-2,
                          tie_word_embeddings=text == "qwen2")
    torch.manual_seed(seed)
    hf = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.pad_token_id = tok.pad_token_id
    hf.save_pretrained(str(path))
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                    image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, image_token="<image>",
                       vision_feature_select_strategy=strategy, num_additional_image_tokens=int(tower == "clip"),
                       chat_template=TEMPLATE).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    path = save_llava_next(tmp_path_factory.mktemp(request.param), request.param)
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(path)).eval()
    # the PIL backend computes vlm's pixels exactly (transformers' default torchvision backend rounds bicubic resizes
    # differently)
    return request.param, path, vlm.load(path), AutoProcessor.from_pretrained(str(path), backend="pil"), hf


# (width, height) per image: wide (rows unpadded), tall (columns unpadded), about square; several per sample; a batch
# with 1, 2 and 0 images
CASES = {
    "three_aspect_ratios": [[(150, 40)], [(30, 90)], [(61, 57)]],
    # (300, 4): thinner than one token row once tiled, so only its base view's tokens (as transformers)
    "several_in_one_sample": [[(150, 40), (30, 90), (45, 45), (300, 4)]],
    "batch_different_counts": [[(80, 33)], [(24, 70), (45, 45)], []],
}


def processor_inputs(processor, case):
    processor.tokenizer.padding_side = "left"
    texts, images = [], []
    for i, sizes in enumerate(CASES[case]):
        texts.append(processor.apply_chat_template(user(len(sizes), "what is it?" * (i + 1)),
                                                   add_generation_prompt=True))
        images += [picture(10 * i + j, s) for j, s in enumerate(sizes)]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_for_its_processor_output(saved, case):
    _, _, model, processor, hf = saved
    inputs = processor_inputs(processor, case)
    assert inputs["pixel_values"].ndim == 5 and "image_sizes" in inputs
    with torch.no_grad():
        ref, ours = hf(**inputs).logits, model(**inputs).logits
    keep = inputs["attention_mask"].bool()
    assert (ref - ours).abs()[keep].max().item() <= 1e-4
    # the placeholders the processor wrote are the arrangement's count for each image's size
    sizes = [s for row in CASES[case] for s in row]
    expected = sum(model.image_token_count(h, w) for w, h in sizes)
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == expected


def test_vlm_processor_gives_the_same_ids_and_logits(saved):
    """vlm's processor (Processor.for_model: the anyres layout the arrangement states) gives LlavaNextProcessor's
    input_ids, and its pixels (every view concatenated, with image_sizes) give transformers' logits."""
    _, _, model, processor, hf = saved
    sizes = [(150, 40), (30, 90)]
    images = [picture(j, s) for j, s in enumerate(sizes)]
    ours = processor_for(model)
    item = ours(Sample([Message("user", [ImageRef(0), ImageRef(1), "what is it?"])], images=images),
                add_generation_prompt=True)
    text = processor.apply_chat_template(user(2, "what is it?"), add_generation_prompt=True)
    theirs = processor(text=[text], images=images, return_tensors="pt")
    assert item["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert item["image_sizes"].tolist() == theirs["image_sizes"].tolist()
    counts = [model.arrangement.num_views(h, w) for w, h in sizes]
    flat = torch.cat([p[:n] for p, n in zip(theirs["pixel_values"], counts)])
    assert (item["pixel_values"] - flat).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref = hf(**theirs).logits
        got = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
                    image_sizes=item["image_sizes"]).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_round_trip_is_exact_and_the_export_answers_as_model_chat(saved, tmp_path):
    family, _, model, processor, hf = saved
    out = to_hf(model, tmp_path / "out")
    back = LlavaNextForConditionalGeneration.from_pretrained(str(out)).eval()
    theirs, ours = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert type(AutoProcessor.from_pretrained(str(out))).__name__ == "LlavaNextProcessor"
    # model.chat (vlm's processor and generate) == plain transformers on the exported directory
    exported = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    proc = AutoProcessor.from_pretrained(str(out), backend="pil")
    image, new = picture(5, (71, 30)), 6
    reply, _ = model.chat(image, "what is it?", max_new_tokens=new)
    inputs = proc(text=[proc.apply_chat_template(user(1, "what is it?"), add_generation_prompt=True)],
                  images=[image], return_tensors="pt")
    with torch.no_grad():
        ids = exported.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert decode(proc.tokenizer, ids, model.generation["eos_token_id"])[0] == reply
    assert len(reply) > 0


def test_convert_cli_both_ways_and_save_load(saved, tmp_path):
    from vlm.convert import main

    _, _, model, processor, _ = saved
    assert main([str(saved[1]), str(tmp_path / "vlm")]) == 0
    assert main([str(tmp_path / "vlm"), str(tmp_path / "hf")]) == 0
    inputs = processor_inputs(processor, "several_in_one_sample")
    with torch.no_grad():
        ref = model(**inputs).logits
        for d in ("vlm", "hf"):
            loaded = vlm.load(tmp_path / d)
            assert loaded.arrangement.export_config() == model.arrangement.export_config()
            assert torch.equal(loaded(**inputs).logits, ref), d


def build_cfg(pinpoints, image_size=S, connector=None):
    return {"encoder": {"name": "clip", "image_size": image_size, "patch_size": 14, "hidden_size": 32,
                        "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
            "connector": connector or {"name": "mlp", "depth": 2},
            "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])},
            "arrangement": {"name": "anyres_grid", "pinpoints": pinpoints}}


def test_bad_geometry_is_refused_when_composed(tmp_path):
    with pytest.raises(ValueError, match=r"pinpoints \[\[56, 100\]\] are not multiples of the encoder's image"):
        vlm.build(build_cfg([[56, 112], [56, 100]]))
    with pytest.raises(ValueError, match="keeps tokens off its patch grid"):  # CLS kept: no grid
        vlm.build({**build_cfg(PINPOINTS), "encoder": {**build_cfg(PINPOINTS)["encoder"], "select": "all"}})
    with pytest.raises(ValueError, match="have no grid"):
        vlm.build(build_cfg(PINPOINTS, connector={"name": "resampler", "num_queries": 4, "num_heads": 4}))
    # a transformers directory whose pinpoints do not fit its tower names the config keys
    save_llava_next(tmp_path, "clip-llama", pinpoints=[[56, 112], [60, 56]])
    with pytest.raises(ValueError, match=r"config.json': anyres_grid: pinpoints \[\[60, 56\]\] are not multiples.*"
                                         r"\(from image_grid_pinpoints="):
        from_hf(tmp_path)


def test_a_layout_the_arrangement_cannot_place_and_missing_sizes_are_named(saved):
    from vlm.data.processor import Processor

    _, _, model, _, _ = saved
    ours = Processor.for_model(model, model.tokenizer, "auto", tiling={"kind": "anyres", "pinpoints": [[S, S]]})
    sample = Sample([Message("user", [ImageRef(0), "hi"])], images=[picture(0, (100, 40))], id="wide-1")
    with pytest.raises(ValueError, match=r"wide-1.*became 2 views, but the model's arrangement expects 3"):
        ours(sample, add_generation_prompt=True)
    ids = torch.full((1, 8), model.image_token_id)
    with pytest.raises(ValueError, match="needs image_sizes"):
        model(ids, pixel_values=torch.zeros(3, 3, S, S))
    with pytest.raises(ValueError, match=r"need \[3\] views"):
        model(ids, pixel_values=torch.zeros(2, 3, S, S), image_sizes=torch.tensor([[40, 100]]))
