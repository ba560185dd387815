"""Videos (vlm.data.video) against transformers' Qwen2VLVideoProcessor, fp32, max abs diff <= 1e-4: frames given as
images, frame sampling, and decoding small clips written here with PyAV (no downloads); bad input named."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata

from vlm.data.errors import CorruptVideo, DataError, EmptyVideo, MissingVideo, URLRefused
from vlm.data.patches import concat_patches
from vlm.data.readers import SampleError, make_reader
from vlm.data.sample import Message, Sample, Video, VideoRef
from vlm.data.video import VideoProcessor, sample_indices

av = pytest.importorskip("av")

BUDGET = {"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 12}
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 100, 50), (0, 0, 0), (255, 255, 255),
           (90, 180, 45), (3, 250, 128), (128, 128, 128)]


def rand_frames(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def processor(**options):
    return VideoProcessor(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, **{**BUDGET, **options})


#: transformers (5.24) still offers the uncapped behaviour and announces the cap as the coming default
CAN_UNCAP = hasattr(Qwen2VLVideoProcessor, "cap_pixels_per_frame")


def reference(cap: bool = True, **options):
    """transformers' processor with the per-video pixel cap on (ours: ``total_pixels``) or off (``None``)."""
    if CAN_UNCAP:
        options["cap_pixels_per_frame"] = cap
    elif not cap:
        pytest.skip("this transformers always caps a video's pixels")
    size = {"shortest_edge": BUDGET["min_pixels"], "longest_edge": BUDGET["max_pixels"]}
    return Qwen2VLVideoProcessor(size=size, **options)


def write_clip(path, colours, *, rate=5, size=(40, 30)):
    """A clip of solid-colour frames; ``.mov`` (png, lossless, states its frame count) or ``.mkv`` (ffv1, lossless,
    states none)."""
    codec, fmt = {"mov": ("png", "rgb24"), "mkv": ("ffv1", "bgr0")}[str(path).rsplit(".", 1)[1]]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], fmt
        for col in colours:
            frame = np.empty((size[1], size[0], 3), np.uint8)
            frame[:] = col
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize(("t", "h", "w"), [(4, 45, 61), (5, 100, 37), (6, 30, 300), (2, 13, 17)])
@pytest.mark.parametrize("total", [None, int(6 * 28 * 28 * 0.9)])
def test_frames_equal_transformers(t, h, w, total):
    frames = rand_frames(t, h, w, seed=t)
    ours, info = processor(total_pixels=total)([Image.fromarray(f) for f in frames])
    pixels, grid = concat_patches([ours])
    ref = reference(total is not None, max_video_tokens=6)(videos=[frames], return_tensors="pt",
                                                           do_sample_frames=False)
    assert torch.equal(grid, ref["video_grid_thw"]) and info.grid_thw == tuple(grid[0].tolist())
    assert (pixels - ref["pixel_values_videos"]).abs().max().item() <= 1e-4
    assert info.indices == list(range(t)) and info.frame_rate is None and info.timestamps is None


def test_total_pixels_bounds_the_video():
    frames = [Image.fromarray(f) for f in rand_frames(6, 30, 300)]
    _, free = processor(total_pixels=None)(frames)
    _, capped = processor(total_pixels=int(6 * 28 * 28 * 0.9))(frames)
    assert capped.resized[0] * capped.resized[1] < free.resized[0] * free.resized[1]


@pytest.mark.parametrize(("total", "rate", "fps", "num_frames"), [
    (30, 10.0, 2, None), (100, 25.0, 1, None), (7, 3.0, None, 4), (50, 30.0, None, 9), (9, 24.0, 2, None),
    (300, 30.0, 0.5, None), (12, 4.0, 8, None), (40, 8.0, None, 40)])
def test_sampling_is_the_reference(total, rate, fps, num_frames):
    want = reference().sample_frames(VideoMetadata(total_num_frames=total, fps=rate), fps=fps,
                                     num_frames=num_frames).tolist()
    assert sample_indices(total, frame_rate=rate, fps=fps, num_frames=num_frames) == want


