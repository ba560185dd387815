"""Image loading, RGB conversion, ImageProcessor modes, tiling outputs and box geometry."""
from __future__ import annotations

import base64
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.errors import DataError
from vlm.data.images import ImageInfo, ImageProcessor, load_image, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------------ loading
def test_load_path_relative_to_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    _noise(10, 8).save(tmp_path / "imgs" / "a.png")
    img = load_image("imgs/a.png", root=tmp_path)
    assert img.mode == "RGB" and img.size == (10, 8)
    assert load_image(tmp_path / "imgs" / "a.png").size == (10, 8)


def test_missing_corrupt_truncated_and_tiny_files_name_sample_and_file(tmp_path):
    with pytest.raises(DataError, match=r"sample 'x1'.*nope\.jpg.*no such file"):
        load_image("nope.jpg", root=tmp_path, sample_id="x1")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"sample 7.*bad\.png.*cannot read image"):
        load_image("bad.png", root=tmp_path, sample_id=7)
    buf = io.BytesIO()
    _noise(64, 64).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match="trunc.png"):
        load_image("trunc.png", root=tmp_path)
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with pytest.raises(DataError, match="degenerate image of 1x1"):
        load_image(tmp_path / "one.png")
    with pytest.raises(DataError, match="degenerate"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(DataError, match="directory"):
        load_image(tmp_path)
    err = DataError("boom", sample_id="s", file="f.png")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.file == "f.png" and isinstance(again, ValueError)


def test_urls_refused_unless_allowed_and_other_sources():
    with pytest.raises(DataError, match="URLs are disabled"):
        load_image("https://example.com/a.jpg", sample_id=3)
    buf = io.BytesIO()
    _noise(5, 4).save(buf, "PNG")
    raw = buf.getvalue()
    assert load_image(raw).size == (5, 4)
    assert load_image({"bytes": raw, "path": "x.png"}).size == (5, 4)
    assert load_image("data:image/png;base64," + base64.b64encode(raw).decode()).size == (5, 4)
    src = _noise(6, 6)
    out = load_image(src)
    assert out is not src and np.array_equal(np.asarray(out), np.asarray(src))


# ------------------------------------------------------------------------------------------------------ RGB conversion
def test_grayscale_modes():
    g = Image.new("L", (4, 4), 100)
    assert to_rgb(g).getpixel((0, 0)) == (100, 100, 100)
    a16 = np.full((4, 4), 65535, np.uint16)
    a16[0, 0] = 0
    a16[0, 1] = 257 * 128
    img16 = Image.fromarray(a16)  # mode I;16
    assert img16.mode.startswith("I;16")
    rgb = to_rgb(img16)
    assert rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((1, 0)) == (128, 128, 128)  # PIL's convert would clip this to 255
    i32 = Image.fromarray(np.array([[0, 1000], [30000, 65535]], np.int32), "I")
    assert to_rgb(i32).getpixel((1, 1))[0] == 255 and to_rgb(i32).getpixel((0, 1))[0] == round(30000 / 257)
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), "F")
    assert to_rgb(f).getpixel((0, 1)) == (255, 255, 255) and to_rgb(f).getpixel((1, 0))[0] == 128
    assert to_rgb(Image.new("1", (3, 3), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_transparency_composited_on_background():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(rgba)
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(rgba, background=(0, 0, 0)).getpixel((1, 1)) == (0, 0, 0)
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert abs(to_rgb(half).getpixel((0, 0))[0] - 127) <= 1
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 2), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 1), 1)
    assert to_rgb(p).getpixel((1, 1)) == (200, 100, 50) and to_rgb(p).getpixel((0, 0)) == (10, 20, 30)
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255) and to_rgb(p).getpixel((1, 1)) == (200, 100, 50)


def test_cmyk_and_saved_modes_roundtrip(tmp_path):
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png", background=(1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)
    cmyk.save(tmp_path / "c.jpg")
    px = load_image(tmp_path / "c.jpg").getpixel((0, 0))
    assert px[0] > 200 and px[1] < 60 and px[2] < 60


# ---------------------------------------------------------------------------------------------------------- processor
def test_processor_matches_transformers_clip_and_siglip():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    sig = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    for w, h in [(150, 91), (77, 200), (64, 64)]:
        img = _noise(w, h, seed=w)
        ours, info = ImageProcessor(64, clip.image_mean, clip.image_std, resize_mode="crop")(img)
        assert torch.allclose(ours, clip(img, return_tensors="pt")["pixel_values"], atol=1e-5)
        assert info.original_size == (w, h) and info.num_images == 1
        ours, _ = ImageProcessor(64, sig.image_mean, sig.image_std, resize_mode="resize")(img)
        assert torch.allclose(ours, sig(img, return_tensors="pt")["pixel_values"], atol=1e-5)


def test_pad_mode_is_llava_expand2square():
    img = _noise(60, 30)
    proc = ImageProcessor(32, CLIP_MEAN, CLIP_STD, resize_mode="pad")
    assert proc.pad_color == tuple(int(m * 255) for m in CLIP_MEAN)
    x, info = proc(img)
    canvas = Image.new("RGB", (60, 60), proc.pad_color)
    canvas.paste(img, (0, 15))
    want = proc.to_tensor([canvas.resize((32, 32), Image.Resampling.BICUBIC)])
    assert torch.equal(x, want)
    assert x[0, :, 0, 0].abs().max() < 0.02  # pad colour ~ mean -> ~0 after normalization
    assert info.changes_normalized_frame


def _box_image(w, h, box, *, fg=255):
    a = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = fg
    return Image.fromarray(a)


