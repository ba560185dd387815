"""LLaVA-OneVision interop against transformers' own classes (tiny random models saved to tmp_path, no downloads):
``vlm.load`` of a ``LlavaOnevisionForConditionalGeneration`` directory gives the class's logits for what
``LlavaOnevisionProcessor`` returns, whole (``pixel_values (N, max_views, 3, S, S)``, ``image_sizes``,
``batch_num_images``, ``pixel_values_videos (M, F, 3, S, S)``), for images of three aspect ratios (tiles pooled past
the ``anyres_max`` budget), several images in one sample (one view + a newline each), a batch with different image
counts (0 included) and videos (frames pooled 2x2, a newline after each video); vlm's own processor gives the same ids
and logits for one image; from_hf -> to_hf is exact; the exported directory answers ``model.chat`` exactly under
plain transformers; ``python -m vlm.convert`` both ways; bad input is refused, named."""
import copy
import re

import numpy as np
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

import vlm
from tests.conftest import TINY_TEXT, picture
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference.chat import processor_for
from vlm.inference.generate import decode
from vlm.interop import from_hf, to_hf

#: a chat template that writes each image as ``<image>`` and each video as ``<video>`` (OneVision's convention),
#: chatml turns
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
            "{% elif content['type'] == 'video' %}<video>\n"
            "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
S = 42  # tile size: 42 px, patch 14 -> a 3x3 token grid per tile (odd: a video frame pools to ceil(3/2) = 2)
#: OneVision's pinpoints pattern (every 1..3 x 1..3 tiles) at 42 px
PINPOINTS = [[S * r, S * c] for r in (1, 2, 3) for c in (1, 2, 3)]
VISION = {"clip": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "image_size": S, "patch_size": 14},
          "siglip": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": S, "patch_size": 14,
                     "vision_use_head": False}}
#: (tower, text, strategy): SigLIP + Qwen2 keeping every token (OneVision's 'full'); CLIP drops its CLS ('default')
FAMILIES = {"siglip-qwen2": ("siglip", "qwen2", "full"), "clip-llama": ("clip", "llama", "default")}
#: a budget of 2 tiles' tokens: a 2x2-tile image's 6x6 grid pools to 4x4 (ratio sqrt(36 / 18) > 1.1)
ASPECT = "anyres_max_2"


def tokenizer():
    return byte_tokenizer(TEMPLATE, extra_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                          eos_token="<|im_end|>")


def save_onevision(path, family, seed=0, pinpoints=PINPOINTS, aspect=ASPECT):
    """A tiny random ``LlavaOnevisionForConditionalGeneration`` (every tensor randomized) + its processor."""
    tower, text, strategy = FAMILIES[family]
    tok = tokenizer()
    text_cfg = {**copy.deepcopy(TINY_TEXT[text]), "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id}
    cfg = LlavaOnevisionConfig(vision_config=copy.deepcopy(VISION[tower]), text_config=text_cfg,
                               image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
                               vision_feature_select_strategy=strategy, vision_feature_layer=-1,
                               vision_aspect_ratio=aspect, tie_word_embeddings=text == "qwen2")
    torch.manual_seed(seed)
    hf = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.pad_token_id = tok.pad_token_id
    hf.save_pretrained(str(path))
    square = {"height": S, "width": S}
    ip = LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=pinpoints)
    vp = LlavaOnevisionVideoProcessor(size=square)
    LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_token="<image>",
                            video_token="<video>", num_image_tokens=9 + int(tower == "clip"),
                            vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect,
                            chat_template=TEMPLATE).save_pretrained(str(path))
    return path


def hf_processor(path):
    """``AutoProcessor`` of ``path`` with the PIL image backend (it computes vlm's pixels exactly; transformers'
    torchvision backend rounds bicubic resizes differently; the video processor has only the torchvision one)."""
    return AutoProcessor.from_pretrained(str(path), image_processor=AutoImageProcessor.from_pretrained(
        str(path), backend="pil"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    path = save_onevision(tmp_path_factory.mktemp(request.param), request.param)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(str(path)).eval()
    return request.param, path, vlm.load(path), hf_processor(path), hf


def video(seed, frames=3, size=(50, 30)):
    """``frames`` random RGB frames of ``size`` (width, height), ``(F, H, W, 3)`` uint8."""
    return np.random.default_rng(seed).integers(0, 255, (frames, size[1], size[0], 3), dtype=np.uint8)


def turn(n_images, text, n_videos=0):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
             + [{"type": "text", "text": text}]}]


