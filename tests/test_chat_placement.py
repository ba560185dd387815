"""Chat builds the prompt the model was trained on: the image placement (``vlm.data.image_placement``) a run reads off its
data and records, used by ``model.chat`` and written into the exported chat template; loaders return eval mode."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from PIL import Image

import vlm
from vlm.data.image_placement import DEFAULT, ImagePlacement, read_placement
from vlm.data.processor import Processor
from vlm.data.sample import ImageRef as I
from vlm.data.sample import Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference.chat import image_placement, processor_for, prompt_item, user_turn
from vlm.train import compose, run


def picture(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- reading placements
@pytest.mark.parametrize("parts, expected", [
    ([I(0), "\nWhat is it?"], ("before", "\n", None)),                      # LLaVA, shapes
    ([I(0), "What is it?"], ("before", "", None)),                          # messages data: parts joined as they are
    ([I(0), " What is it?"], ("before", " ", None)),
    (["What is it?\n", I(0)], ("after", "\n", None)),
    (["Image 1: ", I(0), "\nImage 2: ", I(1), "\nWhich?"], ("before", "\n", "Image {n}: ")),  # shapes, two images
    ([I(0), "\n", I(1), "\nWhich?"], ("before", "\n", "")),
    (["Which?\nImage 1: ", I(0), "\nImage 2: ", I(1)], ("after", "\n", "Image {n}: ")),
    (["Compare ", I(0), " with the sky."], None),                            # an image inside the text: no vote
    ([I(0)], None),                                                           # no text
    (["Just text."], None),
])
def test_read_placement_of_one_message(parts, expected):
    assert read_placement(parts) == expected


def test_infer_takes_the_majority_and_labels_from_several_images():
    one = Sample([Message("user", [I(0), "\nQ?"]), Message("assistant", ["A"])], [picture(0)])
    two = Sample([Message("user", ["Image 1: ", I(0), "\nImage 2: ", I(1), "\nQ?"]), Message("assistant", ["A"])],
                 [picture(0), picture(1)])
    odd = Sample([Message("user", [I(0), "Q?"]), Message("assistant", ["A"])], [picture(0)])
    assert ImagePlacement.infer([one, one, odd, two]) == ImagePlacement("before", "\n", "Image {n}: ")
    assert ImagePlacement.infer([odd, odd, one]) == ImagePlacement("before", "", None)
    assert ImagePlacement.infer([Sample([Message("user", ["hi"]), Message("assistant", ["A"])])]) is None


def test_placement_record_is_checked():
    with pytest.raises(ValueError, match="position"):
        ImagePlacement("middle")
    with pytest.raises(ValueError, match="unknown key.*sep"):
        ImagePlacement.from_dict({"position": "before", "sep": "\n"})
    assert ImagePlacement.from_dict(DEFAULT.to_dict()) == DEFAULT and ImagePlacement.from_dict(None) is None


# ------------------------------------------------------------------------------------ chat == template == data
PLACEMENTS = [DEFAULT, ImagePlacement("before", "", None), ImagePlacement("after", "\n", None),
           ImagePlacement("before", "\n", "Image {n}: "), ImagePlacement("after", " ", "Picture {n}: ")]


@pytest.fixture(scope="module")
def hand_built():
    torch.manual_seed(0)
    return vlm.build(tiny_cfg("clip", "llama"), tokenizer=byte_tokenizer("chatml")).eval()


def data_parts(placement: ImagePlacement, n: int, text: str, first: int = 0) -> list:
    """How a data record with this placement writes ``n`` images (numbered from ``first``) and ``text`` (written by
    hand, not by the placement)."""
    label = [placement.label.replace("{n}", str(k + 1)) if placement.label and n > 1 else "" for k in range(n)]
    if placement.position == "before":
        return [x for k in range(n) for x in (label[k], I(first + k), placement.separator)] + [text]
    return [text] + [x for k in range(n) for x in (placement.separator + label[k], I(first + k))]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda x: x.describe())
@pytest.mark.parametrize("n", [1, 2])
def test_chat_template_and_data_give_the_same_prompt(hand_built, placement, n):
    """For each placement and image count: chat's prompt ids (first and second turn) == the processor's ids for a data
    sample written in that placement == the ids of the exported Jinja template's text (list content, as transformers'
    processors render it), image tokens expanded."""
    model = copy.copy(hand_built)
    model.tokenizer = copy.deepcopy(hand_built.tokenizer)
    model.image_placement = placement
    model.set_template("chatml")
    images = [picture(k) for k in range(n)]
    proc = Processor.for_model(model, model.tokenizer, template="chatml")
    first = Sample([Message("user", [p for p in data_parts(placement, n, "What?") if p != ""])], images)
    chat_item, history = prompt_item(processor_for(model), None, images, "What?", placement=image_placement(model))
    assert chat_item["input_ids"].tolist() == proc(first, add_generation_prompt=True)["input_ids"].tolist()
    history.append({"role": "assistant", "content": [{"type": "text", "text": "Yes."}]})
    second = Sample([*first.messages, Message("assistant", ["Yes."]),
                     Message("user", [p for p in data_parts(placement, 1, "And?", n) if p != ""])],
                    [*images, picture(9)])
    chat_item2, _ = prompt_item(processor_for(model), history, [picture(9)], "And?", placement=image_placement(model))
    assert chat_item2["input_ids"].tolist() == proc(second, add_generation_prompt=True)["input_ids"].tolist()
    # the exported template (tokenizer.chat_template), given transformers-style list content
    listed = [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
              for m in [*history, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And?"}]
                                   if placement.position == "before" else
                                   [{"type": "text", "text": "And?"}, {"type": "image"}]}]]
    text = model.tokenizer.apply_chat_template(listed, tokenize=False, add_generation_prompt=True)
    text = text.replace(model.image_token, model.image_token * model.num_image_tokens())
    assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == chat_item2["input_ids"].tolist()


@pytest.mark.parametrize("template", ["llama3", {"name": "vicuna_v1"}, {"name": "vicuna_v1", "images_first": False},
                                      {"name": "plain", "keep_user_text": True}], ids=str)
@pytest.mark.parametrize("placement", [PLACEMENTS[0], *PLACEMENTS[2:]], ids=lambda x: x.describe())
def test_every_template_renders_chats_prompt(template, placement):
    """Chat with the template itself and chat with the exported Jinja (``auto``), and the Jinja given list content
    (served transformers), agree token for token; a template that moves images itself (``vicuna_v1`` with
    ``images_first``) is not given the placement twice."""
    torch.manual_seed(0)
    tok = byte_tokenizer("vicuna_v1" if isinstance(template, dict) and template["name"] == "vicuna_v1" else
                         "llama3" if template == "llama3" else "chatml")
    model = vlm.build(tiny_cfg("clip", "llama"), tokenizer=tok).eval()
    model.image_placement = placement
    model.set_template(template)
    images = [picture(0), picture(1)]
    own, _ = prompt_item(processor_for(model, template), None, images, "What?",
                               placement=image_placement(model, processor_for(model, template)))
    auto, _ = prompt_item(processor_for(model), None, images, "What?", placement=image_placement(model, processor_for(model)))
    listed = [{"role": "user", "content": [{"type": "image"} if p["type"] == "image" else p
                                           for p in user_turn(images, "What?", placement)["content"]]}]
    text = model.tokenizer.apply_chat_template(listed, tokenize=False, add_generation_prompt=True)
    served = model.tokenizer(text.replace(model.image_token, model.image_token * model.num_image_tokens()),
                             add_special_tokens=False)["input_ids"]
    assert own["input_ids"].tolist() == served
    plain = isinstance(template, dict) and template.get("name") == "plain"  # its Jinja has no generation prompt
    # known limit: chat's `auto` template hands vicuna's Jinja string content, where images_first cannot find the
    # images; it agrees for the placement LLaVA data has (the default), not for labels or images after the text
    moved = isinstance(template, dict) and template.get("images_first", template["name"] == "vicuna_v1")
    if not plain and (not moved or placement == DEFAULT):
        assert auto["input_ids"].tolist() == served


def test_imported_models_leave_placement_to_their_template(hand_built):
    """``image_placement=None`` (a transformers directory's own template places images): nothing is added."""
    model = copy.copy(hand_built)
    model.image_placement = None
    item, _ = prompt_item(processor_for(model, "chatml"), None, picture(0), "What?", placement=image_placement(model))
    plain = Processor.for_model(model, model.tokenizer, template="chatml")(
        Sample([Message("user", [I(0), "What?"])], [picture(0)]), add_generation_prompt=True)
    assert item["input_ids"].tolist() == plain["input_ids"].tolist()


def test_saved_layout_survives_and_old_directories_get_the_default(hand_built, tmp_path):
    model = copy.copy(hand_built)
    model.image_placement = ImagePlacement("after", " ", None)
    model.save_pretrained(tmp_path)
    assert vlm.load(tmp_path).image_placement == ImagePlacement("after", " ", None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["image_placement"]  # a directory written before the placement was recorded
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert vlm.load(tmp_path).image_placement == DEFAULT


# ------------------------------------------------------------------------------------------ a trained checkpoint
def question_of(sample: Sample) -> tuple[list, str]:
    """The images and the question of a one-turn shapes evaluation sample (what a user would type)."""
    return list(sample.images), sample.meta["qa"][0]["question"]


# an evaluation set with one- and two-image questions and grounding (boxes in the reply)
EVAL = ["stages=[sft]", "data.eval.size=6", "~data.eval.tasks",
        "+data.eval.tasks={vqa_color: 1.0, grounding: 1.0, multi_image: 2.0}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The micro recipe's SFT stage (a few steps; dropout in the LLM, so train-mode inference would be random)."""
    out = tmp_path_factory.mktemp("run")
    res = run(compose("micro", [*EVAL, "stage.sft.max_steps=2", "eval.max_new_tokens=6",
                                "+llm.config.attention_dropout=0.5", f"output_dir={out}"]))
    return res


def test_trained_run_records_its_datas_layout(trained):
    config = json.loads((trained.final_dir / "config.json").read_text())
    # shapes: "<image>\n" + question; two-image samples (in the evaluation set) label "Image 1: ", "Image 2: "
    assert config["image_placement"] == {"position": "before", "separator": "\n", "label": "Image {n}: "}


def test_chat_on_the_trained_model_equals_its_evaluation(trained):
    """Every evaluation sample: chat's prompt ids == the evaluation's processor ids, and chat's reply == the run's
    own prediction (predictions.jsonl); vlm.load returns eval mode, so answers are deterministic despite dropout."""
    from vlm.data.datasets import build_dataset

    cfg = compose("micro", EVAL)
    model = vlm.load(trained.final_dir)
    assert not model.training and not any(m.training for m in model.modules())
    samples = build_dataset(cfg.data[cfg.eval.data])
    proc = Processor.for_model(model, model.tokenizer, template="chatml")
    predictions = {json.loads(line)["id"]: json.loads(line)["prediction"]
                   for line in (trained.run_dir / "predictions.jsonl").read_text().splitlines()}
    assert len(predictions) == len(samples) > 0
    tasks = set()
    for i in range(len(samples)):
        sample = samples[i]
        tasks.add(sample.meta["task"])
        images, question = question_of(sample)
        item, _ = prompt_item(processor_for(model, "chatml"), None, images, question, placement=image_placement(model))
        assert item["input_ids"].tolist() == proc(sample, add_generation_prompt=True)["input_ids"].tolist(), sample.id
        reply, _ = model.chat(images, question, template="chatml", max_new_tokens=6)
        assert reply == predictions[sample.id], sample.id
        assert model.chat(images, question, template="chatml", max_new_tokens=6)[0] == reply
    assert any(t.startswith("multi_image") for t in tasks), "the evaluation set must hold two-image samples"


def test_exported_template_renders_the_trained_prompt(trained):
    """The final directory's tokenizer template (what an export carries) renders a transformers-style message to
    the evaluation's ids."""
    from vlm.data.datasets import build_dataset

    cfg = compose("micro", EVAL)
    model = vlm.load(trained.final_dir)
    proc = Processor.for_model(model, model.tokenizer, template="chatml")
    samples = build_dataset(cfg.data[cfg.eval.data])
    for i in range(len(samples)):
        sample = samples[i]
        images, question = question_of(sample)
        message = {"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}
        text = model.tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
        text = text.replace(model.image_token, model.image_token * model.num_image_tokens())
        assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == \
            proc(sample, add_generation_prompt=True)["input_ids"].tolist(), sample.id
