"""InternVL directories as transformers' converted checkpoints write them: the chat template writes each image as the
bare context token (``<IMG_CONTEXT>`` + newline) and ``InternVLProcessor`` expands it to ``<img>`` + tokens +
``</img>``. ``model.chat`` on the imported model builds the prompt transformers builds and answers as transformers'
``generate`` does, for every image placement the template allows, with and without tiles; import then export keeps
the processor; vlm's own templates (``<img><IMG_CONTEXT></img>``) keep working, chat included."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
)
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

import vlm
from tests.conftest import TINY_TEXT, TINY_VISION
from vlm.data.processor import Processor
from vlm.data.templates import build_template
from vlm.data.templates.jinja import image_rendering
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference import processor_for
from vlm.inference.chat import image_placement, prompt_item
from vlm.inference.generate import decode
from vlm.interop import from_hf, to_hf

NEW = 6
TOKENS_PER_TILE = 4  # 32 px tiles, 8 px patches, pixel shuffle 0.5
CTX = "<IMG_CONTEXT>"
NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": CTX,
         "video_token": "<video>"}


def converted_template(image_text: str = CTX + "\n") -> str:
    """A chat template rendering as transformers' converted InternVL checkpoints do (ChatML turns; a list content's
    image part as ``image_text``, its video part as ``<video>`` + newline, text parts as they are)."""
    return ("{%- for m in messages -%}"
            "{{- '<|im_start|>' ~ m['role'] ~ '\\n' -}}"
            "{%- if m['content'] is string -%}{{- m['content'] -}}"
            "{%- else -%}{%- for part in m['content'] -%}"
            "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
            "{%- elif part['type'] == 'image' -%}{{- " + json.dumps(image_text) + " -}}"
            "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
            "{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{- '<|im_end|>\\n' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


#: ``(crop_to_patches, max_patches)`` of the image processor -> tiles of a 70 x 40 picture
TILINGS = {"one-tile": ((False, 1), 1), "tiles": ((True, 4), 3)}


def save_converted(path, tiling=(True, 4), template: str | None = None, seed: int = 0, image_seq_length=None):
    """A tiny random ``InternVLForConditionalGeneration`` saved with a real ``InternVLProcessor``: a byte tokenizer
    holding ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` (named as the processor reads them), ``GotOcr2ImageProcessor``
    (``tiling`` = ``(crop_to_patches, max_patches)``: InternVL's dynamic tiles + thumbnail) and ``template``
    (default: the converted checkpoints')."""
    template = template or converted_template()
    path.mkdir(parents=True, exist_ok=True)
    byte_tokenizer(template, extra_tokens=(CTX, "<video>"), eos_token="<|im_end|>").save_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path), extra_special_tokens=NAMED)
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": 32, "patch_size": 8}
    text = {**copy.deepcopy(TINY_TEXT["qwen2"]), "vocab_size": len(tok),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tok.pad_token_id}
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                         image_seq_length=TOKENS_PER_TILE)
    torch.manual_seed(seed)
    hf = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)  # wide enough that replies depend on the prompt
    hf.generation_config.eos_token_id = text["eos_token_id"]
    hf.save_pretrained(str(path))
    crop, most = tiling
    image_processor = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=crop, min_patches=1,
                                            max_patches=most, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=InternVLVideoProcessor(),
                      image_seq_length=image_seq_length or TOKENS_PER_TILE,
                      chat_template=template).save_pretrained(str(path))
    return path


def picture(seed, size=(40, 70)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def hf_pipeline(path):
    """transformers' own pipeline for the directory: its ``InternVLProcessor`` (PIL backend: vlm's pixels exactly)
    and ``InternVLForConditionalGeneration``."""
    processor = AutoProcessor.from_pretrained(str(path))
    processor.image_processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    return processor, InternVLForConditionalGeneration.from_pretrained(str(path)).eval()


def user(*parts):
    """A user message; a ``PIL.Image`` part is an image, a ``str`` part text."""
    return {"role": "user", "content": [{"type": "image", "image": p} if isinstance(p, Image.Image)
                                        else {"type": "text", "text": p} for p in parts]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def hf_answer(processor, hf, messages, eos):
    """``(reply, prompt ids, batch)`` of transformers: ``apply_chat_template`` + the processor + greedy ``generate``."""
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    bare = [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages]
    prompt = processor.apply_chat_template(bare, add_generation_prompt=True)
    batch = processor(images=images or None, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=NEW, do_sample=False)
    return decode(processor.tokenizer, out[:, batch["input_ids"].shape[1]:], eos)[0], batch


def conversations():
    """``(name, history, images of the new turn, its text)``: every placement the template allows."""
    a, b, c = picture(0), picture(1, (64, 40)), picture(2, (32, 32))
    return [
        ("one image", [], a, "what is it"),
        ("two images in one turn", [], [a, b], "compare them"),
        ("a new image in a later turn", [user(a, "first"), assistant("one")], b, "and this"),
        ("an image after text", [user("look at", c), assistant("ok")], None, "and now"),
        ("a text-only turn after images in several turns",
         [user(a, b, "both"), assistant("two"), user(c, "then"), assistant("three")], None, "which was first"),
    ]


@pytest.mark.parametrize("tiling", list(TILINGS))
def test_chat_equals_transformers_for_every_placement(tmp_path, tiling):
    path = save_converted(tmp_path / "hf", TILINGS[tiling][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the template is understood: no warning
        model = from_hf(path)
    processor, hf = hf_pipeline(path)
    eos = model.generation["eos_token_id"]
    replies = []
    for name, history, images, text in conversations():
        reply, new_history = model.chat(images, text, history, max_new_tokens=NEW)
        ours = prompt_item(processor_for(model), history, images, text)[0]
        theirs, batch = hf_answer(processor, hf, new_history[:-1], eos)
        assert ours["input_ids"].tolist() == batch["input_ids"][0].tolist(), name  # the prompt, token for token
        if ours["pixel_values"] is not None:
            assert ours["pixel_values"].shape == batch["pixel_values"].shape, name
            assert (ours["pixel_values"] - batch["pixel_values"]).abs().max().item() <= 1e-5, name
        with torch.no_grad():
            a = model(ours["input_ids"][None], ours["pixel_values"]).logits
            b = hf(**batch).logits
        assert (a - b).abs().max().item() <= 1e-4, name
        assert reply == theirs, name
        replies.append(reply)
    assert len(set(replies)) > 1  # replies depend on the prompt: the comparison says something
    # a 70 x 40 picture is one tile, or a 2x1 grid + thumbnail (as transformers' processor cut it: same prompt ids)
    assert prompt_item(processor_for(model), [], picture(0), "q")[0]["meta"]["tiles"] == [TILINGS[tiling][1]]


def test_the_processor_tiles_whatever_crop_to_patches_says(tmp_path):
    """InternVLProcessor passes ``crop_to_patches=True`` on every call: a directory whose image processor says
    ``crop_to_patches=false`` still tiles (up to ``max_patches``), and so does the imported model."""
    path = save_converted(tmp_path / "hf", (False, 4))
    model = from_hf(path)
    assert model.image_preprocessing["tiling"] == {"kind": "dynamic", "min_tiles": 1, "max_tiles": 4,
                                                   "thumbnail": True}
    processor, _ = hf_pipeline(path)
    ours = prompt_item(processor_for(model), [], picture(0), "q")[0]
    theirs = processor(images=[picture(0)], text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
        add_generation_prompt=True), return_tensors="pt")
    assert ours["meta"]["tiles"] == [3] and ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()


def test_import_then_export_keeps_the_processor(tmp_path):
    src = save_converted(tmp_path / "hf")
    model = from_hf(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full InternVLProcessor is written
        to_hf(model, tmp_path / "out")
    processor = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    assert type(processor).__name__ == "InternVLProcessor"
    assert processor.image_seq_length == TOKENS_PER_TILE  # not transformers' fallback of 256
    assert (processor.image_token, processor.start_image_token, processor.end_image_token) == (CTX, "<img>", "</img>")
    ip = processor.image_processor
    assert (ip.crop_to_patches, ip.min_patches, ip.max_patches) == (True, 1, 4)
    # the template comes back as the directory had it, and renders every placement as the source's processor does
    assert processor.chat_template == AutoProcessor.from_pretrained(str(src)).chat_template
    # the export answers as the source in transformers; in vlm, imported again, saved and loaded, it chats the same
    from_hf(tmp_path / "out").save_pretrained(tmp_path / "ours")
    loaded = vlm.load(tmp_path / "ours")
    src_processor, _ = hf_pipeline(src)
    out_processor, out_hf = hf_pipeline(tmp_path / "out")
    eos = model.generation["eos_token_id"]
    for name, history, images, text in conversations():
        reply, messages = model.chat(images, text, history, max_new_tokens=NEW)
        assert loaded.chat(images, text, history, max_new_tokens=NEW)[0] == reply, name
        assert hf_answer(out_processor, out_hf, messages[:-1], eos)[0] == reply, name
        source = src_processor.apply_chat_template(messages[:-1], add_generation_prompt=True)
        assert out_processor.apply_chat_template(messages[:-1], add_generation_prompt=True) == source, name


def test_vlm_templates_with_image_markers_chat_as_trained_and_export(tmp_path):
    """The other direction: a vlm model trained with ``<img>``/``</img>`` markers chats with the markers (the
    template writes ``<img><IMG_CONTEXT></img>``; chat used to drop them) and exports an ``InternVLProcessor``."""
    tok = byte_tokenizer("chatml", extra_tokens=(CTX,))
    template = {"name": "chatml", "image_start": "<img>", "image_end": "</img>"}
    torch.manual_seed(0)
    text = {**copy.deepcopy(TINY_TEXT["qwen2"]), "vocab_size": len(tok)}
    model = vlm.build({"encoder": TINY_VISION["internvit"], "connector": {"name": "pixel_shuffle_mlp"},
                       "llm": {"name": "hf_causal_lm", "config": text}, "image_token": CTX}, tokenizer=tok).eval()
    model.set_template(template)
    # the markers, then the model's image placement (none recorded: each image followed by a newline)
    assert model.image_placement.separator == "\n"
    assert image_rendering(model.tokenizer, model.tokenizer.chat_template, CTX) == f"<img>{CTX}</img>\n"
    trained = Processor.for_model(model, model.tokenizer, template)
    for name, history, images, text in conversations():
        placement = image_placement(model)  # as model.chat joins a turn's parts
        ours = prompt_item(processor_for(model), history, images, text, placement=placement)[0]
        want = prompt_item(trained, history, images, text, placement=placement)[0]
        assert ours["input_ids"].tolist() == want["input_ids"].tolist(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_hf(model, tmp_path / "out")
    processor, hf = hf_pipeline(tmp_path / "out")
    eos = model.generation["eos_token_id"]
    for name, history, images, text in conversations():
        reply, messages = model.chat(images, text, history, max_new_tokens=NEW)
        theirs, batch = hf_answer(processor, hf, messages[:-1], eos)
        assert batch["input_ids"][0].tolist() == prompt_item(trained, history, images, text, placement=image_placement(model))[0]["input_ids"].tolist()
        assert theirs == reply, name


def test_how_a_template_writes_an_image_is_read_by_rendering_it():
    tok = byte_tokenizer("chatml", extra_tokens=(CTX,))
    assert image_rendering(tok, converted_template(), CTX) == CTX + "\n"
    marked = build_template({"name": "chatml", "image_start": "<img>", "image_end": "</img>"})
    assert image_rendering(tok, marked.as_jinja(tok, CTX), CTX) == f"<img>{CTX}</img>"
    assert image_rendering(tok, build_template("vicuna_v1").as_jinja(tok, CTX), CTX) == CTX + "\n"
    # a text-only template prints the list itself; a template writing another token; one rejecting list content
    assert image_rendering(tok, "{% for m in messages %}{{ m['content'] }}{% endfor %}", CTX) is None
    assert image_rendering(tok, converted_template("<image>\n"), CTX) is None
    assert image_rendering(tok, "{{ messages[0]['content'] + '' }}", CTX) is None


def test_directories_the_import_cannot_read_say_so(tmp_path):
    """A template that writes no context token per image (an older conversion wrote ``<image>``): the import warns
    that transformers' processor finds no place for the image; the model still imports."""
    path = save_converted(tmp_path / "hf", template=converted_template("<image>\n"))
    with pytest.warns(UserWarning, match=r"writes no <IMG_CONTEXT> for an image part"):
        model = from_hf(path)
    assert model.tokenizer.chat_template == converted_template("<image>\n")


def test_an_export_whose_template_lacks_the_markers_says_why(tmp_path):
    """A vlm model whose template writes the bare context token (no markers) is not what InternVLProcessor serves
    (it adds ``<img>``/``</img>``): the export writes no processor and says why."""
    tok = byte_tokenizer("chatml", extra_tokens=(CTX,))
    text = {**copy.deepcopy(TINY_TEXT["qwen2"]), "vocab_size": len(tok)}
    model = vlm.build({"encoder": TINY_VISION["internvit"], "connector": {"name": "pixel_shuffle_mlp"},
                       "llm": {"name": "hf_causal_lm", "config": text}, "image_token": CTX}, tokenizer=tok).eval()
    model.set_template("chatml")
    with pytest.warns(UserWarning, match=r"no InternVLProcessor written.*writes an image as '<IMG_CONTEXT>.*', "
                                         r"without <img>/</img>"):
        to_hf(model, tmp_path / "out")


@pytest.mark.parametrize("spec", ["auto", {"name": "auto", "image_start": "<img>", "image_end": "</img>"}],
                         ids=["template-writes-markers", "processor-adds-markers"])
def test_markers_are_written_once(spec):
    """The template writes ``<img><IMG_CONTEXT></img>`` (read as list content), or the processor adds configured
    markers around the image (the template read as string content): never both."""
    from vlm.data.sample import ImageRef, Message, Sample
    from vlm.data.templates import ImageSlot, Text

    tok = byte_tokenizer("chatml", extra_tokens=(CTX,))
    marked = build_template({"name": "chatml", "image_start": "<img>", "image_end": "</img>"})
    tok.chat_template = marked.as_jinja(tok, CTX)
    template = build_template(spec).for_image_token(CTX)
    sample = Sample([Message("user", [ImageRef(0), "hi"])], images=[picture(0)])
    segments = template.render(sample, tok, add_generation_prompt=True)
    text = "".join(s.text if isinstance(s, Text) else "|" for s in segments)
    assert sum(isinstance(s, ImageSlot) for s in segments) == 1
    assert text.count("<img>") + (template.image_start == "<img>") == 1
    assert text.count("</img>") + (template.image_end == "</img>") == 1