FRAMES = 3  # frames per video (transformers' video processor stacks a batch's videos: one count)
# (width, height) per image of each sample: one image alone (wide: rows unpadded, pooled 3x1 -> ...; tall; about
# square: 2x2 tiles pooled 6x6 -> 4x4), several per sample (one view each, padded to a square), a batch with 1, 2
# and 0 images; and videos (with and without an image beside them)
CASES = {
    "three_aspect_ratios": ([[(150, 40)], [(30, 90)], [(80, 75)]], [0, 0, 0]),
    "several_in_one_sample": ([[(150, 40), (30, 90), (45, 45), (300, 4)]], [0]),
    "batch_different_counts": ([[(80, 33)], [(24, 70), (45, 45)], []], [0, 0, 0]),
    "videos": ([[], [(61, 57)]], [1, 1]),
}


def processor_inputs(processor, case):
    processor.tokenizer.padding_side = "left"
    sizes, n_videos = CASES[case]
    texts, images, videos = [], [], []
    for i, (row, nv) in enumerate(zip(sizes, n_videos)):
        texts.append(processor.apply_chat_template(turn(len(row), "what is it?" * (i + 1), nv),
                                                   add_generation_prompt=True))
        images.append([picture(10 * i + j, s) for j, s in enumerate(row)])
        videos += [video(i + 100, frames=FRAMES)] * nv
    kwargs = {"images": images} if any(images) else {}
    if videos:
        kwargs["videos"] = videos
    return processor(text=texts, padding=True, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_for_its_processor_output(saved, case):
    _, _, model, processor, hf = saved
    inputs = processor_inputs(processor, case)
    with torch.no_grad():
        ref, ours = hf(**inputs).logits, model(**inputs).logits
    keep = inputs["attention_mask"].bool()
    assert (ref - ours).abs()[keep].max().item() <= 1e-4
    # the placeholders the processor wrote are the arrangement's counts: alone or not, and per video
    rows, n_videos = CASES[case]
    expected = sum(model.arrangement.num_tokens(h, w, alone=len(row) == 1) for row in rows for w, h in row)
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == expected
    frames = [FRAMES] * sum(n_videos)
    assert int((inputs["input_ids"] == model.video_token_id).sum()) == sum(model.arrangement.video_tokens(f)
                                                                           for f in frames)


def test_vlm_processor_gives_the_same_ids_and_logits_for_one_image(saved):
    """vlm's processor (Processor.for_model: the anyres layout the arrangement states) gives
    LlavaOnevisionProcessor's input_ids for an image alone in its sample (pooled past the budget), and its pixels
    (every view concatenated, with image_sizes) give transformers' logits."""
    _, _, model, processor, hf = saved
    size = (80, 75)  # 2x2 tiles: 6x6 grid pooled to 4x4
    image = picture(3, size)
    item = processor_for(model)(Sample([Message("user", [ImageRef(0), "what is it?"])], images=[image]),
                                add_generation_prompt=True)
    theirs = processor(text=[processor.apply_chat_template(turn(1, "what is it?"), add_generation_prompt=True)],
                       images=[image], return_tensors="pt")
    assert item["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert item["image_sizes"].tolist() == theirs["image_sizes"].tolist()
    n = model.arrangement.num_views(size[1], size[0])
    assert (item["pixel_values"] - theirs["pixel_values"][0, :n]).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref = hf(**theirs).logits
        got = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
                    image_sizes=item["image_sizes"]).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_vlm_processor_lays_out_a_multi_image_sample_as_onevision(saved):
    """Several images in one sample: vlm's processor lays each out as one view padded to a square (the arrangement's
    ``multi_image_layout``), gives LlavaOnevisionProcessor's ids and pixels and ``batch_num_images``; batched with a
    one-image sample by vlm's collator, the model gives transformers' logits."""
    from vlm.data.collate import PadCollator

    _, _, model, processor, hf = saved
    sizes = [(150, 40), (30, 90), (45, 45)]
    images = [picture(j, s) for j, s in enumerate(sizes)]
    ours = processor_for(model)
    item = ours(Sample([Message("user", [ImageRef(0), ImageRef(1), ImageRef(2), "what is it?"])], images=images),
                add_generation_prompt=True)
    theirs = processor(text=[processor.apply_chat_template(turn(3, "what is it?"), add_generation_prompt=True)],
                       images=[images], return_tensors="pt")
    assert item["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert item["batch_num_images"].tolist() == [3] and item["pixel_values"].shape[0] == 3
    assert (item["pixel_values"] - theirs["pixel_values"][:, 0]).abs().max().item() <= 1e-5
    # a batch: a one-image sample (tiles) beside the three-image one, through vlm's collator
    one = ours(Sample([Message("user", [ImageRef(0), "and this?"])], images=[picture(9, (80, 75))]),
               add_generation_prompt=True)
    batch = PadCollator(model.tokenizer.pad_token_id, padding_side="left")([item, one])
    assert batch["batch_num_images"].tolist() == [3, 1]
    texts = [processor.apply_chat_template(turn(3, "what is it?"), add_generation_prompt=True),
             processor.apply_chat_template(turn(1, "and this?"), add_generation_prompt=True)]
    processor.tokenizer.padding_side = "left"
    ref_inputs = processor(text=texts, images=[images, [picture(9, (80, 75))]], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref_inputs["input_ids"])
    with torch.no_grad():
        ref = hf(**ref_inputs).logits
        got = model(**{k: v for k, v in batch.items() if k not in ("labels", "meta")}).logits
    keep = batch["attention_mask"].bool()
    assert (ref - got).abs()[keep].max().item() <= 1e-4


def test_packed_multi_image_and_single_image_samples_give_their_own_logits(saved):
    """A three-image sample and a one-image sample packed into one row (vlm's PackCollator: batch_num_images [3, 1]
    concatenated in order) give each sample's own logits."""
    from vlm.data.collate import PackCollator

    _, _, model, _, _ = saved
    ours = processor_for(model)
    items = [ours(Sample([Message("user", [ImageRef(0), ImageRef(1), ImageRef(2), "what?"]),
                          Message("assistant", ["shapes"])], images=[picture(j, (40 + 20 * j, 90 - 20 * j))
                                                                      for j in range(3)])),
             ours(Sample([Message("user", [ImageRef(0), "this?"]), Message("assistant", ["one"])],
                         images=[picture(5, (80, 75))]))]
    packed = PackCollator(model.tokenizer.pad_token_id, max_length=4096)(items)
    assert packed["input_ids"].shape[0] == 1 and packed["batch_num_images"].tolist() == [3, 1]
    with torch.no_grad():
        row = model(**{k: v for k, v in packed.items() if k not in ("labels", "meta")}).logits[0]
        start = 0
        for it in items:
            alone = model(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"],
                          image_sizes=it["image_sizes"], batch_num_images=it["batch_num_images"]).logits[0]
            n = it["input_ids"].numel()
            assert (row[start:start + n] - alone).abs().max().item() <= 1e-4
            start += n


def test_vlm_processor_reads_a_video_as_onevision(saved):
    """A video (a frame list) beside an image: vlm's processor resizes every frame to the tower's size (the video
    processor's ``size``, from ``model.video_geometry()``), writes LlavaOnevisionProcessor's ids, its frames equal the
    video processor's, and its item gives transformers' logits; videos of other frame counts are refused, named."""
    from PIL import Image

    from vlm.data.collate import PadCollator
    from vlm.data.sample import Video, VideoRef

    _, _, model, processor, hf = saved
    clip, image = video(100), picture(1, (61, 57))
    ours = processor_for(model)
    sample = Sample([Message("user", [ImageRef(0), VideoRef(0), "what is it?"])], images=[image],
                    videos=[Video([Image.fromarray(f) for f in clip])], id="clip-1")
    item = ours(sample, add_generation_prompt=True)
    theirs = processor(text=[processor.apply_chat_template(turn(1, "what is it?", 1), add_generation_prompt=True)],
                       images=[[image]], videos=[clip], return_tensors="pt")
    assert item["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert item["pixel_values_videos"].shape == theirs["pixel_values_videos"].shape == (1, FRAMES, 3, S, S)
    assert (item["pixel_values_videos"] - theirs["pixel_values_videos"]).abs().max().item() <= 1e-5
    batch = PadCollator(model.tokenizer.pad_token_id)([item])
    with torch.no_grad():
        ref = hf(**theirs).logits
        got = model(**{k: v for k, v in batch.items() if k not in ("labels", "meta")}).logits
    assert (ref - got).abs().max().item() <= 1e-4
    # a batch of videos with other frame counts cannot be stacked: the collator says so
    other = ours(Sample([Message("user", [VideoRef(0), "and?"])], videos=[Video(
        [Image.fromarray(f) for f in video(7, frames=2)])]), add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"cannot batch fixed-size videos of different shapes.*num_frames"):
        PadCollator(model.tokenizer.pad_token_id)([item, other])


def test_round_trip_is_exact_and_the_export_answers_as_model_chat(saved, tmp_path):
    _, _, model, processor, hf = saved
    out = to_hf(model, tmp_path / "out")
    back = LlavaOnevisionForConditionalGeneration.from_pretrained(str(out)).eval()
    theirs, ours = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert back.config.vision_aspect_ratio == ASPECT and back.config.video_token_id == model.video_token_id
    proc = hf_processor(out)
    assert type(proc).__name__ == "LlavaOnevisionProcessor"
    # the exported processor counts what the original does, images and videos alike
    case = processor_inputs(processor, "videos")
    again = processor_inputs(proc, "videos")
    assert torch.equal(case["input_ids"], again["input_ids"])
    assert torch.equal(case["pixel_values_videos"], again["pixel_values_videos"])
    # model.chat (vlm's processor and generate) == plain transformers on the exported directory
    exported = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    image, new = picture(5, (71, 30)), 6
    reply, _ = model.chat(image, "what is it?", max_new_tokens=new)
    inputs = proc(text=[proc.apply_chat_template(turn(1, "what is it?"), add_generation_prompt=True)],
                  images=[image], return_tensors="pt")
    with torch.no_grad():
        ids = exported.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert decode(proc.tokenizer, ids, model.generation["eos_token_id"])[0] == reply
    assert len(reply) > 0
    # a video (a frame list): frames resized to the tower's size on both sides
    from PIL import Image

    from vlm.data.sample import Video

    clip = video(11)
    reply, _ = model.chat(Video([Image.fromarray(f) for f in clip]), "what happens?", max_new_tokens=new)
    inputs = proc(text=[proc.apply_chat_template(turn(0, "what happens?", 1), add_generation_prompt=True)],
                  videos=[clip], return_tensors="pt")
    with torch.no_grad():
        ids = exported.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert decode(proc.tokenizer, ids, model.generation["eos_token_id"])[0] == reply
    # several images in one turn: one view each, on both sides
    pair = [picture(6, (40, 90)), picture(7, (64, 64))]
    reply, _ = model.chat(pair, "which is larger?", max_new_tokens=new)
    inputs = proc(text=[proc.apply_chat_template(turn(2, "which is larger?"), add_generation_prompt=True)],
                  images=[pair], return_tensors="pt")
    with torch.no_grad():
        ids = exported.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert decode(proc.tokenizer, ids, model.generation["eos_token_id"])[0] == reply


def test_generate_with_a_video_equals_transformers(saved):
    """Greedy generation from the processor's output with a video (and an image beside it): vlm's generate gives
    transformers' tokens."""
    _, _, model, processor, hf = saved
    inputs = processor_inputs(processor, "videos")
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None,
                          pad_token_id=processor.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
        ours = model.generate(**inputs, max_new_tokens=5, eos_token_id=None)
    assert ours.tolist() == ref.tolist()


def test_convert_cli_both_ways_and_save_load(saved, tmp_path):
    from vlm.convert import main

    _, path, model, processor, _ = saved
    assert main([str(path), str(tmp_path / "vlm")]) == 0
    assert main([str(tmp_path / "vlm"), str(tmp_path / "hf")]) == 0
    inputs = {**processor_inputs(processor, "several_in_one_sample")}
    videos = processor_inputs(processor, "videos")
    with torch.no_grad():
        ref, ref_videos = model(**inputs).logits, model(**videos).logits
        for d in ("vlm", "hf"):
            loaded = vlm.load(tmp_path / d)
            assert loaded.arrangement.export_config() == model.arrangement.export_config()
            assert loaded.video_token_id == model.video_token_id
            assert torch.equal(loaded(**inputs).logits, ref), d
            assert torch.equal(loaded(**videos).logits, ref_videos), d


def test_llava_ov_0_5b_recipe_has_transformers_parameter_count():
    """The recipe on ``meta``: SigLIP So400m (27 layers, features of the 26th) + mlp + Qwen2-0.5B + image_newline has
    the parameters of transformers' class built from the same config; the released checkpoint's tower has 26 layers
    (one fewer, never run by either); token counts are OneVision's."""
    from tests.test_train_recipes import QWEN2_0_5B, SIGLIP_SO400M, inline

    mc, run = inline("llava_ov_0_5b", SIGLIP_SO400M, QWEN2_0_5B)
    mc["video_token_id"] = QWEN2_0_5B["vocab_size"] - 2  # (as the image token: no resizing on meta)
    assert run.encoder.feature_layer == -2 and run.arrangement.max_tiles == 9
    with torch.device("meta"):
        model = vlm.build(mc)
        vision = {"model_type": "siglip_vision_model", **SIGLIP_SO400M}
        hf = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            vision_config=vision, text_config=QWEN2_0_5B, image_grid_pinpoints=mc["arrangement"]["pinpoints"],
            vision_feature_layer=-2, vision_aspect_ratio="anyres_max_9"))
        released = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            vision_config={**vision, "num_hidden_layers": 26}, text_config=QWEN2_0_5B, vision_feature_layer=-1))
    count = lambda module: sum(p.numel() for p in module.parameters())
    layer = count(hf.model.vision_tower.encoder.layers[-1])
    # So400m 412,987,248 (no pooling head) + Qwen2-0.5B 494,032,768 + projector 1,836,800 + image_newline 896
    assert count(model) == count(hf) == 908_857_712
    assert count(released) == count(hf) - layer == 893_618_208
    assert count(model.arrangement) == hf.model.image_newline.numel() == 896
    arr = model.arrangement
    assert arr.tile_grid == (27, 27) and arr.frame_grid() == (14, 14)
    # a 384 px square: base 729 + its 1x1 pinpoint's 27x27 grid, a newline per row
    assert model.image_token_count(384, 384) == 729 + 27 * 28
    # 1152 px square: 3x3 tiles = 81x81 tokens pooled (ratio sqrt(81*81 / (9*729)) = 1.0 <= 1.1: not pooled)
    assert model.image_token_count(1152, 1152) == 729 + 81 * 82
    # 2304 px square: 6x6 tiles = 162x162 pooled by ratio 2 to 81x81
    assert model.image_token_count(2304, 2304) == 729 + 81 * 82
    assert arr.num_tokens(500, 700, alone=False) == 730 and arr.video_tokens(8) == 8 * 196 + 1


