"""An exported directory preprocesses images exactly as vlm does: the model records its ``resize_mode``
(``VLM.image_preprocessing``), ``to_hf`` writes the transformers image processor computing the same pixels, and
``from_hf`` reads a LLaVA directory's image processor back into the record.

Images are non-square (50x30, 30x70), where squash, pad and crop differ.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, CLIPImageProcessor, LlavaImageProcessor, \
    SiglipImageProcessor

import vlm
from tests.conftest import tiny_cfg
from tests.test_interop import save_llava
from vlm.convert import convert
from vlm.data.images import ImageProcessor
from vlm.data.processor import Processor
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.interop import from_hf, to_hf
from vlm.train.export import export_final

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]
MODES = ["resize", "crop", "pad"]
SIZES = [(50, 30), (30, 70)]  # (width, height)
ATOL = 1e-5


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def tiny_model(tower: str = "clip", mode: str | None = None) -> vlm.VLM:
    torch.manual_seed(0)
    model = vlm.build(tiny_cfg(tower, "llama", image_mean=MEAN, image_std=STD), tokenizer=byte_tokenizer("chatml")).eval()
    if mode is not None:
        model.image_preprocessing = {"resize_mode": mode}
    return model


def vlm_pixels(model: vlm.VLM, image: Image.Image) -> torch.Tensor:
    """Pixels of ``Processor.for_model`` with no image options (the model's record decides)."""
    sample = Sample([Message("user", [ImageRef(0), "hello"])], [image])
    return Processor.for_model(model, model.tokenizer, "chatml")(sample, add_generation_prompt=True)["pixel_values"]


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("mode", MODES)
def test_exported_processor_gives_vlms_pixels(tmp_path, mode, tower):
    """save_pretrained -> vlm.load keeps the mode; ``python -m vlm.convert`` writes a directory whose
    ``AutoProcessor`` (PIL backend, the resampling vlm uses) gives exactly the pixels vlm's processor gives for the
    loaded model; transformers' default torchvision backend rounds its bicubic differently, within 2 levels of 255
    here (see docs/interop.md)."""
    tiny_model(tower, mode).save_pretrained(tmp_path / "vlm")
    model = vlm.load(tmp_path / "vlm")
    assert model.image_preprocessing == {"resize_mode": mode}
    assert Processor.for_model(model, model.tokenizer).image_processor.resize_mode == mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert(tmp_path / "vlm", tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(str(out), backend="pil")
    default = AutoProcessor.from_pretrained(str(out))
    level = 1 / 255 / torch.tensor(STD)[:, None, None]  # one uint8 step in normalized units, per channel
    for width, height in SIZES + [(64, 40)]:
        image = picture(width, height)
        ours = vlm_pixels(model, image)
        reference = ImageProcessor(32, MEAN, STD, resize_mode=mode)(image)[0]
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)
        batch = processor(images=image, text="hello <image>", return_tensors="pt")
        assert int((batch["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens()
        torch.testing.assert_close(batch["pixel_values"], ours, atol=ATOL, rtol=0)
        if (width, height) != (30, 70):  # upsampling one side of a noise image: PIL clips between its two passes
            px = default(images=image, text="hello <image>", return_tensors="pt")["pixel_values"]
            assert bool(((px - ours).abs() <= 2 * level + ATOL).all()), (width, height)


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_keeps_the_mode(tmp_path, mode):
    """vlm -> llava -> vlm keeps the mode (and the exported image processor, byte for byte)."""
    to_hf(tiny_model("clip", mode), tmp_path / "hf")
    back = from_hf(tmp_path / "hf")
    assert back.image_preprocessing == {"resize_mode": mode}
    back.save_pretrained(tmp_path / "vlm")
    again = vlm.load(tmp_path / "vlm")
    assert again.image_preprocessing == {"resize_mode": mode}
    to_hf(again, tmp_path / "hf2")
    first, second = ((tmp_path / d / "preprocessor_config.json").read_text() for d in ("hf", "hf2"))
    assert first == second
    image = picture(*SIZES[1])
    torch.testing.assert_close(vlm_pixels(again, image), vlm_pixels(tiny_model("clip", mode), image), atol=0, rtol=0)


SOURCES = {  # a LLaVA directory's image processor -> the mode that computes its pixels
    "crop": lambda: CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_mean=MEAN, image_std=STD),
    "resize": lambda: SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD),
    "pad": lambda: LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_mean=MEAN, image_std=STD),
}


@pytest.mark.parametrize("mode", sorted(SOURCES))
def test_import_preprocesses_as_the_source(tmp_path, mode):
    """from_hf of a LLaVA directory records the geometry of its image processor: vlm's processor for the imported
    model gives the pixels of the directory's own ``AutoImageProcessor``."""
    save_llava(tmp_path)
    SOURCES[mode]().save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no approximation warning
        model = from_hf(tmp_path)
    assert model.image_preprocessing == {"resize_mode": mode}
    ours = ImageProcessor.from_model(model, **model.image_preprocessing)
    source = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    for width, height in SIZES:
        image = picture(width, height, seed=1)
        torch.testing.assert_close(ours(image)[0], source(images=image, return_tensors="pt")["pixel_values"],
                                   atol=ATOL, rtol=0)


def test_import_without_image_processor_keeps_the_default(tmp_path):
    save_llava(tmp_path)
    assert from_hf(tmp_path).image_preprocessing == {"resize_mode": "resize"}


@pytest.mark.parametrize("source,match", [
    (lambda: CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}), "differ from"),
    (lambda: CLIPImageProcessor(size={"shortest_edge": 32}, do_center_crop=False), "without a crop"),
    (lambda: SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2), "not bicubic"),
])
def test_import_warns_when_vlm_can_only_approximate(tmp_path, source, match):
    save_llava(tmp_path)
    source().save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match=f"preprocessor_config.json.*{match}"):
        from_hf(tmp_path)


