"""Videos end to end through the model: a ``{"type": "video"}`` part becomes ``video_token * (t * tokens per frame
group)`` between the image markers, the item carries ``pixel_values_videos`` / ``video_grid_thw`` /
``second_per_grid_ts``, batches with images collate and pack, the model injects the video features at the video
tokens and places them on mRoPE's grid as transformers' ``get_rope_index`` does, and chat answers about a video.
Tiny Qwen2-VL tower + patch merger + Qwen2-VL text model; clips written with PyAV in the test."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
import vlm.objectives
from vlm.data.collate import PackCollator, PadCollator
from vlm.data.processor import Processor
from vlm.data.readers.base import SampleError
from vlm.data.sample import ImageRef, Message, Sample, Video, VideoRef
from vlm.data.tokenizer import byte_tokenizer

av = pytest.importorskip("av")

PATCH, MERGE = 8, 2
QWEN2_TOWER = {"model_type": "qwen2_vl_vision", "depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2,
               "mlp_ratio": 2, "patch_size": PATCH, "spatial_merge_size": MERGE}
QWEN25_TOWER = {"model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 32, "num_heads": 2,
                "intermediate_size": 48, "out_hidden_size": 32, "patch_size": PATCH, "window_size": 32,
                "fullatt_block_indexes": [1], "tokens_per_second": 2}
TOWERS = {"qwen2_vl": QWEN2_TOWER, "qwen2_5_vl": QWEN25_TOWER}
TEXT = {"model_type": "qwen2_vl_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
NATIVE = {"kind": "native", "patch_size": PATCH, "merge_size": MERGE, "min_pixels": 16 * 16, "max_pixels": 64 * 64}
VIDEO = {"min_pixels": 16 * 16, "max_pixels": 32 * 48, "total_pixels": None, "min_frames": 2}


def build(tower: str = "qwen2_5_vl"):
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = vlm.build({"encoder": {"name": "qwen2_vl_vit", "image_size": 32, "config": copy.deepcopy(TOWERS[tower])},
                       "connector": {"name": "patch_merger"},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TEXT)}}, tokenizer=tok).eval()
    model.image_preprocessing = {"resize_mode": "resize", "tiling": NATIVE, "video": VIDEO}
    return model


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def proc(model):
    return Processor.for_model(model, model.tokenizer)


def write_clip(path, n=6, rate=4, size=(40, 30), seed=0):
    """``n`` frames of random colour blocks (lossless ffv1 in mkv)."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "bgr0"
        for _ in range(n):
            frame = np.repeat(np.repeat(rng.integers(0, 256, (size[1] // 5, size[0] // 5, 3), dtype=np.uint8), 5, 0),
                              5, 1)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def video_sample(src, sid="v", answer="it moves", **options):
    return Sample([Message("user", [VideoRef(0), "what happens?"]), Message("assistant", [answer])],
                  videos=[Video(src, options)], id=sid)


def image_sample(size, colour, sid):
    img = Image.new("RGB", size, (colour, 255 - colour, colour // 2))
    return Sample([Message("user", [ImageRef(0), "what is it?"]), Message("assistant", ["a square"])],
                  images=[img], id=sid)


def mixed_sample(clip, sid="mixed"):
    img = Image.new("RGB", (24, 40), (10, 200, 30))
    return Sample([Message("user", [ImageRef(0), "and", VideoRef(0), "compare"]), Message("assistant", ["same"])],
                  images=[img], videos=[Video(clip)], id=sid)


def inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("meta", "labels")}


def test_a_video_sample_becomes_video_tokens_and_flat_patches(model, proc, tmp_path):
    clip = write_clip(tmp_path / "a.mkv", n=6, size=(40, 30))
    item = proc(video_sample(clip))
    t, h, w = item["video_grid_thw"][0].tolist()
    assert t == 3 and item["pixel_values_videos"].shape == (t * h * w, 3 * 2 * PATCH * PATCH)
    per_frame = model.num_image_tokens((h * PATCH, w * PATCH))
    assert int((item["input_ids"] == model.video_token_id).sum()) == t * per_frame == t * h * w // MERGE ** 2
    assert int((item["input_ids"] == model.image_token_id).sum()) == 0
    assert not bool(((item["labels"] == model.video_token_id)).any())  # video tokens never trained
    info = item["meta"]["video_info"][0]
    torch.testing.assert_close(item["second_per_grid_ts"], torch.tensor([info.second_per_grid_t]))
    assert info.second_per_grid_t == pytest.approx(2 / 4)  # every frame of a 4 fps clip kept
    # a frame list is a video too (frame rate given: seconds per temporal patch from it)
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(4)]
    item = proc(video_sample(frames, frame_rate=2.0))
    assert item["video_grid_thw"].tolist() == [[2, 4, 4]] and item["second_per_grid_ts"].tolist() == [1.0]


def test_video_samples_collate_with_image_samples_and_answer_the_same_padded_and_packed(model, proc, tmp_path):
    clips = [write_clip(tmp_path / f"{i}.mkv", n=n, size=size, seed=i)
             for i, (n, size) in enumerate([(4, (40, 30)), (6, (30, 50))])]
    items = [proc(video_sample(clips[0], "v0")), proc(image_sample((40, 24), 10, "i0")),
             proc(mixed_sample(clips[1])), proc(video_sample(clips[1], "v1", num_frames=2))]
    padded = PadCollator(0)(items)
    assert padded["video_grid_thw"].tolist() == [g for it in items if "video_grid_thw" in it
                                                 for g in it["video_grid_thw"].tolist()]
    assert padded["second_per_grid_ts"].shape == (3,) and padded["image_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        alone = [model(**inputs(PadCollator(0)([it]))).logits[0] for it in items]
        logits = model(**inputs(padded)).logits
        for row, (it, ref) in enumerate(zip(items, alone)):
            torch.testing.assert_close(logits[row, :it["input_ids"].numel()], ref, atol=1e-5, rtol=1e-5)
        packed = PackCollator(0, max_length=4096)(items)
        assert packed["input_ids"].shape[0] == 1
        logits = model(**inputs(packed)).logits[0]
    order = [i for ids in packed["meta"]["ids"] for i in ids]
    start = 0
    for sid in order:
        k = [it["meta"]["id"] for it in items].index(sid)
        n = items[k]["input_ids"].numel()
        torch.testing.assert_close(logits[start:start + n], alone[k], atol=1e-5, rtol=1e-5)
        start += n


def test_a_training_step_on_videos_and_images(model, proc, tmp_path):
    clip = write_clip(tmp_path / "t.mkv", n=4)
    trained = copy.deepcopy(model).train()
    batch = PadCollator(0)([proc(video_sample(clip)), proc(image_sample((30, 30), 5, "i"))])
    loss = vlm.objectives.build({"name": "lm"})(trained, {k: v for k, v in batch.items() if k != "meta"}).loss
    loss.backward()
    assert torch.isfinite(loss) and trained.encoder.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # a batch of videos only: the tower runs on the videos
    trained.zero_grad()
    batch = PadCollator(0)([proc(video_sample(clip))])
    trained(**{k: v for k, v in batch.items() if k != "meta"}).loss.backward()
    assert trained.connector.parameters().__next__().grad.abs().sum() > 0


def reference_index(tower: str, tokens_per_second: int = 2):
    """transformers' ``get_rope_index`` on a config alone (tests/test_mrope.py's helper)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    from tests.test_mrope import RopeIndex

    if tower == "qwen2_vl":
        return RopeIndex(Qwen2VLModel, Qwen2VLConfig(vision_config={"spatial_merge_size": MERGE}))
    return RopeIndex(Qwen2_5_VLModel, Qwen2_5_VLConfig(vision_config={"spatial_merge_size": MERGE,
                                                                      "tokens_per_second": tokens_per_second}))


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_positions_equal_transformers_get_rope_index(tower, tmp_path):
    model = build(tower)
    proc = Processor.for_model(model, model.tokenizer)
    clips = [write_clip(tmp_path / f"{i}.mkv", n=n, rate=r, seed=i) for i, (n, r) in enumerate([(6, 4), (8, 5)])]
    items = [proc(mixed_sample(clips[0])), proc(video_sample(clips[1], "v", fps=2.5)),
             proc(image_sample((24, 24), 3, "i"))]
    batch = PadCollator(0, padding_side="left")(items)
    assert len(set(batch["second_per_grid_ts"].tolist())) == 2  # different seconds per temporal patch
    media = model.media_tokens(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                               batch["pixel_values_videos"], batch["video_grid_thw"], batch["second_per_grid_ts"])
    got = model.positions.position_ids(batch["input_ids"], attention_mask=batch["attention_mask"], media=media)
    ids = batch["input_ids"]
    types = (ids == model.image_token_id).long() + 2 * (ids == model.video_token_id).long()
    extra = {"second_per_grid_ts": batch["second_per_grid_ts"]} if tower == "qwen2_5_vl" else {}
    want, _ = reference_index(tower)(ids, types, image_grid_thw=batch["image_grid_thw"],
                                     video_grid_thw=batch["video_grid_thw"], attention_mask=batch["attention_mask"],
                                     **extra)
    real = batch["attention_mask"].bool()
    assert torch.equal(got[:, real], want[:, real])


def test_chat_answers_about_a_video_batched_as_alone(model, tmp_path):
    clip = write_clip(tmp_path / "c.mkv", n=4)
    video = {"type": "video", "video": clip}
    one, history = model.chat(video, "what happens?", max_new_tokens=4)
    assert history[0]["content"][0]["type"] == "video"
    two = model.chat_batch([[video], Image.new("RGB", (20, 40))], ["what happens?", "and this?"], max_new_tokens=4)
    assert two[0][0] == one
    # a Video object and a frame list work as the video too
    frames = [Image.new("RGB", (32, 32), (i * 60, 20, 0)) for i in range(4)]
    assert isinstance(model.chat(Video(frames), "what happens?", max_new_tokens=2)[0], str)


def test_saved_model_keeps_its_video_token(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    loaded = vlm.load(tmp_path / "m")
    assert loaded.video_token_id == model.video_token_id and loaded.video_geometry() == model.video_geometry()
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("video_token_id", "video_token"):  # a config written before videos: no video token
        cfg.pop(key)
    from vlm.compose import from_config

    assert from_config(cfg).video_token_id is None and from_config(cfg).video_geometry() is None


def test_bad_video_input_is_named(model, proc, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 20)
    with pytest.raises(SampleError, match=r"sample 'broken'.*bad.mp4"):
        proc(video_sample(str(bad), "broken"))
    with pytest.raises(SampleError, match=r"sample 'empty'.*no frames"):
        proc(video_sample([], "empty"))
    # a model without a native-resolution encoder: the processor names the sample
    clip_model = vlm.build({"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                        "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
                            "connector": {"name": "mlp"}, "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TEXT)}},
                           tokenizer=byte_tokenizer())
    assert clip_model.video_token_id is None
    with pytest.raises(SampleError, match=r"sample 'v'.*this model \(encoder 'clip'\) takes no video input, only "
                       r"images.*frames as images") as e:
        Processor.for_model(clip_model, clip_model.tokenizer)(video_sample(write_clip(tmp_path / "x.mkv", n=2)))
    assert "native_resolution" not in str(e.value)  # the model's own parts, not a rule about encoders
    with pytest.raises(ValueError, match=r"video options .* this model \(encoder 'clip'\) takes no video input"):
        Processor.for_model(clip_model, clip_model.tokenizer, video={"fps": 1})
    item = proc(video_sample(write_clip(tmp_path / "y.mkv", n=4)))
    with pytest.raises(ValueError, match="takes no such videos"):
        clip_model.video_features(item["pixel_values_videos"], item["video_grid_thw"])
    with pytest.raises(ValueError, match="video_grid_thw"):  # grids that disagree with the patches
        model(item["input_ids"][None], pixel_values_videos=item["pixel_values_videos"],
              video_grid_thw=item["video_grid_thw"] * torch.tensor([[2, 1, 1]]))
    with pytest.raises(ValueError, match="no pixel_values_videos"):
        model(item["input_ids"][None])


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_logits_equal_transformers_for_videos_and_images(tower, tmp_path):
    """Our model with transformers' weights (tower ``visual.*`` -> ``encoder.model.``, ``visual.merger.*`` ->
    ``connector.``, the text model and head -> ``llm.model``) gives transformers' logits for a batch of a video, an
    image and a video + image sample (left-padded), fp32."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(0)
    tok = byte_tokenizer()
    norm = {"qwen2_vl": "layer_norm", "qwen2_5_vl": "rms_norm"}[tower]
    ours = vlm.build({"encoder": {"name": "qwen2_vl_vit", "image_size": 32, "config": copy.deepcopy(TOWERS[tower])},
                      "connector": {"name": "patch_merger", "norm": norm},
                      "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TEXT)}}, tokenizer=tok).eval()
    ours.image_preprocessing = {"resize_mode": "resize", "tiling": NATIVE, "video": VIDEO}
    cls, cfg_cls = {"qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLConfig),
                    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig)}[tower]
    vision = {k: v for k, v in TOWERS[tower].items() if k != "model_type"}
    text = {k: v for k, v in TEXT.items() if k != "model_type"}
    text.update(vocab_size=ours.llm.vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    ref = cls(cfg_cls(text_config=text, vision_config=vision, image_token_id=ours.image_token_id,
                      video_token_id=ours.video_token_id, tie_word_embeddings=False)).eval()
    state = ref.state_dict()
    mapped = {}
    for k, v in state.items():
        if k.startswith("model.visual.merger."):
            mapped["connector." + k.removeprefix("model.visual.merger.")] = v
        elif k.startswith("model.visual."):
            mapped["encoder.model." + k.removeprefix("model.visual.")] = v
        elif k.startswith("model.language_model."):
            mapped["llm.model.model." + k.removeprefix("model.language_model.")] = v
        else:
            mapped["llm.model." + k] = v
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k and "inv_freq" not in k]
    proc = Processor.for_model(ours, tok)
    clips = [write_clip(tmp_path / f"{i}.mkv", n=n, rate=r, seed=i) for i, (n, r) in enumerate([(6, 4), (8, 5)])]
    items = [proc(video_sample(clips[1], "v", fps=2.5)), proc(image_sample((24, 40), 3, "i")),
             proc(mixed_sample(clips[0]))]
    batch = PadCollator(0, padding_side="left")(items)
    ids = batch["input_ids"]
    types = (ids == ours.image_token_id).long() + 2 * (ids == ours.video_token_id).long()
    media = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    extra = {"second_per_grid_ts": batch["second_per_grid_ts"]} if tower == "qwen2_5_vl" else {}
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=batch["attention_mask"], mm_token_type_ids=types, **media,
                   **extra).logits
        got = ours(**inputs(batch)).logits
    real = batch["attention_mask"].bool()
    assert (got - want)[real].abs().max() <= 1e-4


def test_eval_answers_video_samples_as_chat_does(model, proc, tmp_path):
    """``vlm.eval``'s evaluator on samples with videos (and an image sample in the same batch): each prediction is
    the one it gets alone (batch size 1)."""
    from vlm.eval.evaluator import OneProcess, evaluate

    clips = [write_clip(tmp_path / f"{i}.mkv", n=4, seed=i) for i in range(2)]
    samples = [video_sample(clips[0], "v0"), image_sample((24, 24), 40, "i0"), video_sample(clips[1], "v1")]
    metrics, records = evaluate(model, OneProcess("cpu"), proc, samples, batch_size=3, max_new_tokens=3,
                                precision=torch.float32)
    assert "eval_dropped" not in metrics and [r["id"] for r in records] == ["v0", "i0", "v1"]
    assert all(isinstance(r["prediction"], str) for r in records)
    _, alone = evaluate(model, OneProcess("cpu"), proc, samples, batch_size=1, max_new_tokens=3,
                        precision=torch.float32)
    assert [r["prediction"] for r in alone] == [r["prediction"] for r in records]


@pytest.mark.parametrize("template", ["chatml", {"name": "chatml", "image_start": "<vision>", "image_end": "</vision>"}])
def test_video_prompts_are_the_same_through_the_exported_chat_template(template, tmp_path):
    """``set_template`` writes video parts into the Jinja chat template (``{"type": "video"}`` -> ``image_start +
    video token + image_end``): the ``tokenizer`` template then builds the same ids as vlm's template, plain
    transformers renders the video token, and a saved directory answers the same."""
    model = copy.deepcopy(build())
    model.tokenizer = copy.deepcopy(model.tokenizer)
    if isinstance(template, dict):
        model.tokenizer.add_special_tokens({"additional_special_tokens": ["<vision>", "</vision>"]})
        model.llm.resize_token_embeddings(len(model.tokenizer))
    model.set_template(template)
    clip = write_clip(tmp_path / "j.mkv", n=4)
    sample = video_sample(clip, answer="it moves")
    ours = Processor.for_model(model, model.tokenizer, template)(sample)
    theirs = Processor.for_model(model, model.tokenizer, "tokenizer")(sample)
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["labels"], theirs["labels"])
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                             {"type": "text", "text": "hi"}]}],
                                               tokenize=False)
    assert text.count(model.video_token) == 1  # plain transformers renders the video part
    model.save_pretrained(tmp_path / "m")
    loaded = vlm.load(tmp_path / "m")
    video = {"type": "video", "video": clip}
    assert loaded.chat(video, "what happens?", max_new_tokens=3)[0] == \
        model.chat(video, "what happens?", max_new_tokens=3, template=template)[0]