def build_cfg(pinpoints=((S, 2 * S), (2 * S, S)), image_size=S, **arrangement):
    return {"encoder": {"name": "siglip", "image_size": image_size, "patch_size": 14, "hidden_size": 32,
                        "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
            "connector": {"name": "mlp", "depth": 2},
            "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["qwen2"])},
            "arrangement": {"name": "onevision", "pinpoints": [list(p) for p in pinpoints], **arrangement}}


def test_bad_geometry_is_refused_when_composed_or_imported(tmp_path):
    with pytest.raises(ValueError, match=r"onevision: pinpoints \[\[42, 100\]\] are not multiples of the encoder's"):
        vlm.build(build_cfg([[S, 2 * S], [S, 100]]))
    with pytest.raises(ValueError, match=r"onevision: max_tiles=0; expected a tile budget >= 1"):
        vlm.build(build_cfg(max_tiles=0))
    with pytest.raises(ValueError, match=r"onevision: video_pool=0; expected a pooling stride >= 1"):
        vlm.build(build_cfg(video_pool=0))
    with pytest.raises(ValueError, match="onevision arranges the tokens of a tile on its grid"):
        vlm.build({**build_cfg(), "connector": {"name": "resampler", "num_queries": 4, "num_heads": 4}})
    # a transformers directory whose pinpoints do not fit its tower, or whose budget is not anyres_max_N, names the
    # config keys
    save_onevision(tmp_path / "pins", "siglip-qwen2", pinpoints=[[S, 2 * S], [50, S]])
    with pytest.raises(ValueError, match=r"config.json': onevision: pinpoints \[\[50, \d+\]\] are not multiples.*"
                                         r"\(from image_grid_pinpoints=.*vision_aspect_ratio="):
        from_hf(tmp_path / "pins")
    # OneVision's 36 pinpoints, none fitting: the problem comes first and both lists are shortened
    pins = [[S * i, S * j + 2] for i in range(1, 7) for j in range(1, 7)]
    save_onevision(tmp_path / "pins36", "siglip-qwen2", pinpoints=pins)
    with pytest.raises(ValueError) as e:
        from_hf(tmp_path / "pins36")
    msg = str(e.value)
    assert re.search(r"config.json': onevision: pinpoints \[\[\d+, \d+\], .*, \.\.\.\] \(36 of 36\) are not "
                     r"multiples", msg), msg
    assert "image_grid_pinpoints=[" in msg and "(36 in all)" in msg and str(pins[10]) not in msg, msg
    save_onevision(tmp_path / "aspect", "siglip-qwen2", aspect="anyres")
    with pytest.raises(ValueError, match=r"config.json.*vision_aspect_ratio='anyres'; expected 'anyres_max_N'"):
        from_hf(tmp_path / "aspect")


def test_bad_inputs_are_named_before_the_model_runs(saved):
    _, _, model, processor, _ = saved
    inputs = processor_inputs(processor, "videos")
    with torch.no_grad():
        # video frames of another size than the tower's (e.g. resized by another processor)
        small = torch.zeros(1, 3, 3, S - 14, S - 14)
        with pytest.raises(ValueError, match=r"pixel_values_videos of shape \(1, 3, 3, 28, 28\); expected \(videos, "
                                             r"frames, 3, 42, 42\)"):
            model(**{**inputs, "pixel_values_videos": small})
        # frames of a flat (N, 3, S, S) batch without the video axis
        with pytest.raises(ValueError, match=r"pixel_values_videos of shape \(3, 3, 42, 42\); expected \(videos, frames"):
            model(**{**inputs, "pixel_values_videos": inputs["pixel_values_videos"][0]})
        # a video short of frames for the placeholders the processor wrote
        with pytest.raises(ValueError, match=r"video placeholder count mismatch: input_ids hold \d+ video tokens"):
            model(**{**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:, :2]})
        # images per sample that do not add up to the images given
        several = processor_inputs(processor, "several_in_one_sample")
        with pytest.raises(ValueError, match=r"batch_num_images=\[3\] \(images per sample\) adds up to 3 images, but "
                                             r"image_sizes holds 4"):
            model(**{**several, "batch_num_images": torch.tensor([3])})
    # a model whose arrangement takes no videos (LLaVA-NeXT's) refuses fixed-size frames, naming it
    other = vlm.build({**build_cfg(), "arrangement": {"name": "anyres_grid", "pinpoints": [[S, 2 * S]]}})
    with pytest.raises(ValueError, match="fixed-size video frames need an arrangement that takes videos"):
        other(torch.zeros(1, 4, dtype=torch.long), pixel_values_videos=torch.zeros(1, 2, 3, S, S))