def test_sampling_bounds():
    assert sample_indices(10) == list(range(10))
    assert len(sample_indices(1000, max_frames=16)) == 16  # no sampling asked: capped to max_frames
    assert sample_indices(1, frame_rate=5.0, fps=1) == [0]  # rounds to 0 frames: keeps the frame
    with pytest.raises(ValueError, match="exclude each other"):
        sample_indices(10, frame_rate=5.0, fps=1, num_frames=4)
    with pytest.raises(ValueError, match="cannot sample 12 frames from a video of 10"):
        sample_indices(10, num_frames=12)
    with pytest.raises(ValueError, match="needs the video's frame rate"):
        sample_indices(10, fps=2)


@pytest.mark.parametrize("ext", ["mov", "mkv"])
def test_decoded_clip_equals_transformers(tmp_path, ext):
    path = write_clip(tmp_path / f"clip.{ext}", COLOURS, rate=5)
    ours, info = processor(fps=2, min_frames=2)(Video(path.name), root=tmp_path, sample_id="s1")
    assert info.total_frames == 10 and info.frame_rate == 5.0 and info.file == str(path)
    assert info.indices == [0, 2, 5, 7]  # 10 frames at 5 fps = 2 s, 2 fps -> 4 frames, spread uniformly
    assert info.timestamps == [0.0, 0.4, 1.0, 1.4]
    # solid colours survive decoding and resizing exactly
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    for k, i in enumerate(info.indices):
        colour = (torch.tensor(COLOURS[i], dtype=torch.float32) / 255 - mean) / std
        assert (ours[k] - colour.view(3, 1, 1)).abs().max().item() <= 1e-5
    # transformers on the same decoded frames and metadata, sampling itself
    frames = np.stack([np.full((30, 40, 3), c, np.uint8) for c in COLOURS])
    meta = VideoMetadata(total_num_frames=10, fps=5.0, duration=2.0)
    # our default total_pixels is the budget of transformers' default max_video_tokens
    ref = reference(min_frames=2)(
        videos=[frames], video_metadata=[meta], do_sample_frames=True, fps=2, return_tensors="pt", return_metadata=True)
    pixels, grid = concat_patches([ours])
    assert torch.equal(grid, ref["video_grid_thw"])
    assert (pixels - ref["pixel_values_videos"]).abs().max().item() <= 1e-4
    sampled = ref["video_metadata"][0]
    assert info.sampled_fps == pytest.approx(sampled.sampled_fps)
    assert info.second_per_grid_t == pytest.approx(2 / sampled.sampled_fps)  # Qwen2.5-VL's second_per_grid_ts


def test_per_video_options_replace_the_configured_sampling(tmp_path):
    path = write_clip(tmp_path / "clip.mov", COLOURS)
    _, info = processor(fps=2, min_frames=2)(Video(str(path), {"num_frames": 6}))
    assert info.indices == sample_indices(10, num_frames=6) and len(info.indices) == 6
    with pytest.raises(TypeError, match=r"\['patch_size'\] cannot be set per video"):
        processor()(Video(str(path), {"patch_size": 16}))


