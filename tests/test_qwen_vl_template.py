"""The qwen_vl template: the built-in data format qwen_vl and model.chat build the prompt Qwen-VL-Chat was trained
on, byte for byte. The expected strings are written out here from Qwen-VL's public make_context (ChatML, system
"You are a helpful assistant.", each turn "<|im_start|>{role}\\n{text}<|im_end|>" joined by "\\n", the query's
images "Picture N: <img>PATH</img>\\n" from from_list_format); the expected ids are tiktoken's encoding of that
string with each image's path replaced by the 256 <imgpad> positions Qwen-VL overwrites with the image features."""
from __future__ import annotations

import re

import pytest
import tiktoken
import torch
from PIL import Image

from tests.qwen_vl_fixtures import qwen2_reference, qwen_text_state, random_visual_state, train_ranks, write_qwen_vl_dir
from vlm.data.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
from vlm.data.readers import make_reader
from vlm.data.templates import ImageSlot, Text, build_template
from vlm.interop import from_hf

SPAN = 256
Q1 = "What differs between them?"
A1 = "The first has a dog: <ref>the dog</ref><box>(12,40),(388,960)</box>"
Q2 = "框出图中的猫"
A2 = "<ref>猫</ref><box>(500,100),(999,700)</box>"


def qwen_prompt(a: str, b: str, final_answer: str | None) -> str:
    """Qwen-VL-Chat's text for: user [image a, image b, Q1], assistant A1, user Q2 (+ assistant final_answer)."""
    q1 = f"Picture 1: <img>{a}</img>\nPicture 2: <img>{b}</img>\n{Q1}"
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
            f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n")
    return text if final_answer is None else text + f"{final_answer}<|im_end|>\n"


@pytest.fixture(scope="module")
def ranks():
    return train_ranks()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_vl_images")
    paths = []
    for name, color in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (40, 30), color).save(root / name)
        paths.append(str(root / name))
    return paths


@pytest.fixture(scope="module")
def model(tmp_path_factory, ranks):
    path = write_qwen_vl_dir(tmp_path_factory.mktemp("qwen_vl_tpl"), ranks, qwen_text_state(qwen2_reference()),
                             random_visual_state())
    return from_hf(path)


@pytest.fixture(scope="module")
def reference(ranks):
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen-test", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def qwen_ids(reference, text: str) -> list[int]:
    """What Qwen-VL's LLM sees: the text's ids with each <img>..</img> holding 256 image positions."""
    padded = re.sub(r"<img>.*?</img>", "<img>" + "<imgpad>" * SPAN + "</img>", text)
    return reference.encode(padded, allowed_special="all")


def record(a: str, b: str) -> dict:
    return {"id": "two-images", "conversations": [
        {"from": "user", "value": f"Picture 1: <img>{a}</img>\nPicture 2: <img>{b}</img>\n{Q1}"},
        {"from": "assistant", "value": A1}, {"from": "user", "value": Q2}, {"from": "assistant", "value": A2}]}


def rendered_text(segments, sample) -> str:
    return "".join(s.text if isinstance(s, Text) else f"<img>{sample.images[s.index]}</img>" for s in segments
                   if isinstance(s, (Text, ImageSlot)))


def test_data_format_renders_qwen_vl_prompt_byte_for_byte(images, model):
    sample = make_reader("qwen_vl").convert(record(*images))
    template = build_template("qwen_vl")
    segments = template.render(sample, model.tokenizer)
    assert rendered_text(segments, sample) == qwen_prompt(*images, A2)
    assert [s.trainable for s in segments if isinstance(s, Text) and s.trainable] == [True, True]
    assert "".join(s.text for s in segments if isinstance(s, Text) and s.trainable) == A1 + "<|im_end|>" + A2 + \
        "<|im_end|>"


def test_data_format_ids_and_labels(images, model, reference):
    from vlm.data.processor import Processor

    proc = Processor.for_model(model, model.tokenizer, template="qwen_vl")
    item = proc(make_reader("qwen_vl").convert(record(*images)))
    ids = item["input_ids"].tolist()
    assert ids == qwen_ids(reference, qwen_prompt(*images, A2))
    assert ids.count(model.image_token_id) == 2 * SPAN
    labelled = [i for i, label in zip(ids, item["labels"].tolist()) if label != -100]
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labelled == (reference.encode(A1, allowed_special="all") + [im_end]
                        + reference.encode(A2, allowed_special="all") + [im_end])


def test_chat_builds_the_same_prompt(images, model, reference):
    from vlm.inference.chat import image_placement, processor_for, prompt_item

    history = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                            {"type": "text", "text": Q1}]},
               {"role": "assistant", "content": [{"type": "text", "text": A1}]}]
    proc = processor_for(model)
    item, _ = prompt_item(proc, history, None, Q2, placement=image_placement(model, proc))
    assert item["input_ids"].tolist() == qwen_ids(reference, qwen_prompt(*images, None))
    assert item["pixel_values"].shape[0] == 2
    reply, new_history = model.chat(None, Q2, history, max_new_tokens=2)
    assert isinstance(reply, str) and len(new_history) == 4


def test_jinja_template_writes_pictures(model):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: "
                    "<img><imgpad></img>\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_generation_stops_at_im_end(model):
    stops = model.generation["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    assert model.tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


@torch.no_grad()
def test_one_image_turns_are_pictures_too(images, model):
    sample = make_reader("messages").convert({"messages": [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Q"}]}]})
    text = rendered_text(build_template("qwen_vl").render(sample, model.tokenizer, add_generation_prompt=True), sample)
    assert text.endswith(f"<|im_start|>user\nPicture 1: <img>{images[0]}</img>\nQ<|im_end|>\n<|im_start|>assistant\n")
