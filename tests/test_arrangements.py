"""Feature arrangements (``vlm.arrangements``) as parts: LLaVA-NeXT's ``anyres_grid`` counts what transformers'
``LlavaNextProcessor`` counts for many image sizes and grids, works with other encoders and grid-keeping connectors,
trains (its ``image_newline`` with the connector's policy), saves and loads; the ``llava_next_7b`` recipe has
transformers' parameter count on the meta device; the ablation's ``layout`` axis composes; bad compositions are
refused before any data is read."""
import copy

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

import vlm
from tests.conftest import TINY_TEXT, TINY_VISION
from vlm.train import compose
from vlm.train.config import model_config
from vlm.train.errors import ConfigError
from vlm.train.stage import model_facts

PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96]]


def cfg(encoder="clip", connector=None, pinpoints=PINPOINTS, **arrangement):
    enc = {**copy.deepcopy(TINY_VISION[encoder]), "num_layers": 1}
    if encoder == "clip":
        enc["select"] = "patch"
    return {"encoder": enc, "connector": connector or {"name": "mlp", "depth": 2},
            "llm": {"name": "hf_causal_lm", "config": {**copy.deepcopy(TINY_TEXT["llama"]), "num_hidden_layers": 1}},
            "arrangement": {"name": "anyres_grid", "pinpoints": pinpoints, **arrangement}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vlm.build(cfg()).eval()


SIZES = [(h, w) for h in (5, 17, 32, 33, 50, 64, 90, 200) for w in (7, 31, 32, 45, 64, 100, 301)]


def test_token_counts_equal_transformers_processor(model):
    """``num_tokens(h, w)`` is ``LlavaNextProcessor``'s count (CLIP, 'default': the CLS token not counted)."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only its counting: no tokenizer needed
    proc.image_processor = type("IP", (), {"image_grid_pinpoints": PINPOINTS})()
    proc.patch_size, proc.num_additional_image_tokens = 8, 1
    for h, w in SIZES:
        theirs = proc._get_number_of_features(h, w, 32, 32) - 1
        assert model.image_token_count(h, w) == theirs, (h, w)
    assert model.image_token_count(50, 100) == model.image_tokens().image(50, 100)


def test_features_follow_the_grid_and_the_counts(model):
    """The arranged features: the base view's tokens first, then the unpadded grid row by row, image_newline after
    each row; as many as the count says, for images of several sizes in one call."""
    sizes = torch.tensor([[20, 60], [64, 50], [30, 30]])
    counts = [model.arrangement.num_views(h, w) for h, w in sizes.tolist()]
    px = torch.randn(sum(counts), 3, 32, 32)
    with torch.no_grad():
        feats = model.image_features(px, image_sizes=sizes)
        views = model.view_features(px)  # (V, 16, D), each view's 4x4 grid
    assert feats.shape[0] == sum(model.image_token_count(h, w) for h, w in sizes.tolist())
    # image 0: 20x60 -> pinpoint [32, 96] (1x3 tiles) -> a 4x12 grid, 4 of 12 wide... rows kept: round(20*12/60)=4
    (r0, r1), (c0, c1) = model.arrangement.kept(20, 60)
    assert torch.equal(feats[:16], views[0])
    grid = views[1:4].reshape(3, 4, 4, -1).permute(1, 0, 2, 3).reshape(4, 12, -1)[r0:r1, c0:c1]
    nl = model.arrangement.image_newline
    rows = torch.cat([grid, nl.expand(grid.shape[0], 1, -1)], dim=1).reshape(-1, grid.shape[-1])
    assert torch.equal(feats[16:16 + rows.shape[0]], rows)


@pytest.mark.parametrize("encoder,connector", [("siglip", {"name": "pixel_shuffle_mlp", "scale": 0.5}),
                                               ("internvit", {"name": "linear"})])
def test_other_encoders_and_grid_connectors(encoder, connector, tmp_path):
    torch.manual_seed(0)
    m = vlm.build(cfg(encoder, connector, newline=False)).eval()
    gh, gw = m.arrangement.tile_grid
    assert (gh, gw) == m.connector.output_grid(m.encoder.grid((32, 32)))
    sizes = torch.tensor([[40, 70]])
    px = torch.randn(m.arrangement.num_views(40, 70), 3, 32, 32)
    ids = torch.full((1, m.image_token_count(40, 70) + 2), 5)
    ids[0, 1:-1] = m.image_token_id
    with torch.no_grad():
        out = m(ids, pixel_values=px, image_sizes=sizes).logits
    m.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(vlm.load(tmp_path)(ids, pixel_values=px, image_sizes=sizes).logits, out)


def test_image_newline_trains_with_the_connector():
    from vlm.train.config import stage_config
    from vlm.train.optim import param_groups
    from vlm.train.policy import apply_policies

    run = compose("ablation", ["layout=anyres"])
    torch.manual_seed(0)
    m = vlm.build(cfg())
    for policy, trains in (("frozen", False), ("full", True)):
        run.stage.sft.policy.connector = policy
        run.stage.sft.policy.llm = "full"
        st = stage_config(run, "sft")
        apply_policies(m, st)
        assert m.arrangement.image_newline.requires_grad is trains
        names = [n for g in param_groups(m, st) for n in g["param_names"]]
        assert ("arrangement.image_newline" in names) is trains


def test_layout_axis_and_llava_next_recipe_compose():
    single, anyres = (model_config(compose("ablation", [f"layout={x}"])) for x in ("single", "anyres"))
    assert single.get("arrangement") is None
    assert anyres["arrangement"]["name"] == "anyres_grid"
    with pytest.raises(ConfigError, match=r"stage\.sft\.tiling=.*arranges the views of"):
        compose("ablation", ["layout=anyres", "+stage.sft.tiling={kind: dynamic, max_tiles: 4}"])
    onevision = model_config(compose("ablation", ["layout=onevision"]))
    assert onevision["arrangement"]["name"] == "onevision" and onevision["arrangement"]["max_tiles"] == 2
    torch.manual_seed(0)
    ov = vlm.build(onevision)
    assert ov.arrangement.layout() == {"kind": "anyres", "pinpoints": onevision["arrangement"]["pinpoints"]}
    # the shapes data is one 64 px square per sample: alone, the 1x2 pinpoint unpadded to a 4 x 4 grid, under
    # max_tiles=2's budget (never pooled), so onevision arranges it as anyres_grid does: the same views, tokens and
    # arranged features for the same weights. Not the same run: onevision takes videos, so the vocabulary gains
    # <video> and the random init draws differ.
    torch.manual_seed(0)
    ny = vlm.build(anyres)
    assert ov.arrangement.pooled(4, 4) is None and ov.arrangement.pooled(8, 8) is not None
    assert ov.arrangement.num_views(64, 64) == ny.arrangement.num_views(64, 64) == 3
    assert ov.image_token_count(64, 64) == ny.image_token_count(64, 64) == model_facts(ny)["image_tokens"] == 36
    assert ov.video_token_id is not None and ny.video_token_id is None
    sizes, n = torch.tensor([[64, 64], [64, 64]]), ny.arrangement.tile_grid[0] * ny.arrangement.tile_grid[1]
    feats = torch.randn(2 * 3, n, ny.arrangement.dim)
    with torch.no_grad():
        ov.arrangement.image_newline.copy_(ny.arrangement.image_newline)
        assert torch.equal(ov.arrangement(feats, sizes, batch_num_images=torch.tensor([1, 1])),
                           ny.arrangement(feats, sizes))


def test_llava_next_7b_recipe_has_transformers_parameter_count():
    from tests.test_train_recipes import CLIP_L14_336, VICUNA_7B, inline

    mc, run = inline("llava_next_7b", CLIP_L14_336, VICUNA_7B)
    assert run.encoder.select == "patch" and run.encoder.feature_layer == -2
    with torch.device("meta"):
        model = vlm.build(mc)
        hf = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config={"model_type": "clip_vision_model", **CLIP_L14_336}, text_config=VICUNA_7B,
            image_grid_pinpoints=mc["arrangement"]["pinpoints"], vision_feature_layer=-2))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model) == count(hf) == 7_062_906_880  # LLaVA-1.5-7B's parameters + image_newline
    assert count(model.arrangement) == hf.model.image_newline.numel() == 4096
    # a square 336 px image: base (576) + the 1x2 pinpoint's 24x48 grid unpadded to 24x24, a newline per row
    assert model.image_token_count(336, 336) == 576 + 24 * (24 + 1)
    # a square 672 px image: base + the 2x2 pinpoint's full 48x48 grid (LLaVA-NeXT's 2,880 + 48 newlines)
    assert model.image_token_count(672, 672) == 576 + 48 * (48 + 1)


def test_bad_compositions_are_refused_when_built():
    with pytest.raises(ValueError, match=r"not multiples of the encoder's image \(tile\) size 32"):
        vlm.build(cfg(pinpoints=[[32, 64], [48, 32]]))
    with pytest.raises(ValueError, match="have no grid"):
        vlm.build(cfg(connector={"name": "xattn", "heads": 2, "head_dim": 8}))
    with pytest.raises(ValueError, match="1-D positions"):
        vlm.build({**cfg(), "llm": {"name": "hf_causal_lm", "config": {
            "model_type": "qwen2_vl_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}}})


def test_llava_next_bench_batch_gives_transformers_logits():
    """``vlm.bench``'s ``llava_next`` family: rows of one image each, of different sizes (``image_sizes``), every
    view concatenated; ours and transformers' class (loaded from ``to_hf``) give the same logits on it."""
    from vlm.bench.models import build_pair, get_family, size

    spec = size(True, None, "llava_next")
    ours, theirs = build_pair(spec, torch.device("cpu"), family="llava_next")
    b = get_family("llava_next").batch(ours, spec, torch.device("cpu"))
    assert len({tuple(s) for s in b["image_sizes"].tolist()}) == b["image_sizes"].shape[0] > 1
    with torch.no_grad():
        assert (theirs(**b).logits - ours(**b).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("max_tiles", [1, 2])
def test_anyres_max_pooling_equals_transformers_onevision(max_tiles):
    """``max_tiles`` (OneVision's ``anyres_max_N``): features equal ``LlavaOnevisionModel.pack_image_features`` and
    counts equal ``LlavaOnevisionProcessor``'s, for sizes pooled and not."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    torch.manual_seed(0)
    m = vlm.build(cfg(max_tiles=max_tiles)).eval()
    arr = m.arrangement
    sizes = torch.tensor([[20, 60], [64, 50], [30, 30], [64, 64], [90, 31]])
    counts = [arr.num_views(h, w) for h, w in sizes.tolist()]
    feats = torch.randn(sum(counts), 16, 32)
    theirs_self = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(image_size=32, patch_size=8), image_grid_pinpoints=PINPOINTS))
    with torch.no_grad():
        theirs, lens = LlavaOnevisionModel.pack_image_features(
            theirs_self, list(feats.split(counts)), sizes, image_newline=arr.image_newline,
            vision_aspect_ratio=f"anyres_max_{max_tiles}")
        ours = arr(feats, sizes)
    assert torch.allclose(torch.cat(theirs), ours, atol=1e-6)
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=PINPOINTS)
    proc.num_image_tokens = 16  # a tile's 4x4 tokens
    proc.vision_aspect_ratio = f"anyres_max_{max_tiles}"
    pooled = 0
    for (h, w), n in zip(sizes.tolist(), lens.tolist()):
        assert arr.num_tokens(h, w) == n == proc._get_number_of_features(h, w, 32, 32), (h, w)
        (r0, r1), (c0, c1) = arr.kept(h, w)
        pooled += arr.pooled(r1 - r0, c1 - c0) is not None
    assert 0 < pooled < len(sizes)  # both paths taken


def test_an_arranged_model_exports_only_as_its_family(tmp_path):
    """A model with an arrangement is never written in a format that would drop it (InternVL's parts + anyres_grid:
    refused by every format, naming the arrangement); LLaVA's parts + anyres_grid export as llava_next only."""
    from vlm.interop import llava, to_hf
    from vlm.interop.formats import format_for_model

    torch.manual_seed(0)
    internvl_like = vlm.build({**cfg("internvit", {"name": "pixel_shuffle_mlp", "scale": 0.5})})
    with pytest.raises(ValueError, match=r"internvl: the model's feature arrangement is 'anyres_grid'"):
        to_hf(internvl_like, tmp_path / "a")
    llava_like = vlm.build(cfg())
    assert format_for_model(llava_like).hf_class == "LlavaNextForConditionalGeneration"
    with pytest.raises(ValueError, match="feature arrangement is 'anyres_grid'; LlavaForConditionalGeneration"):
        llava.to_hf(llava_like, tmp_path / "b")


def test_idefics3_layout_on_the_ablation():
    """``recipe=ablation layout=idefics3``: no arrangement; the pretrain and SFT stages split each 64 px shapes image
    Idefics3's way (longest edge 128 px: 2 x 2 crops of 64 px + the global image, 5 views x 16 tokens), the stem's
    own stage (align) sees one view; the run's tokenizer holds the row/col tokens; the built model takes the
    processed samples, no SFT sample is cut at the stage's max_length, and the sweep's "image tokens" are 5 x 16."""
    from vlm.data.datasets import build_dataset
    from vlm.train.build import build_model, build_tokenizer

    run = compose("ablation", ["layout=idefics3", "data.sft.size=64"])
    assert model_config(run).get("arrangement") is None
    assert run.stage.align.get("tiling") is None
    for name in ("pretrain", "sft"):
        assert run.stage[name].tiling == {"kind": "idefics3", "longest_edge": 128, "split": True}
    tok = build_tokenizer(run, [run.stage[n].template for n in run.stages],
                          [run.stage[n].get("tiling") for n in run.stages])
    assert {"<fake_token_around_image>", "<global-img>", "<row_2_col_2>"} <= set(tok.get_vocab())
    torch.manual_seed(0)
    model = build_model(run, tok).eval()
    from vlm.data.processor import Processor

    st = run.stage.sft
    proc = Processor.for_model(model, tok, template=st.template, max_length=None, tiling=dict(st.tiling))
    items = [proc(s) for s in build_dataset(run.data.sft)]
    assert all(it["pixel_values"].shape == (5, 3, 64, 64) for it in items)
    assert all(int((it["input_ids"] == model.image_token_id).sum()) == 5 * 16 for it in items)
    # what the sweep's "image tokens" column reports: the stage's layout's views, not one view
    assert model_facts(model, proc)["image_tokens"] == 5 * 16 and model_facts(model)["image_tokens"] == 16
    assert max(len(it["input_ids"]) for it in items) <= st.max_length
    text = tok.decode(items[0]["input_ids"])
    assert "<row_1_col_1>" in text and "<row_2_col_2>" in text and "<global-img>" in text
    with torch.no_grad():
        out = model(input_ids=items[0]["input_ids"][None], pixel_values=items[0]["pixel_values"])
    assert out.logits.shape[:2] == (1, len(items[0]["input_ids"]))