def test_no_frames_is_named(tmp_path):
    with pytest.raises(EmptyVideo, match="sample 's2': the video has no frames"):
        processor()(Video([]), sample_id="s2")
    path = tmp_path / "empty.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=5)
        s.width, s.height, s.pix_fmt = 16, 16, "bgr0"
        c.start_encoding()  # a header, no frame
    with pytest.raises((EmptyVideo, CorruptVideo), match=r"sample 's3': video '.*empty.mkv'"):
        processor()(str(path), sample_id="s3")
    sound = tmp_path / "sound.mkv"
    with av.open(str(sound), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    with pytest.raises(CorruptVideo, match=r"video '.*sound.mkv': the file has no video stream"):
        processor()(str(sound))


def test_unreadable_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    with pytest.raises(CorruptVideo, match=r"sample 7: video '.*bad.mp4': cannot (open|decode) video") as e:
        processor()("bad.mp4", root=tmp_path, sample_id=7)
    assert e.value.reason == "corrupt_video"
    with pytest.raises(MissingVideo, match=r"video '.*nope.mp4': no such file"):
        processor()("nope.mp4", root=tmp_path)
    with pytest.raises(URLRefused, match=r"video 'https://x.org/v.mp4': video URLs are disabled"):
        processor()("https://x.org/v.mp4")
    frames = [Image.new("RGB", (32, 32)), Image.new("RGB", (30, 32))]
    with pytest.raises(ValueError, match="frame 0 is 32x32 but frame 1 is 30x32"):
        processor()(frames)


def test_without_pyav_the_extra_is_named(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "clip.mov", COLOURS[:2])
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install -e .\.\[video\]. from a vlm checkout"):
        processor()(str(path))
    processor()([Image.new("RGB", (32, 32))] * 2)  # frames need no PyAV


def test_messages_reader_reads_video_parts(tmp_path):
    write_clip(tmp_path / "a.mov", COLOURS[:4])
    for k in range(2):
        Image.new("RGB", (32, 32), COLOURS[k]).save(tmp_path / f"f{k}.png")
    reader = make_reader("messages", image_folder=str(tmp_path))
    record = {"id": "v1", "videos": [["f0.png", "f1.png"]], "messages": [
        {"role": "user", "content": [{"type": "video", "video": "a.mov", "fps": 1.0}, {"type": "text", "text": "Q"},
                                     {"type": "video"}]},
        {"role": "assistant", "content": "A"}]}
    sample = reader.convert(record, index=0)
    assert sample.video_refs() == [VideoRef(0), VideoRef(1)] and sample.messages[0].text() == "<video>Q<video>"
    assert sample.videos[0] == Video(str(tmp_path / "a.mov"), {"fps": 1.0})
    assert sample.videos[1].source == [str(tmp_path / "f0.png"), str(tmp_path / "f1.png")]
    frames, info = processor()(sample.videos[1])
    assert frames.shape[0] == 2 and info.grid_thw[0] == 1


@pytest.mark.parametrize(("part", "extra", "reason", "match"), [
    ({"type": "video", "video": "../out.mp4"}, {}, "outside_root", r"video path '../out.mp4' leads outside"),
    ({"type": "video", "video": "gone.mp4"}, {}, "missing_video", r"video '.*gone.mp4': video file not found"),
    ({"type": "video", "video": []}, {}, "empty_video", "the video has no frames"),
    ({"type": "video", "video": "x.mp4", "speed": 2}, {}, "format", r"unknown key\(s\) \['speed'\]"),
    ({"type": "video"}, {}, "video_count", "more video placeholders than the 0 entries"),
    ({"type": "text", "text": "hi"}, {"videos": ["x.mp4"]}, "video_count", r"0 video placeholder\(s\) but 1"),
    ({"type": "video", "video": "https://x.org/v.mp4"}, {}, "url", "video URL .* refused"),
])
def test_reader_bad_video_is_named(tmp_path, part, extra, reason, match):
    (tmp_path / "data").mkdir()
    reader = make_reader("messages", image_folder=str(tmp_path / "data"))
    record = {"id": "v9", **extra, "messages": [{"role": "user", "content": [part]},
                                                {"role": "assistant", "content": "A"}]}
    with pytest.raises(SampleError, match=match) as e:
        reader.convert(record, index=3)
    assert e.value.reason == reason and "sample #3 (id 'v9')" in str(e.value)


def test_sample_checks_video_references():
    msg = [Message("user", [VideoRef(0), "Q"]), Message("assistant", ["A"])]
    Sample(msg, videos=[Video("a.mp4")], id="ok").validate()
    with pytest.raises(ValueError, match="1 video placeholder.* but 2 video"):
        Sample(msg, videos=[Video("a.mp4"), Video("b.mp4")], id="x").validate()
    with pytest.raises(ValueError, match="expected a vlm.data.sample.Video"):
        Sample(msg, videos=["a.mp4"], id="y").validate()


def test_video_errors_survive_pickling_and_keep_their_wording():
    import pickle

    from vlm.data.readers.base import locate

    err = MissingVideo("no such file", sample_id="s", file="a.mp4")
    located = locate(err, index=4, source="train.jsonl")
    for e in (err, located, pickle.loads(pickle.dumps(err)), pickle.loads(pickle.dumps(located))):
        assert "video 'a.mp4': no such file" in str(e) and e.reason == "missing_video"
    assert "sample #4 (id 's')" in str(located)
    image = locate(DataError("bad", file="x.png"), index=0)  # a plain DataError stays an image's
    assert "image 'x.png': bad" in str(image)


def test_a_clip_given_as_bytes_decodes_the_same(tmp_path):
    path = write_clip(tmp_path / "clip.mkv", COLOURS[:6])
    by_path, info = processor(num_frames=4)(str(path))
    by_bytes, info_b = processor(num_frames=4)({"bytes": path.read_bytes(), "path": "clip.mkv"})
    assert torch.equal(by_path, by_bytes) and info.indices == info_b.indices == [0, 1, 3, 4]
    assert info_b.file == "clip.mkv"


def test_video_placeholders_in_text_take_the_videos_list(tmp_path):
    """ms-swift style records: ``<video>`` in string content (messages) or in the query (query_response)."""
    for name in ("a.mp4", "b.mp4", "c.png"):
        (tmp_path / name).write_bytes(b"")
    messages = make_reader("messages", image_folder=str(tmp_path))
    sample = messages.convert({"images": ["c.png"], "videos": ["a.mp4", "b.mp4"], "messages": [
        {"role": "user", "content": "<video>then<image>and<video>?"}, {"role": "assistant", "content": "A"}]}, 0)
    assert [type(p).__name__ for p in sample.messages[0].parts] == ["VideoRef", "str", "ImageRef", "str", "VideoRef",
                                                                    "str"]
    assert [v.source for v in sample.videos] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    plain = messages.convert({"messages": [{"role": "user", "content": "a <video> tag"},
                                           {"role": "assistant", "content": "A"}]}, 1)
    assert plain.messages[0].parts == ["a <video> tag"] and plain.videos == []  # no `videos`: text stays text

    qr = make_reader("query_response", image_folder=str(tmp_path))
    placed = qr.convert({"query": "Q<video>", "response": "R", "videos": ["a.mp4"]}, 2)
    assert placed.messages[0].parts == ["Q", VideoRef(0)]
    before = qr.convert({"query": "Q", "response": "R", "images": ["c.png"], "videos": [["c.png", "c.png"]]}, 3)
    assert [type(p).__name__ for p in before.messages[0].parts] == ["ImageRef", "VideoRef", "str"]
    assert before.videos[0].source == [str(tmp_path / "c.png")] * 2
    with pytest.raises(SampleError, match=r"1 <video> placeholder\(s\) in the text but 2 video\(s\) given") as e:
        qr.convert({"query": "Q<video>", "response": "R", "videos": ["a.mp4", "b.mp4"]}, 4)
    assert e.value.reason == "video_count"


def test_bad_video_options_are_named():
    with pytest.raises(ValueError, match="fps=2.0 and num_frames=8 exclude each other"):
        processor(fps=2, num_frames=8)
    with pytest.raises(TypeError, match=r"unknown video option\(s\) \['frames'\]"):
        processor(frames=8)
    with pytest.raises(ValueError, match="min_frames <= max_frames"):
        processor(min_frames=10, max_frames=4)
    with pytest.raises(ValueError, match="must be numbers"):
        processor(fps="fast")
    assert processor(fps="2", max_frames="16").options["max_frames"] == 16  # YAML strings become numbers