def _bright_box(x: torch.Tensor, thr: float) -> tuple[int, int, int, int]:
    m = (x.mean(0) > thr).numpy()
    ys, xs = np.nonzero(m)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("mode", ["resize", "pad", "crop"])
@pytest.mark.parametrize("size,box", [((200, 100), (120, 20, 180, 70)), ((90, 240), (10, 100, 70, 200))])
def test_transform_box_follows_the_pixels(mode, size, box):
    proc = ImageProcessor(48, (0, 0, 0), (1, 1, 1), resize_mode=mode)
    x, info = proc(_box_image(*size, box))
    got = info.transform_box(box)
    assert got is not None
    seen = _bright_box(x[0], 0.5)
    assert np.allclose(got, seen, atol=1.01), (got, seen)
    back = info.inverse_box(info.transform_box(box, clip=False))
    assert np.allclose(back, box)
    assert info.transform_box(box, as_int=True) == tuple(int(round(v)) for v in got)


def test_transform_box_clips_and_drops_cropped_boxes():
    proc = ImageProcessor(50, (0, 0, 0), (1, 1, 1), resize_mode="crop")
    _, info = proc(_noise(200, 100))
    assert info.transform_box((0, 0, 10, 10)) is None  # entirely in the cropped-away left margin
    x1, y1, x2, y2 = info.transform_box((0, 0, 100, 100))
    assert x1 == 0 and y1 == 0 and x2 == pytest.approx(25) and y2 == 50
    _, r = ImageProcessor(50, (0, 0, 0), (1, 1, 1))(_noise(200, 100))
    assert not r.changes_normalized_frame
    assert r.transform_norm_box((100, 200, 300, 400)) == (100, 200, 300, 400)
    _, p = ImageProcessor(50, (0, 0, 0), (1, 1, 1), resize_mode="pad")(_noise(200, 100))
    assert p.transform_norm_box((0, 0, 999, 999)) == (0, 250, 999, 750)


def test_dynamic_tiling_outputs_and_budget():
    proc = ImageProcessor(32, CLIP_MEAN, CLIP_STD, tiling={"kind": "dynamic", "max_tiles": 6})
    img = _box_image(128, 64, (64, 0, 128, 32))
    x, info = proc(img)
    assert info.grid == (2, 1) and x.shape == (3, 3, 32, 32)
    assert info.kinds == ["tile", "tile", "thumbnail"] and info.mode == "dynamic"
    assert proc.num_images(128, 64) == 3
    # every output's transform maps the bright box onto that output's bright pixels
    for k, aff in enumerate(info.transforms):
        x1, y1, x2, y2 = (min(max(v, 0), 32) for v in aff.box((64, 0, 128, 32)))
        if x2 <= x1 or y2 <= y1:
            assert (x[k].mean(0) < 0).all(), k  # nothing bright (normalized black < 0)
        else:
            assert np.allclose(_bright_box(x[k], 0.0), (x1, y1, x2, y2), atol=1.01), k
    assert info.transform_box((64, 0, 128, 32)) == (16, 0, 32, 16)  # the thumbnail / global-view frame
    x1, _ = proc(img, max_tiles=1)
    assert x1.shape[0] == 1 and proc.num_images(128, 64, max_tiles=1) == 1
    big = _noise(1000, 300)
    xb, ib = proc(big, max_tiles=4)
    assert ib.grid[0] * ib.grid[1] <= 4 and xb.shape[0] == ib.grid[0] * ib.grid[1] + 1
    no_thumb = ImageProcessor(32, CLIP_MEAN, CLIP_STD, tiling={"kind": "dynamic", "max_tiles": 6, "thumbnail": False})
    assert no_thumb(img)[0].shape[0] == 2


def test_anyres_outputs_and_budget():
    pins = [[32, 64], [64, 32], [64, 64]]
    proc = ImageProcessor(32, CLIP_MEAN, CLIP_STD, tiling={"kind": "anyres", "pinpoints": pins})
    x, info = proc(_noise(100, 90))
    assert info.grid == (2, 2) and x.shape[0] == 5 and info.kinds[0] == "base"
    assert info.best_resolution == (64, 64)
    xs, infos = proc(_noise(100, 90), max_tiles=2)
    assert xs.shape[0] == 3 and infos.best_resolution in ((32, 64), (64, 32))
    assert proc.num_images(100, 90) == 5 and proc.num_images(100, 90, max_tiles=2) == 3


def test_processor_validation():
    with pytest.raises(ValueError, match="resize_mode"):
        ImageProcessor(32, CLIP_MEAN, CLIP_STD, resize_mode="stretch")
    with pytest.raises(ValueError, match="tiling kind"):
        ImageProcessor(32, CLIP_MEAN, CLIP_STD, tiling={"kind": "mosaic"})
    with pytest.raises(TypeError, match="max_tile"):
        ImageProcessor(32, CLIP_MEAN, CLIP_STD, tiling={"kind": "dynamic", "max_tile": 4})
    with pytest.raises(ValueError, match="resize_mode"):
        ImageProcessor(32, CLIP_MEAN, CLIP_STD, resize_mode="pad", tiling={"kind": "dynamic"})
    with pytest.raises(ValueError, match="mean"):
        ImageProcessor(32, (0.5, 0.5), CLIP_STD)
    with pytest.raises(DataError, match="degenerate"):
        ImageProcessor(32, CLIP_MEAN, CLIP_STD)(Image.new("RGB", (1, 1)))


def test_from_model_and_output_dtype():
    class Enc:
        image_size, image_mean, image_std = 16, CLIP_MEAN, CLIP_STD

    proc = ImageProcessor.from_model(Enc(), resize_mode="pad")
    x, info = proc(_noise(20, 10))
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 16) and x.is_contiguous()
    assert isinstance(info, ImageInfo) and info.mode == "pad"