def test_stage_video_options_are_checked_and_recorded_in_the_export(model, tmp_path):
    """``stage.<name>.video`` is checked when a recipe is composed; the run's video options are recorded in
    ``final/`` (``image_preprocessing["video"]``) and a loaded model's processor samples videos with them."""
    from vlm.train import compose
    from vlm.train.config_check import ConfigError
    from vlm.train.export import export_final

    with pytest.raises(ConfigError, match=r"stage.sft.video: .*patch_size"):
        compose("micro", ["+stage.sft.video={patch_size: 7}"])
    with pytest.raises(ConfigError, match=r"stage.sft.video: .*fps=2.0 and num_frames=4 exclude each other"):
        compose("micro", ["+stage.sft.video={fps: 2, num_frames: 4}"])
    proc = Processor.for_model(model, model.tokenizer, video={"num_frames": 2, "max_pixels": 16 * 32})
    export_final(tmp_path / "final", model, model.state_dict(), model.tokenizer, image_processor=proc.image_processor,
                 video_processor=proc.video_processor)
    loaded = vlm.load(tmp_path / "final")
    assert loaded.image_preprocessing["video"]["num_frames"] == 2
    again = Processor.for_model(loaded, loaded.tokenizer)
    assert again.video_processor.options == proc.video_processor.options
