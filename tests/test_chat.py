"""model.chat / chat_batch / chat_stream and batched generation (vlm.inference)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import chat_model
from vlm.data.collate import PadCollator
from vlm.data.processor import Processor
from vlm.data.sample import ImageRef, Message, Sample
from vlm.inference import generate_replies, processor_for
from vlm.inference.chat import image_placement, prompt_item
from vlm.eval.evaluator import generate_predictions

NEW = 12


def picture(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return chat_model()


@pytest.fixture(scope="module")
def processor(model):
    return Processor.for_model(model, model.tokenizer, template="chatml")


def full_forward_greedy(model, item, n):
    """Greedy decoding by re-running the whole forward pass on prompt + reply so far (no cache)."""
    ids = item["input_ids"][None]
    for _ in range(n):
        nxt = model(ids, item["pixel_values"]).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[0, item["input_ids"].numel():].tolist()


def test_cached_and_uncached_greedy_generation_agree(model, processor):
    item = processor(Sample([Message("user", [ImageRef(0), "What is it?"])], [picture(0)]), add_generation_prompt=True)
    cached = model.generate(item["input_ids"][None], item["pixel_values"], max_new_tokens=NEW, eos_token_id=None)
    uncached = model.generate(item["input_ids"][None], item["pixel_values"], max_new_tokens=NEW, eos_token_id=None,
                              use_cache=False)
    assert cached[0].tolist() == uncached[0].tolist() == full_forward_greedy(model, item, NEW)


def test_chat_builds_the_training_prompt_and_answers_as_evaluation(model, processor):
    """The "auto" template (the directory's Jinja) gives the training template's ids for a sample written as the
    model's image placement says (the default: the image, then "\n", then the question, as LLaVA data writes it); the
    reply equals what training's evaluation predicts for the same sample."""
    sample = Sample([Message("user", [ImageRef(0), "\nDescribe."]), Message("assistant", ["x"])], [picture(1)])
    reply, history = model.chat(picture(1), "Describe.", max_new_tokens=NEW)
    chat_item = prompt_item(processor_for(model), None, picture(1), "Describe.", placement=image_placement(model))[0]
    assert chat_item["input_ids"].tolist() == processor(sample, add_generation_prompt=True)["input_ids"].tolist()
    preds, _ = generate_predictions(model, processor, PadCollator(model.tokenizer.pad_token_id, padding_side="left"),
                                    [sample], 1, NEW, torch.device("cpu"), torch.float32)
    assert reply == preds[0]
    assert history[-1] == {"role": "assistant", "content": [{"type": "text", "text": reply}]}
    assert history[0]["content"][-1] == {"type": "text", "text": "Describe."}


def test_history_fed_back_equals_the_single_prompt(model, processor):
    r1, h1 = model.chat([picture(2)], "First?", max_new_tokens=NEW)
    r2, h2 = model.chat(picture(3), "And this one?", h1, max_new_tokens=NEW)  # a new image in a later turn
    assert len(h2) == 4 and len(h1) == 2  # h1 was not modified
    whole = Sample([Message("user", [ImageRef(0), "\nFirst?"]), Message("assistant", [r1]),
                    Message("user", [ImageRef(1), "\nAnd this one?"])], [picture(2), picture(3)])
    item = processor(whole, add_generation_prompt=True)
    assert r2 == generate_replies(model, [item], model.tokenizer, max_new_tokens=NEW)[0].text
    r3, h3 = model.chat(None, "Text only.", h2, max_new_tokens=NEW)  # a text-only turn
    assert len(h3) == 6 and isinstance(r3, str)


def test_batched_chat_equals_one_by_one(model):
    images = [picture(4), [picture(5), picture(6)], None]
    texts = ["What colour?", "Compare the two pictures in detail.", "hello"]
    _, h = model.chat(picture(7), "Hi", max_new_tokens=4)
    histories = [None, None, h]
    # a stop id that some rows produce early: each row must stop on its own
    singles = [model.chat(i, t, hh, max_new_tokens=NEW) for i, t, hh in zip(images, texts, histories)]
    batch = model.chat_batch(images, texts, histories, max_new_tokens=NEW)
    assert batch == singles
    stop_tok = model.tokenizer.encode(singles[0][0][2], add_special_tokens=False)[0] if len(singles[0][0]) > 2 else None
    if stop_tok is not None:
        eos = model.generation["eos_token_id"] + [stop_tok]
        singles = [model.chat(i, t, hh, max_new_tokens=NEW, eos_token_id=eos)
                   for i, t, hh in zip(images, texts, histories)]
        assert model.chat_batch(images, texts, histories, max_new_tokens=NEW, eos_token_id=eos) == singles
        assert len(singles[0][0]) <= 2


def test_stop_strings_cut_each_reply(model):
    full, _ = model.chat(picture(8), "Go.", max_new_tokens=NEW)
    assert len(full) > 4
    stop = full[3:5]
    cut, _ = model.chat(picture(8), "Go.", max_new_tokens=NEW, stop=[stop])
    assert cut == full[:full.index(stop)].rstrip()
    with pytest.warns(UserWarning, match="no stop string"):
        same, _ = model.chat(picture(8), "Go.", max_new_tokens=NEW, stop=["never-occurs-\u2603"])
    assert same == full


@pytest.mark.parametrize("stop", [(), ("zz",)])
def test_streaming_yields_the_same_text(model, stop):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, hist = model.chat(picture(9), "Stream it.", max_new_tokens=NEW, stop=stop)
        stream = model.chat_stream(picture(9), "Stream it.", max_new_tokens=NEW, stop=stop)
        pieces = list(stream)
    assert "".join(pieces) == full == stream.reply and len(pieces) > 1
    assert stream.history == hist


def test_sampling_options_are_reproducible_with_a_seed(model):
    torch.manual_seed(1)
    a, _ = model.chat(picture(10), "Q", max_new_tokens=NEW, temperature=1.5, top_p=0.9, top_k=20,
                      repetition_penalty=1.3)
    torch.manual_seed(1)
    b, _ = model.chat(picture(10), "Q", max_new_tokens=NEW, temperature=1.5, top_p=0.9, top_k=20,
                      repetition_penalty=1.3)
    greedy, _ = model.chat(picture(10), "Q", max_new_tokens=NEW)
    assert a == b
    torch.manual_seed(2)
    others = {model.chat(picture(10), "Q", max_new_tokens=NEW, temperature=5.0)[0] for _ in range(3)}
    assert others != {greedy}


def test_bad_input_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="empty prompt"):
        model.chat(picture(0), "   ")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        model.chat(str(bad), "What is it?")
    with pytest.raises(ValueError, match="not found"):
        model.chat(str(tmp_path / "missing.png"), "What is it?")
    with pytest.raises(ValueError, match=r"image path is a directory, not a file") as e:  # not "not found"
        model.chat(str(tmp_path), "What is it?")
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ValueError, match=r"bad image source 42 \(a int\); expected an image file path .*PIL\.Image"
                                         r"\.Image, a numpy array .*a video"):
        model.chat(42, "What is it?")
    limit = model.llm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context window"):
        model.chat(None, "x" * (limit + 5))
