"""Every template's Jinja equivalent (``Template.as_jinja``) renders exactly the text ``render`` gives.

That Jinja template is what an exported directory's tokenizer/processor carries, so transformers' and vLLM's
``apply_chat_template`` build the prompts vlm trained on.
"""
from __future__ import annotations

import pytest
from PIL import Image

from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.templates import ImageSlot, build_template
from vlm.data.tokenizer import byte_tokenizer

IMG = Image.new("RGB", (8, 8))
SPECS = [
    "chatml", "llama3",
    {"name": "chatml", "default_system": 'Say "hi"\n\tthen {{ stop }} – ok ✓ 🙂 \\n'},
    {"name": "llama3", "image_start": "<img>", "image_end": "</img>"},
    {"name": "plain"},
    {"name": "plain", "keep_user_text": True, "separator": "\n", "add_bos": True},
    {"name": "plain", "eos": "<|eot_id|>", "image_start": "<img>", "image_end": "</img>"},
    "tokenizer", "auto", {"name": "auto", "fallback": "llama3"},
    "vicuna_v1", {"name": "vicuna_v1", "images_first": False, "default_system": None, "add_bos": False},
    {"name": "vicuna_v1", "image_start": "<img>", "image_end": "</img>", "eos": "<|eot_id|>"},
]


def samples() -> list[Sample]:
    return [
        Sample([Message("user", [ImageRef(0), "\nWhat is this?"]), Message("assistant", ["A red square."])], [IMG]),
        Sample([Message("system", ["Be brief."]), Message("user", [ImageRef(0), "Left ", ImageRef(1), "?"]),
                Message("assistant", ["Two."]), Message("user", ["And 'this' \"one\"?"]),
                Message("assistant", ["None {% raw %}\n"])], [IMG, IMG]),
        Sample([Message("user", ["text only"]), Message("assistant", ["ok"])]),
    ]


def as_text(segments, image_text: str) -> str:
    return "".join(image_text if isinstance(s, ImageSlot) else s.text for s in segments)


def as_messages(sample: Sample) -> list[dict]:
    return [{"role": m.role, "content": [{"type": "image"} if isinstance(p, ImageRef) else {"type": "text", "text": p}
                                         for p in m.parts]} for m in sample.messages]


@pytest.mark.parametrize("spec, tokenizer_template", [  # the "tokenizer" spec needs the tokenizer's chat template
    pytest.param(spec, tt, id=f"{spec}-tok-{tt or 'none'}") for tt in ("chatml", "llama3", None) for spec in SPECS
    if not (spec == "tokenizer" and tt is None)])
def test_jinja_renders_what_the_template_renders(spec, tokenizer_template):
    """(The byte tokenizer's own templates write ``<image>`` for an image part, so that is the image token here.)"""
    tok = byte_tokenizer(tokenizer_template or "chatml")
    if tokenizer_template is None:
        tok.chat_template = None
    template = build_template(spec)
    jinja = template.as_jinja(tok, image_token="<image>")
    assert jinja, f"{spec}: no Jinja equivalent"
    for sample in samples():
        for agp in (False, True):
            s = Sample(sample.messages[:-1], sample.images) if agp else sample
            ours = as_text(template.render(s, tok, add_generation_prompt=agp), template.image_text("<image>"))
            theirs = tok.apply_chat_template(as_messages(s), chat_template=jinja, tokenize=False,
                                             add_generation_prompt=agp)
            assert theirs == ours, (spec, agp)


def test_tokenizer_template_with_image_markers_has_no_jinja_equivalent():
    tok = byte_tokenizer()
    assert build_template({"name": "tokenizer", "image_start": "<img>", "image_end": "</img>"}).as_jinja(
        tok) is None
    assert build_template("tokenizer").as_jinja(tok) == tok.chat_template
