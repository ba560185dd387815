"""An exported LLaVA directory, loaded with plain transformers (AutoProcessor + apply_chat_template +
LlavaForConditionalGeneration.generate), answers exactly as model.chat for a first turn and a second turn with history."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vlm
import vlm.interop
from tests.conftest import TINY_TEXT, TINY_VISION, chat_model
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


# ------------------------------------------------------------------------------------------ a reply that emits pad
Q1, Q2 = "What is in the picture?", "And what colour is it?"


def emit_pad_after(model, triggers) -> int:
    """Make ``model`` answer the pad id right after any token of ``triggers``: their input embeddings point along one
    direction ``u`` (so large that the final hidden state points along it too) and the pad's output row along ``2u``
    (it wins even with tied embeddings, where pad's input embedding moves too). After the pad an untied model goes
    on with other text, as in the issue. Returns the pad id."""
    lm, pad = model.llm.model, model.tokenizer.pad_token_id
    u = torch.randn(lm.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(0))
    u = (u - u.mean()) / (u - u.mean()).norm()  # zero mean: a LayerNorm keeps it
    with torch.no_grad():
        lm.get_input_embeddings().weight[list(triggers)] = 50 * u
        lm.get_output_embeddings().weight[pad] = 100 * u
    return pad


def pad_model(fmt, where):
    """A tiny random model of each export format on the byte tokenizer (chatml), made to emit pad (``emit_pad_after``)
    ``where="later"``: after any byte that the prompts' own text does not hold, so within its first tokens;
    ``"first"``: also after the generation prompt's last token ``\n``, so the reply begins with pad."""
    from tests.test_interop_blip2 import tiny_blip2_vlm
    from vlm.data.tokenizer import byte_tokenizer

    if fmt == "llava":
        model = chat_model(3)
        template = "chatml"
    elif fmt == "blip2":
        model = tiny_blip2_vlm("llama", tokenizer=byte_tokenizer("chatml"))
        template = "chatml"
    else:
        tok = byte_tokenizer("chatml", extra_tokens=["<img>", "</img>", "<IMG_CONTEXT>"])
        torch.manual_seed(0)
        model = vlm.build({"encoder": TINY_VISION["internvit"], "connector": {"name": "pixel_shuffle_mlp"},
                           "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["qwen2"])},  # tied
                           "image_token": "<IMG_CONTEXT>"}, tokenizer=tok)
        template = {"name": "chatml", "image_start": "<img>", "image_end": "</img>"}
    model.set_template(template)
    prompt_bytes = set((Q1 + Q2 + "<|im_start|>system user assistant\n<img></img>").encode())
    emit_pad_after(model, sorted(set(range(256)) - prompt_bytes) + ([ord("\n")] if where == "first" else []))
    return model.eval()


# a tied random LLM echoes its last input token, so the tied InternVL one emits pad only where the reply begins
@pytest.mark.parametrize("fmt, where", [("llava", "later"), ("llava", "first"), ("blip2", "later"),
                                        ("internvl", "first")])
def test_a_reply_that_emits_pad_ends_there_in_vlm_and_served_transformers(tmp_path, fmt, where):
    """One stop rule: the ids of ``generation["eos_token_id"]`` (the pad among them), written to the export's
    generation_config.json; transformers' ``generate`` on the export with no extra arguments gives the same ids as
    ``VLM.generate`` and the same reply as ``model.chat``, over two turns (the issue's input: a reply that begins
    with pad gave ``''`` in vlm and the text after the pad in transformers)."""
    from transformers import AutoModelForImageTextToText

    model = pad_model(fmt, where)
    pad = model.tokenizer.pad_token_id
    assert pad in model.generation["eos_token_id"]
    out = vlm.interop.to_hf(model, tmp_path / fmt)
    served = json.loads((out / "generation_config.json").read_text())
    assert served["eos_token_id"] == model.generation["eos_token_id"]
    hf = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    history, ended_at_pad = None, 0
    for images, q in ((picture(0), Q1), (None, Q2)):
        reply, new_history = model.chat(images, q, history, max_new_tokens=NEW)
        item = prompt_item(processor_for(model), history, images, q)[0]
        ids = item["input_ids"][None]
        ours = model.generate(ids, item["pixel_values"], max_new_tokens=NEW)[0].tolist()
        theirs = hf.generate(input_ids=ids, pixel_values=item["pixel_values"], attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW)[0, ids.shape[1]:].tolist()
        assert theirs == ours
        cut = next((i for i, t in enumerate(theirs) if t in served["eos_token_id"]), len(theirs))
        assert hf_text(model.tokenizer, theirs[:cut]) == reply
        ended_at_pad += theirs[-1] == pad
        raw = model.generate(ids, item["pixel_values"], max_new_tokens=NEW,
                             eos_token_id=[t for t in served["eos_token_id"] if t != pad])[0].tolist()
        assert raw[:len(ours)] == ours and len(raw) > len(ours)  # without pad as a stop it would run on past it
        history = new_history
    assert ended_at_pad == 2, "the fixture model must emit pad in both turns"


def hf_text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


def test_evaluation_stops_where_chat_stops_on_an_imported_directory(tmp_path):
    """A transformers directory whose eos list leaves pad out (transformers never stops there): chat and the
    evaluator (``vlm.eval``'s ``generate_predictions``) both read the model's own stop ids, so they give the same
    reply, run past the pad."""
    from vlm.data.collate import PadCollator
    from vlm.data.sample import ImageRef, Message, Sample
    from vlm.eval.evaluator import generate_predictions

    model = pad_model("llava", "later")
    pad = model.tokenizer.pad_token_id
    out = vlm.interop.to_hf(model, tmp_path / "llava")
    cfg = json.loads((out / "generation_config.json").read_text())
    cfg["eos_token_id"] = [t for t in cfg["eos_token_id"] if t != pad]
    (out / "generation_config.json").write_text(json.dumps(cfg))
    imported = vlm.load(out)
    assert pad not in imported.generation["eos_token_id"]
    reply, _ = imported.chat(picture(0), Q1, max_new_tokens=NEW)
    processor = processor_for(imported)
    sample = Sample([Message("user", [ImageRef(0), Q1]), Message("assistant", ["x"])], [picture(0)])
    preds, _ = generate_predictions(imported, processor, PadCollator(pad, padding_side="left"), [sample], 1, NEW,
                                    torch.device("cpu"), torch.float32)
    assert preds[0] == reply
    assert "<|pad|>" in reply or model.tokenizer.pad_token in reply  # it ran past the pad