def test_export_refuses_what_onevision_cannot_express(tmp_path):
    model = vlm.build(build_cfg(max_tiles=None, video_pool=1))
    with pytest.raises(ValueError, match=r"video_pool.*LLaVA-OneVision has.*max_tiles=null"):
        to_hf(model, tmp_path, format="llava_onevision")
    # LLaVA-NeXT's arrangement is LLaVA-NeXT's format, not OneVision's
    nxt = vlm.build({**build_cfg(), "arrangement": {"name": "anyres_grid", "pinpoints": [[S, 2 * S]]}})
    with pytest.raises(ValueError, match="feature arrangement is 'anyres_grid'; LlavaOnevisionForConditionalGeneration"):
        to_hf(nxt, tmp_path, format="llava_onevision")


def test_onevision_bench_batch_gives_transformers_logits():
    """``vlm.bench``'s ``llava_onevision`` family: rows alternating one image alone and two images sharing a row
    (``batch_num_images``); ours and transformers' class (loaded from ``to_hf``) give the same logits on it."""
    from vlm.bench.models import build_pair, get_family, size

    spec = size(True, None, "llava_onevision")
    ours, theirs = build_pair(spec, torch.device("cpu"), family="llava_onevision")
    b = get_family("llava_onevision").batch(ours, spec, torch.device("cpu"))
    assert b["batch_num_images"].tolist() == [1, 2]
    with torch.no_grad():
        assert (theirs(**b).logits - ours(**b).logits).abs().max().item() <= 1e-4


