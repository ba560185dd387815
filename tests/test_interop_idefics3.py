"""Idefics3 / SmolVLM interop against transformers' own classes (tiny random models saved to tmp_path, no downloads):
``vlm.load`` of an ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` directory gives the
class's logits for what its processor returns, whole (``pixel_values (B, N, 3, S, S)``, ``pixel_attention_mask``),
for images of three aspect ratios, several images in one sample and a batch with different image counts; vlm's own
processor (the ``idefics3`` layout) gives the same ids and pixels; from_hf -> to_hf is exact; the exported directory
answers ``model.chat`` exactly under plain transformers; ``python -m vlm.convert`` both ways; bad geometry is named."""
import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

import vlm
from tests.conftest import TINY_TEXT, picture, user
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference.chat import processor_for
from vlm.inference.generate import decode
from vlm.interop import from_hf, to_hf

#: SmolVLM's chat template's shape (``User:`` turns, ``<end_of_utterance>``), each image written as ``<image>``
TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>"
            "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
S = 32  # crop size: 32 px, patch 8 -> a 4x4 grid, scale_factor 2 -> 4 tokens per view
EDGE = 96  # longest_edge: images become up to 3x3 crops
FAMILIES = {
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor, SmolVLMImageProcessorPil),
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3ImageProcessorPil),
}
TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
          *[f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]]


def has_num2words():
    """transformers' ``SmolVLMProcessor`` needs the ``num2words`` package (not a vlm dependency); without it SmolVLM's
    prompts come from ``Idefics3Processor``, which writes the same text (``_prompt_split_image``)."""
    import importlib.util

    return importlib.util.find_spec("num2words") is not None