def test_export_warns_about_a_pad_color_llava_cannot_express(tmp_path):
    model = tiny_model("clip")
    model.image_preprocessing = {"resize_mode": "pad", "pad_color": [1, 2, 3]}
    with pytest.warns(UserWarning, match=r"pad_color=\[1, 2, 3\].*int\(255 \* image_mean\) = \[102, 127, 153\]"):
        to_hf(model, tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["do_pad"] is True


def test_for_model_arguments_override_the_record():
    model = tiny_model("clip", "pad")
    model.image_preprocessing["pad_color"] = [9, 8, 7]
    assert Processor.for_model(model, model.tokenizer).image_processor.pad_color == (9, 8, 7)
    explicit = Processor.for_model(model, model.tokenizer, resize_mode="crop").image_processor
    assert explicit.resize_mode == "crop"


def test_old_config_without_the_record_loads_with_the_default(tmp_path):
    tiny_model("clip", "crop").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["image_preprocessing"] == {"resize_mode": "crop"}
    del cfg["image_preprocessing"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = vlm.load(tmp_path)
    assert model.image_preprocessing == {"resize_mode": "resize"}
    assert Processor.for_model(model, model.tokenizer).image_processor.resize_mode == "resize"


@pytest.mark.parametrize("image_processor,record", [
    (ImageProcessor(32, MEAN, STD, resize_mode="crop"), {"resize_mode": "crop"}),
    (ImageProcessor(32, MEAN, STD, resize_mode="pad"), {"resize_mode": "pad", "pad_color": [102, 127, 153]}),
    (None, {"resize_mode": "resize"}),
])
def test_final_directory_records_the_stages_image_processor(tmp_path, image_processor, record):
    """``export_final`` (a run's ``final/``) records the stage processor's geometry; ``vlm.load`` keeps it."""
    model = tiny_model("clip")
    export_final(tmp_path, model, model.state_dict(), model.tokenizer, image_processor=image_processor)
    assert vlm.load(tmp_path).image_preprocessing == record
