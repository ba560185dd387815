"""An exported LLaVA directory, loaded with plain transformers (AutoProcessor + apply_chat_template +
LlavaForConditionalGeneration.generate), answers exactly as model.chat for a first turn and a second turn with history."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vlm
import vlm.interop
from tests.conftest import chat_model
from vlm.inference import processor_for
from vlm.inference.chat import image_placement, prompt_item
from vlm.inference.generate import decode

NEW = 10


def picture(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = chat_model(3)
    out = vlm.interop.to_hf(model, tmp_path_factory.mktemp("hf"))
    return model, out


def hf_reply(processor, hf, messages, images, eos):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=images, text=prompt, return_tensors="pt")
    new = hf.generate(**batch, max_new_tokens=NEW, do_sample=False)[:, batch["input_ids"].shape[1]:]
    return decode(processor.tokenizer, new, eos)[0], batch["input_ids"][0].tolist()


def test_two_turns_answer_as_model_chat(exported):
    model, out = exported
    processor = AutoProcessor.from_pretrained(str(out))
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    eos = model.generation["eos_token_id"]
    q1, q2 = "What is in the picture?", "And what colour is it?"
    r1, history = model.chat(picture(0), q1, max_new_tokens=NEW)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]}]
    got1, _ = hf_reply(processor, hf, messages, [picture(0)], eos)
    assert got1 == r1
    assert model.image_token not in r1  # the reply can go back into the history as text
    r2, _ = model.chat(None, q2, history, max_new_tokens=NEW)
    messages += [{"role": "assistant", "content": [{"type": "text", "text": r1}]},
                 {"role": "user", "content": [{"type": "text", "text": q2}]}]
    got2, ids = hf_reply(processor, hf, messages, [picture(0)], eos)
    ours = prompt_item(processor_for(model), history, None, q2, placement=image_placement(model))[0]
    assert ids == ours["input_ids"].tolist()  # the second-turn prompt, token for token
    assert got2 == r2


def test_chat_cli_and_eval_open_the_exported_directory(exported, capsys):
    """vlm.chat / vlm.eval take a transformers LLaVA directory as MODEL_DIR (imported on the fly)."""
    from vlm.chat import main
    from vlm.inference.load import open_model

    model, out = exported
    path = out / "picture.png"
    picture(1).save(path)
    opened = open_model(out)
    assert opened.model.chat(str(path), "Hi?", max_new_tokens=NEW)[0] == model.chat(str(path), "Hi?",
                                                                                      max_new_tokens=NEW)[0]
    assert main([str(out), "--image", str(path), "--prompt", "Hi?", "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == model.chat(str(path), "Hi?", max_new_tokens=NEW)[0] + "\n"
