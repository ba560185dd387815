"""An exported directory answers exactly as vlm does with plain transformers and no extra arguments.

The model is trained (a few hundred steps, tiny) so that its greedy reply is ``C<|im_end|>CCCCCC``: it runs past the
end of turn unless something stops it. The tokenizer's eos is ``<|eos|>``, not the template's ``<|im_end|>`` (as
for Qwen tokenizers), so only the template's end of turn stops the reply.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vlm
from tests.conftest import tiny_cfg
from vlm.convert import convert
from vlm.data.image_placement import ImagePlacement
from vlm.data.processor import Processor
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.interop import from_hf
from vlm.eval.evaluator import decode

QUESTION = "Which letter?"
MAX_NEW = 8


def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A vlm directory (``save_pretrained`` after ``set_template("chatml")``) of a model whose raw greedy reply
    runs past ``<|im_end|>``; returns ``(directory, prompt item, reply ids)``."""
    torch.manual_seed(0)
    tok = byte_tokenizer("chatml", eos_token="<|eos|>")
    model = vlm.build(tiny_cfg("clip", "llama"), tokenizer=tok)
    item = Processor.for_model(model, tok, template="chatml")(
        Sample([Message("user", [ImageRef(0), QUESTION])], [image()]), add_generation_prompt=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    c = tok.encode("C", add_special_tokens=False)
    reply = c + [im_end] + c * 6
    ids = torch.cat([item["input_ids"], torch.tensor(reply)])[None]
    labels = ids.clone()
    labels[0, :len(item["input_ids"])] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        opt.zero_grad()
        loss = model(ids, item["pixel_values"], labels=labels).loss
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    raw = model.generate(item["input_ids"][None], item["pixel_values"], max_new_tokens=MAX_NEW, eos_token_id=None)
    assert raw[0].tolist() == reply, "the fixture model must run past the end of turn"
    model.tokenizer = copy.deepcopy(tok)
    model.image_placement = ImagePlacement("before", "", None)  # trained on <image> + question, no separator (as a run records)
    model.set_template("chatml")
    out = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(out)
    return out, item, reply


def vlm_reply(model: vlm.VLM, item: dict) -> tuple[list[int], str]:
    new = model.generate(item["input_ids"][None], item["pixel_values"], max_new_tokens=MAX_NEW)
    return new[0].tolist(), decode(model.tokenizer, new, model.generation["eos_token_id"])[0]


def test_vlm_generate_stops_at_the_templates_end_of_turn(trained):
    directory, item, reply = trained
    model = vlm.load(directory)  # the generation settings survive save_pretrained / vlm.load
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation == {"eos_token_id": [model.tokenizer.eos_token_id, im_end, model.tokenizer.pad_token_id],
                                "pad_token_id": model.tokenizer.pad_token_id,
                                "bos_token_id": model.tokenizer.bos_token_id}
    ids, text = vlm_reply(model, item)
    assert ids == reply[:2] and text == "C"


def test_plain_transformers_answers_as_vlm(trained, tmp_path):
    directory, item, reply = trained
    model = vlm.load(directory)
    ours_ids, ours_text = vlm_reply(model, item)
    out = convert(directory, tmp_path / "hf")

    gen = json.loads((out / "generation_config.json").read_text())
    text_cfg = json.loads((out / "config.json").read_text())["text_config"]
    for cfg in (gen, text_cfg):
        assert cfg["eos_token_id"] == model.generation["eos_token_id"]
        assert cfg["pad_token_id"] == model.tokenizer.pad_token_id
        assert cfg["bos_token_id"] == model.tokenizer.bos_token_id

    processor = AutoProcessor.from_pretrained(str(out))
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=image(), text=prompt, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == item["input_ids"].tolist()  # the same prompt, token for token
    torch.testing.assert_close(batch["pixel_values"], item["pixel_values"], atol=1e-4, rtol=0)
    new = hf.generate(**batch, max_new_tokens=MAX_NEW)[0, batch["input_ids"].shape[1]:].tolist()
    assert new == ours_ids == reply[:2]  # stops at <|im_end|>, as vlm does
    assert processor.decode(new, skip_special_tokens=True) == ours_text == "C"


def test_pipeline_answers_as_vlm(trained, tmp_path):
    from transformers import pipeline

    directory, item, _ = trained
    out = convert(directory, tmp_path / "hf")
    pipe = pipeline("image-text-to-text", model=str(out))
    messages = [{"role": "user", "content": [{"type": "image", "image": image()},
                                             {"type": "text", "text": QUESTION}]}]
    got = pipe(text=messages, max_new_tokens=MAX_NEW, return_full_text=False)
    assert got[0]["generated_text"] == vlm_reply(vlm.load(directory), item)[1] == "C"


def test_import_keeps_the_directory_generation_settings(trained, tmp_path):
    directory, item, reply = trained
    out = convert(directory, tmp_path / "hf")
    back = from_hf(out)
    assert back.generation == vlm.load(directory).generation
    assert vlm_reply(back, item)[0] == reply[:2]
    convert(out, tmp_path / "vlm")  # LLaVA -> vlm directory keeps them too
    assert vlm.load(tmp_path / "vlm").generation == back.generation
    # a LLaVA directory whose generation_config.json says something else: that is what it uses
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 99, "pad_token_id": 98}))
    assert {k: from_hf(out).generation[k] for k in ("eos_token_id", "pad_token_id")} == \
        {"eos_token_id": [99], "pad_token_id": 98}


def test_export_without_template_uses_the_tokenizers_eos(tmp_path):
    tok = byte_tokenizer("llama3")
    model = vlm.build(tiny_cfg("clip", "llama"), tokenizer=tok)
    assert model.generation["eos_token_id"] == [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|pad|>")]
    model.tokenizer = copy.deepcopy(tok)
    model.image_placement = ImagePlacement("before", "", None)  # trained on <image> + question, no separator (as a run records)
    model.set_template("chatml")  # a run that trained chatml on this tokenizer: stops at either, renders chatml
    assert model.generation["eos_token_id"] == [tok.convert_tokens_to_ids(t)
                                                for t in ("<|eot_id|>", "<|im_end|>", "<|pad|>")]
    out = vlm.interop.to_hf(model, tmp_path)
    processor = AutoProcessor.from_pretrained(str(out))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads(Path(out, "generation_config.json").read_text())["eos_token_id"] == \
        model.generation["eos_token_id"]