def family_processor(family, path):
    """The family's transformers processor for ``path`` (PIL backend)."""
    if family == "idefics3" or has_num2words():
        # the PIL image processor given whole: SmolVLM's video processor has no PIL backend (backend="pil" fails)
        return AutoProcessor.from_pretrained(str(path), image_processor=FAMILIES[family][3].from_pretrained(str(path)))
    from transformers import AutoTokenizer

    ip = SmolVLMImageProcessorPil.from_pretrained(str(path))
    return Idefics3Processor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(str(path)),
                             image_seq_len=(S // 8 // 2) ** 2, chat_template=TEMPLATE)


def tokenizer():
    return byte_tokenizer(TEMPLATE, extra_tokens=["<|im_start|>", *TOKENS], eos_token="<end_of_utterance>")


def vision(scale_factor=2, image_size=S):
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": image_size, "patch_size": 8}


def save_family(path, family, seed=0, scale_factor=2, max_image_size=S):
    """A tiny random model of ``family`` (every tensor randomized) + its processor, in ``path``."""
    config_cls, model_cls, processor_cls, ip_cls = FAMILIES[family]
    tok = tokenizer()
    text_cfg = {**copy.deepcopy(TINY_TEXT["llama"]), "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id}
    cfg = config_cls(vision_config=vision(), text_config=text_cfg, scale_factor=scale_factor,
                     image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.pad_token_id = tok.pad_token_id
    hf.save_pretrained(str(path))
    ip = ip_cls(size={"longest_edge": EDGE}, max_image_size={"longest_edge": max_image_size})
    seq = (S // 8 // scale_factor) ** 2
    if family == "smolvlm" and not has_num2words():
        ip.save_pretrained(str(path))
        tok.save_pretrained(str(path))
        return path
    extra = {"video_processor": SmolVLMVideoProcessor()} if family == "smolvlm" else {}
    processor_cls(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=TEMPLATE,
                  **extra).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    family = request.param
    path = save_family(tmp_path_factory.mktemp(family), family)
    hf = FAMILIES[family][1].from_pretrained(str(path)).eval()
    return family, path, vlm.load(path), family_processor(family, path), hf


# (width, height) per image: wide, tall, about square (and one smaller than a crop), several per sample; a batch with
# 1, 2 and 0 images
CASES = {
    "three_aspect_ratios": [[(150, 40)], [(30, 90)], [(61, 57)]],
    "several_in_one_sample": [[(150, 40), (30, 90), (20, 14), (70, 35)]],
    "batch_different_counts": [[(80, 33)], [(24, 70), (45, 45)], []],
}


def processor_inputs(processor, case):
    processor.tokenizer.padding_side = "left"
    texts, images = [], []
    for i, sizes in enumerate(CASES[case]):
        texts.append(processor.apply_chat_template(user(len(sizes), "what is it?" * (i + 1)),
                                                   add_generation_prompt=True))
        images.append([picture(10 * i + j, s) for j, s in enumerate(sizes)])  # per sample (SmolVLM's processor)
    return processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_for_its_processor_output(saved, case):
    _, _, model, processor, hf = saved
    inputs = processor_inputs(processor, case)
    assert inputs["pixel_values"].ndim == 5 and "pixel_attention_mask" in inputs
    with torch.no_grad():
        ref, ours = hf(**inputs).logits, model(**inputs).logits
    keep = inputs["attention_mask"].bool()
    assert (ref - ours).abs()[keep].max().item() <= 1e-4
    # the placeholders the processor wrote are the layout's views x the model's tokens per view
    layout = processor_for(model).image_processor.layout
    sizes = [s for row in CASES[case] for s in row]
    expected = sum(layout.num_views(w, h) for w, h in sizes) * model.num_image_tokens()
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == expected


def test_vlm_processor_gives_the_same_ids_and_pixels(saved):
    """vlm's processor (Processor.for_model: the idefics3 layout recorded at import) writes the family's prompt
    (``<fake_token_around_image>``, ``<row_r_col_c>``, ``\\n``, ``<global-img>``) and pixels, for three images in one
    sample: wide (1 x 3 crops at longest edge 96 px), tall (3 x 1) and one smaller than a crop (scaled up to 3 x 3)."""
    _, _, model, processor, hf = saved
    sizes = [(150, 40), (30, 90), (20, 14)]
    images = [picture(j, s) for j, s in enumerate(sizes)]
    ours = processor_for(model)
    item = ours(Sample([Message("user", [ImageRef(0), ImageRef(1), ImageRef(2), "what is it?"])], images=images),
                add_generation_prompt=True)
    text = processor.apply_chat_template(user(3, "what is it?"), add_generation_prompt=True)
    theirs = processor(text=[text], images=images, return_tensors="pt")
    assert item["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    real = theirs["pixel_values"][0][theirs["pixel_attention_mask"][0].flatten(1).any(1).bool()]
    assert item["pixel_values"].shape == real.shape
    assert (item["pixel_values"] - real).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref = hf(**theirs).logits
        got = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"]).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_single_view_images_without_splitting(saved, tmp_path):
    """``do_image_splitting=False`` (and an image no larger than one crop with longest_edge = S): one view, the
    ``<global-img>`` text only; vlm's layout gives the same ids and pixels."""
    import shutil

    family, path, _, _, _ = saved
    shutil.copytree(path, tmp_path / "nosplit")
    file = tmp_path / "nosplit" / "processor_config.json"  # transformers 5 nests the image processor's config
    if file.is_file():
        cfg = json.loads(file.read_text())
        cfg["image_processor"]["do_image_splitting"] = False
    else:
        file = tmp_path / "nosplit" / "preprocessor_config.json"
        cfg = {**json.loads(file.read_text()), "do_image_splitting": False}
    file.write_text(json.dumps(cfg))
    model = vlm.load(tmp_path / "nosplit")
    assert model.image_preprocessing["tiling"]["split"] is False
    processor = family_processor(family, tmp_path / "nosplit")
    images = [picture(3, (150, 40))]
    text = processor.apply_chat_template(user(1, "hi"), add_generation_prompt=True)
    theirs = processor(text=[text], images=images, return_tensors="pt")
    item = processor_for(model)(Sample([Message("user", [ImageRef(0), "hi"])], images=images),
                                add_generation_prompt=True)
    assert item["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert item["pixel_values"].shape[0] == 1
    assert (item["pixel_values"] - theirs["pixel_values"][0]).abs().max().item() <= 1e-5


def test_round_trip_is_exact_and_the_export_answers_as_model_chat(saved, tmp_path):
    family, _, model, _, hf = saved
    model_cls, processor_cls = FAMILIES[family][1], FAMILIES[family][2]
    out = to_hf(model, tmp_path / "out", format=family)
    back = model_cls.from_pretrained(str(out)).eval()
    theirs, ours = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    if family == "idefics3" or has_num2words():
        assert type(AutoProcessor.from_pretrained(str(out))).__name__ == processor_cls.__name__
    # model.chat (vlm's processor and generate) == plain transformers on the exported directory
    exported = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    assert type(exported) is model_cls
    proc = family_processor(family, out)
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

    family, path, model, processor, _ = saved
    assert main([str(path), str(tmp_path / "vlm")]) == 0
    assert main([str(tmp_path / "vlm"), str(tmp_path / "hf"), "--format", family]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    inputs = processor_inputs(processor, "several_in_one_sample")
    with torch.no_grad():
        ref = model(**inputs).logits
        for d in ("vlm", "hf"):
            loaded = vlm.load(tmp_path / d)
            assert loaded.image_preprocessing["tiling"] == model.image_preprocessing["tiling"]
            assert torch.equal(loaded(**inputs).logits, ref), d


def test_convert_keeps_the_source_format_and_refuses_format_on_import(saved, tmp_path, capsys):
    """smolvlm (or idefics3) -> vlm -> (no --format) -> the same format: the import records ``source_format`` in the
    vlm config.json and the export prefers it; ``--format`` naming another format on an import is refused, an
    unknown one is a plain message listing the formats (no KeyError quotes)."""
    from vlm.convert import main
    from vlm.interop import FORMATS

    family, path, _, _, _ = saved
    other = "idefics3" if family == "smolvlm" else "smolvlm"
    assert main([str(path), str(tmp_path / "bad"), "--format", other]) == 1
    err = capsys.readouterr().err
    assert f"--format '{other}'" in err and "export (vlm -> transformers) only" in err and f"'{family}'" in err
    assert not (tmp_path / "bad").exists()
    assert main([str(path), str(tmp_path / "vlm"), "--format", family]) == 0  # its own format: accepted
    assert json.loads((tmp_path / "vlm" / "config.json").read_text())["source_format"] == family
    assert vlm.load(tmp_path / "vlm").source_format == family
    assert main([str(tmp_path / "vlm"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    assert main([str(tmp_path / "vlm"), str(tmp_path / "hf2"), "--format", other]) == 0  # --format still wins
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["model_type"] == other
    assert main([str(tmp_path / "vlm"), str(tmp_path / "hf3"), "--format", "bogus"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlm.convert: error: to_hf: unknown format 'bogus'") and not err.endswith('"')
    assert all(n in err for n in FORMATS.names())


def test_bad_geometry_is_named(tmp_path):
    # a scale_factor that does not divide the 4x4 patch grid
    save_family(tmp_path / "sf", "idefics3", scale_factor=3)
    with pytest.raises(ValueError, match=r"scale_factor=3 does not divide the 4x4 patch grid"):
        from_hf(tmp_path / "sf")
    # crops of another size than the tower's
    save_family(tmp_path / "crop", "smolvlm", max_image_size=48)  # (its image processor's config)
    with pytest.raises(ValueError, match=r"max_image_size.longest_edge=48, but the tower takes 32 px crops"):
        from_hf(tmp_path / "crop")


def test_a_partial_pixel_mask_is_refused(saved):
    _, _, model, processor, _ = saved
    inputs = processor_inputs(processor, "three_aspect_ratios")
    inputs["pixel_attention_mask"][0, 0, :, -1] = 0
    with pytest.raises(ValueError, match=r"covers only part of view 0 of sample 0"):
        model(**inputs)


def test_a_video_is_refused_naming_what_the_model_takes(saved, tmp_path):
    """Idefics3 / SmolVLM take no video input: ``model.chat`` with a video names the model's parts and says to give
    the frames as images (not the old rule that only native-resolution encoders take videos)."""
    from vlm.data.readers.base import SampleError

    _, _, model, _, _ = saved
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)  # never decoded: refused before
    with pytest.raises(SampleError, match=r"this model \(encoder 'idefics3_vision'.*\) takes no video input, only "
                                          r"images.*give the video's frames as images") as e:
        model.chat({"type": "video", "video": str(clip)}, "hi")
    assert "native_resolution" not in str(e.value)