def test_a_model_built_from_parts_exports_and_answers_as_model_chat(tmp_path):
    """SigLIP + mlp + Qwen2 + the onevision arrangement built by vlm (not imported) and served with vlm's chatml:
    exports as LLaVA-OneVision with its processor and chat template (images and videos); plain transformers answers
    as model.chat for one image, two images and a video."""
    import warnings

    from PIL import Image

    from vlm.data.sample import Video

    torch.manual_seed(2)
    tok = byte_tokenizer("chatml", extra_tokens=["<image>", "<video>"])
    model = vlm.build({**build_cfg(PINPOINTS, max_tiles=2), "encoder": {
        "name": "siglip", "config": {k: v for k, v in VISION["siglip"].items() if k != "model_type"}}},
        tokenizer=tok).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.set_template("chatml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full processor is written
        out = to_hf(model, tmp_path / "out")
    exported = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    proc = hf_processor(out)
    assert type(exported) is LlavaOnevisionForConditionalGeneration and type(proc) is LlavaOnevisionProcessor
    clip = video(4)
    cases = [([picture(0, (90, 40))], [], turn(1, "what?")),
             ([picture(1, (40, 90)), picture(2, (50, 50))], [], turn(2, "which?")),
             ([], [clip], turn(0, "what happens?", 1))]
    for images, videos, conversation in cases:
        media = images or [Video([Image.fromarray(f) for f in clip])]
        reply, _ = model.chat(media if len(media) > 1 else media[0], conversation[0]["content"][-1]["text"],
                              max_new_tokens=5)
        kwargs = {"images": [images]} if images else {"videos": videos}
        inputs = proc(text=[proc.apply_chat_template(conversation, add_generation_prompt=True)], return_tensors="pt",
                      **kwargs)
        with torch.no_grad():
            ids = exported.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        assert decode(proc.tokenizer, ids, model.generation["eos_token_id"])[0] == reply and reply, conversation


def test_export_without_set_template_writes_video_parts(tmp_path):
    """A parts-built OneVision model whose tokenizer template (byte_tokenizer's chatml) has no video branch, exported
    without ``set_template``: the written chat template writes ``<video>`` for a video part (the model's own tokenizer
    unchanged), and plain transformers answers a video question as model.chat does."""
    import warnings

    from PIL import Image

    from vlm.data.sample import Video

    torch.manual_seed(3)
    tok = byte_tokenizer("chatml", extra_tokens=["<image>", "<video>"])
    before = tok.chat_template
    model = vlm.build({**build_cfg(PINPOINTS, max_tiles=2), "encoder": {
        "name": "siglip", "config": {k: v for k, v in VISION["siglip"].items() if k != "model_type"}}},
        tokenizer=tok).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the template is fixed, not left broken
        out = to_hf(model, tmp_path / "out")
    assert model.tokenizer.chat_template == before
    exported = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    proc = hf_processor(out)
    clip = video(4)
    conversation = turn(0, "what happens?", 1)
    reply, _ = model.chat(Video([Image.fromarray(f) for f in clip]), "what happens?", max_new_tokens=5)
    inputs = proc(text=[proc.apply_chat_template(conversation, add_generation_prompt=True)], return_tensors="pt",
                  videos=[clip])
    with torch.no_grad():
        ids = exported.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert reply and decode(proc.tokenizer, ids, model.generation["eos_token_id"])[0] == reply
