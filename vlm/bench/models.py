"""The bench models: ours built from configs, and transformers' class on identical weights (``vlm.interop.to_hf``),
per model family (``FAMILIES``: each states its sizes, our build config, transformers' class and its batch).

``llava`` (the default): ``full`` is a CLIP-style tower of 6 layers x 384 at 224 px / 16 (196 patch tokens, CLS
dropped), a 2-layer MLP connector and a Llama-style LLM of 6 layers x 512 with a 32k vocabulary; ``quick`` the same
shapes scaled down to seconds (what the tests run). Theirs: ``LlavaForConditionalGeneration``.

``qwen2_5_vl``: a ``qwen2_vl_vit`` tower (``qwen2_5_vl_vision``: window attention, full-attention blocks, RMSNorm +
SwiGLU) at native resolution, the ``patch_merger`` (``rms_norm``) and the Qwen2.5-VL text model (mRoPE); ``full`` is
CPU-sized with Qwen's real vocabulary (151936). Theirs: ``Qwen2_5_VLForConditionalGeneration``. Its batch holds
images of different sizes as flat patches + ``image_grid_thw`` and ``mm_token_type_ids`` (see ``qwen_batch``).

``llava_next``: ``llava``'s parts and sizes plus the ``anyres_grid`` arrangement (pinpoints 1x2, 2x1, 2x2 tiles of
the tower's size); each row holds one image of its own size (``image_sizes``: wide, tall, square, ...), every view
through the tower, the tiles' tokens unpadded with ``image_newline``. Theirs: ``LlavaNextForConditionalGeneration``
(see ``next_batch``).

``llava_onevision``: ``llava_next``'s parts and sizes with the ``onevision`` arrangement (a 1-tile budget, so that
2x2-tile images pool); rows alternate one image alone (tiles) and two images sharing the row (one view each,
``batch_num_images``). Theirs: ``LlavaOnevisionForConditionalGeneration`` (see ``onevision_batch``).

``smolvlm``: ``llava``'s sizes as Idefics3's parts (``idefics3_vision`` tower, pixel shuffle 2 + one Linear); each
row one image of 5, 3, 2 or 1 views, padded per row as SmolVLM's processor pads (``pixel_values (B, N, 3, S, S)`` +
``pixel_attention_mask``). Theirs: ``SmolVLMForConditionalGeneration`` (see ``smolvlm_batch``).
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

SIZES: dict[str, dict[str, Any]] = {
    "full": {"encoder": {"name": "clip", "image_size": 224, "patch_size": 16, "hidden_size": 384, "num_layers": 6,
                         "num_heads": 6, "intermediate_size": 1536, "select": "patch"},
             "llm": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
                     "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000,
                     "max_position_embeddings": 2048},
             "batch": 8, "text_tokens": 128, "answer_tokens": 64},
    "quick": {"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                          "num_heads": 4, "intermediate_size": 64, "select": "patch"},
              "llm": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
                      "max_position_embeddings": 256},
              "batch": 2, "text_tokens": 16, "answer_tokens": 8},
    # for a GPU (``--size gpu_1b --device cuda --dtype bfloat16``): ~0.3B tower + ~1B LLM; not measured here
    "gpu_1b": {"encoder": {"name": "clip", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
                           "num_layers": 24, "num_heads": 16, "intermediate_size": 4096, "select": "patch"},
               "llm": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                       "max_position_embeddings": 4096},
               "batch": 16, "text_tokens": 448, "answer_tokens": 224},
}


def size(quick: bool, name: str | None = None, family: str = "llava") -> dict[str, Any]:
    """``family``'s sizes entry (``FAMILIES[family].sizes``): ``name`` when given, else ``quick`` or ``full``.
    ``ValueError`` naming the family and the sizes it has for an unknown name."""
    sizes = get_family(family).sizes
    if name is not None:
        if name not in sizes:
            raise ValueError(f"--size {name!r} for --family {family}; expected one of {sorted(sizes)}")
        return sizes[name]
    return sizes["quick" if quick else "full"]


def model_config(spec: dict[str, Any], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """A ``vlm.build`` config for a ``SIZES`` entry."""
    return {"encoder": dict(spec["encoder"]), "connector": {"name": "mlp", "depth": 2},
            "llm": {"name": "hf_causal_lm", "config": dict(spec["llm"]), "attn_implementation": attn_implementation}}


def build_pair(spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
               seed: int = 0, family: str = "llava") -> tuple[Any, Any]:
    """``(ours, theirs)``: a random ``VLM`` built from ``family``'s config for ``spec`` and transformers' class of
    the family (``FAMILIES[family].hf_class``, e.g. ``LlavaForConditionalGeneration``) loaded from its ``to_hf``
    export (identical weights), both on ``device`` in ``dtype``, in training mode."""
    import transformers

    import vlm
    from vlm.interop import to_hf

    fam = get_family(family)
    torch.manual_seed(seed)
    ours = vlm.build(fam.config(spec))
    if fam.setup is not None:
        fam.setup(ours)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_hf(ours, tmp, format=fam.format)
        theirs = getattr(transformers, fam.hf_class).from_pretrained(tmp, dtype=torch.float32,
                                                                     attn_implementation="sdpa")
    return ours.to(device, dtype).train(), theirs.to(device, dtype).train()


def batch(model: Any, spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
          seed: int = 0, rows: int | None = None) -> dict[str, torch.Tensor]:
    """``rows`` (default ``spec["batch"]``) rows of one image's placeholders then ``text_tokens`` random ids, the
    last ``answer_tokens`` of them labelled (the answer), plus random pixels."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or spec["batch"]
    k = model.num_image_tokens()
    text = torch.randint(3, spec["llm"]["vocab_size"], (rows, spec["text_tokens"]), generator=g)
    ids = torch.cat([torch.full((rows, k), model.image_token_id), text], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -spec["answer_tokens"]:] = ids[:, -spec["answer_tokens"]:]
    size = spec["encoder"]["image_size"]
    pixels = torch.randn(rows, 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


#: Qwen2.5-VL sizes. Image grids are in patch units ``(t, h, w)`` (h, w multiples of the merge size 2); each row of
#: ``images`` lists its images, each image's merged tokens after 2 text tokens; every row then has ``text_tokens``
#: random ids (more where its images are fewer tokens, so that rows are equally long: no padding), the last
#: ``answer_tokens`` labelled.
QWEN2_5_VL_SIZES: dict[str, dict[str, Any]] = {
    # CPU-sized, Qwen's real vocabulary: tower 4 x 256 (patch 14, window 112 px, blocks 1 and 3 full attention),
    # LLM 4 x 512 (GQA 8 / 2 heads, mRoPE sections 16 / 8 / 8 of head dim 64), 151936 ids; 4 rows, 6 images
    "full": {"encoder": {"name": "qwen2_vl_vit", "image_size": 224, "config": {
                 "model_type": "qwen2_5_vl_vision", "depth": 4, "hidden_size": 256, "num_heads": 4,
                 "intermediate_size": 688, "out_hidden_size": 512, "patch_size": 14, "window_size": 112,
                 "fullatt_block_indexes": [1, 3]}},
             "llm": {"model_type": "qwen2_5_vl_text", "hidden_size": 512, "intermediate_size": 1376,
                     "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                     "vocab_size": 151936, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 8, 8]}},
             "images": [[(1, 16, 20)], [(1, 12, 12), (1, 8, 24)], [(1, 20, 16)], [(1, 10, 14), (1, 6, 6)]],
             "text_tokens": 128, "answer_tokens": 64},
    "quick": {"encoder": {"name": "qwen2_vl_vit", "image_size": 32, "config": {
                  "model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 32, "num_heads": 2,
                  "intermediate_size": 48, "out_hidden_size": 32, "patch_size": 8, "window_size": 32,
                  "fullatt_block_indexes": [1]}},
              "llm": {"model_type": "qwen2_5_vl_text", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                      "max_position_embeddings": 256,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
              "images": [[(1, 4, 6), (1, 6, 2)], [(1, 4, 4)]], "text_tokens": 16, "answer_tokens": 8},
    # for a GPU (``--family qwen2_5_vl --size gpu_2b --device cuda --dtype bfloat16``): Qwen2.5-VL's real tower
    # (32 x 1280, ~0.67B) + a 1.5B-class text model (28 x 1536), 151936 ids; not measured here
    "gpu_2b": {"encoder": {"name": "qwen2_vl_vit", "image_size": 448, "config": {
                   "model_type": "qwen2_5_vl_vision", "depth": 32, "hidden_size": 1280, "num_heads": 16,
                   "intermediate_size": 3420, "out_hidden_size": 1536, "patch_size": 14, "window_size": 112,
                   "fullatt_block_indexes": [7, 15, 23, 31]}},
               "llm": {"model_type": "qwen2_5_vl_text", "hidden_size": 1536, "intermediate_size": 8960,
                       "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                       "vocab_size": 151936, "max_position_embeddings": 32768,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                           "mrope_section": [16, 24, 24]}},
               "images": [[(1, 32, 40)], [(1, 24, 24), (1, 16, 48)], [(1, 40, 32)], [(1, 20, 28), (1, 12, 12)]] * 2,
               "text_tokens": 512, "answer_tokens": 256},
}


def qwen_config(spec: dict[str, Any], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """A ``vlm.build`` config for a ``QWEN2_5_VL_SIZES`` entry: tower + ``patch_merger`` (``rms_norm``) + text model,
    what ``to_hf`` writes as ``Qwen2_5_VLForConditionalGeneration``."""
    import copy

    return {"encoder": copy.deepcopy(spec["encoder"]), "connector": {"name": "patch_merger", "norm": "rms_norm"},
            "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(spec["llm"]),
                    "attn_implementation": attn_implementation}}


def qwen_batch(model: Any, spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
               seed: int = 0, rows: int | None = None) -> dict[str, torch.Tensor]:
    """Native-resolution rows (``spec["images"]``, the first ``rows`` of them): per row, for each image 2 random
    text tokens then its merged placeholder tokens (``t * h * w / merge**2``), then random text, rows equally long
    (``text_tokens`` or more), the last ``answer_tokens`` labelled. Returns ``input_ids``, ``labels``, ``attention_mask``, ``mm_token_type_ids`` (1 at
    image tokens), all ``(B, L)``; ``pixel_values (P, 3 * temporal * patch**2)``, every image's flat patches in
    order (random), and ``image_grid_thw (N, 3)``: what Qwen2-VL's processor returns."""
    g = torch.Generator().manual_seed(seed)
    layout = spec["images"][:rows] if rows else spec["images"]
    enc = model.encoder
    merge = enc.spatial_merge_size
    # per row: (is_image, length) segments: 2 text tokens before each image (its vision_start and the like, as the
    # processor writes them; adjacent images would read as one), then the text
    segments = [[seg for t, h, w in images for seg in ((False, 2), (True, t * h * w // merge ** 2))]
                for images in layout]
    length = max(sum(n for _, n in row) for row in segments) + spec["text_tokens"]
    vocab = spec["llm"]["vocab_size"]
    ids, types = [], []
    for row in segments:
        row = row + [(False, length - sum(n for _, n in row))]
        ids.append(torch.cat([torch.full((n,), model.image_token_id) if image
                              else torch.randint(3, vocab, (n,), generator=g) for image, n in row]))
        types.append(torch.cat([torch.full((n,), int(image)) for image, n in row]))
    input_ids = torch.stack(ids)
    labels = torch.full_like(input_ids, -100)
    labels[:, -spec["answer_tokens"]:] = input_ids[:, -spec["answer_tokens"]:]
    grid = torch.tensor([list(image) for images in layout for image in images], dtype=torch.long)
    patch_dim = 3 * enc.temporal_patch_size * enc.patch_size ** 2
    pixels = torch.randn(int(grid.prod(dim=1).sum()), patch_dim, generator=g)
    return {"input_ids": input_ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device), "mm_token_type_ids": torch.stack(types).to(device),
            "pixel_values": pixels.to(device, dtype), "image_grid_thw": grid.to(device)}


#: LLaVA-NeXT sizes: ``llava``'s, each row one image of ``image_sizes[row % len]`` original ``(height, width)`` pixels
LLAVA_NEXT_SIZES: dict[str, dict[str, Any]] = {
    name: {**spec, "image_sizes": [(s * 4 // 3, s * 9 // 4), (s * 9 // 4, s * 4 // 3), (2 * s, 2 * s), (s, s * 3 // 2)]}
    for name, spec in SIZES.items() for s in [spec["encoder"]["image_size"]]}


def next_config(spec: dict[str, Any], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """``model_config`` + the ``anyres_grid`` arrangement (1x2, 2x1, 2x2 tiles of the tower's size): what ``to_hf``
    writes as ``LlavaNextForConditionalGeneration``."""
    s = spec["encoder"]["image_size"]
    return {**model_config(spec, attn_implementation),
            "arrangement": {"name": "anyres_grid", "pinpoints": [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]}}


def next_batch(model: Any, spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
               seed: int = 0, rows: int | None = None) -> dict[str, torch.Tensor]:
    """``rows`` rows, each one image of its own size (``spec["image_sizes"]`` in turn): its arranged placeholders
    (``model.image_token_count``), then random text so that rows are equally long (``text_tokens`` or more), the
    last ``answer_tokens`` labelled; ``pixel_values (V, 3, S, S)`` every image's views (random) and ``image_sizes
    (N, 2)``: what both models take (transformers' also takes the views concatenated)."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or spec["batch"]
    sizes = [spec["image_sizes"][r % len(spec["image_sizes"])] for r in range(rows)]
    counts = [model.image_token_count(h, w) for h, w in sizes]
    length = max(counts) + spec["text_tokens"]
    vocab = spec["llm"]["vocab_size"]
    ids = torch.stack([torch.cat([torch.full((k,), model.image_token_id),
                                  torch.randint(3, vocab, (length - k,), generator=g)]) for k in counts])
    labels = torch.full_like(ids, -100)
    labels[:, -spec["answer_tokens"]:] = ids[:, -spec["answer_tokens"]:]
    s = spec["encoder"]["image_size"]
    views = sum(model.arrangement.num_views(h, w) for h, w in sizes)
    pixels = torch.randn(views, 3, s, s, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype), "image_sizes": torch.tensor(sizes, dtype=torch.long).to(device)}


def onevision_config(spec: dict[str, Any], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """``next_config`` with the ``onevision`` arrangement (a budget of 1 tile's tokens): what ``to_hf`` writes as
    ``LlavaOnevisionForConditionalGeneration``."""
    cfg = next_config(spec, attn_implementation)
    return {**cfg, "arrangement": {**cfg["arrangement"], "name": "onevision", "max_tiles": 1}}


def onevision_batch(model: Any, spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
                    seed: int = 0, rows: int | None = None) -> dict[str, torch.Tensor]:
    """``rows`` rows alternating one image alone and two images (sizes ``spec["image_sizes"]`` in turn): their
    placeholders (``Arrangement.num_tokens(h, w, alone=...)``), then random text so that rows are equally long, the
    last ``answer_tokens`` labelled; ``pixel_values (V, 3, S, S)`` every image's views (random), ``image_sizes (N,
    2)`` and ``batch_num_images (B,)``: what both models take."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or spec["batch"]
    arr, sizes = model.arrangement, spec["image_sizes"]
    per_row = [1 + r % 2 for r in range(rows)]
    images = [[sizes[(sum(per_row[:r]) + j) % len(sizes)] for j in range(n)] for r, n in enumerate(per_row)]
    counts = [sum(arr.num_tokens(h, w, alone=len(row) == 1) for h, w in row) for row in images]
    length = max(counts) + spec["text_tokens"]
    vocab = spec["llm"]["vocab_size"]
    ids = torch.stack([torch.cat([torch.full((k,), model.image_token_id),
                                  torch.randint(3, vocab, (length - k,), generator=g)]) for k in counts])
    labels = torch.full_like(ids, -100)
    labels[:, -spec["answer_tokens"]:] = ids[:, -spec["answer_tokens"]:]
    s = spec["encoder"]["image_size"]
    views = sum(arr.num_views(h, w, alone=len(row) == 1) for row in images for h, w in row)
    pixels = torch.randn(views, 3, s, s, generator=g)
    flat = [size for row in images for size in row]
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype), "image_sizes": torch.tensor(flat, dtype=torch.long).to(device),
            "batch_num_images": torch.tensor(per_row, dtype=torch.long).to(device)}


#: SmolVLM sizes: ``llava``'s tower dimensions as an ``idefics3_vision`` tower, a pixel shuffle (scale 2) + one
#: Linear, ``llava``'s LLM; each row holds one image of ``views[row % len]`` views (crops + the global image)
SMOLVLM_SIZES: dict[str, dict[str, Any]] = {
    name: {**spec, "encoder": {**{k: v for k, v in spec["encoder"].items() if k != "select"},
                               "name": "idefics3_vision"}, "views": [5, 3, 2, 1]}
    for name, spec in SIZES.items()}


def smolvlm_config(spec: dict[str, Any], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """``model_config`` with the ``idefics3_vision`` tower and ``pixel_shuffle_mlp`` (scale 0.5, ``head: linear``,
    no bias): what ``to_hf`` writes as ``SmolVLMForConditionalGeneration`` (with the ``idefics3`` layout,
    ``smolvlm_setup``)."""
    return {**model_config(spec, attn_implementation),
            "connector": {"name": "pixel_shuffle_mlp", "scale": 0.5, "head": "linear", "bias": False}}


def smolvlm_setup(model: Any) -> None:
    """Record the ``idefics3`` image layout (what SmolVLM's export needs)."""
    model.image_preprocessing = {"resize_mode": "resize", "tiling": {"kind": "idefics3", "longest_edge": None,
                                                                     "split": True}}


def smolvlm_batch(model: Any, spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
                  seed: int = 0, rows: int | None = None) -> dict[str, torch.Tensor]:
    """``rows`` rows, each one image of ``spec["views"]`` views in turn: its placeholders (views x
    ``num_image_tokens``), then random text so that rows are equally long, the last ``answer_tokens`` labelled;
    ``pixel_values (B, N, 3, S, S)`` (random views, each row padded with all-zero views to the longest) and
    ``pixel_attention_mask (B, N, S, S)``: what SmolVLM's processor returns and both models take."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or spec["batch"]
    views = [spec["views"][r % len(spec["views"])] for r in range(rows)]
    counts = [v * model.num_image_tokens() for v in views]
    length = max(counts) + spec["text_tokens"]
    vocab = spec["llm"]["vocab_size"]
    ids = torch.stack([torch.cat([torch.full((k,), model.image_token_id),
                                  torch.randint(3, vocab, (length - k,), generator=g)]) for k in counts])
    labels = torch.full_like(ids, -100)
    labels[:, -spec["answer_tokens"]:] = ids[:, -spec["answer_tokens"]:]
    s = spec["encoder"]["image_size"]
    pixels = torch.zeros(rows, max(views), 3, s, s)
    mask = torch.zeros(rows, max(views), s, s, dtype=torch.long)
    for r, v in enumerate(views):
        pixels[r, :v] = torch.randn(v, 3, s, s, generator=g)
        mask[r, :v] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype), "pixel_attention_mask": mask.to(device)}


@dataclass(frozen=True)
class Family:
    """A model family the benches compare: its sizes (``quick``, ``full``, ...), our ``vlm.build`` config for a
    size, the transformers class (a name in ``transformers``) that loads our ``to_hf`` export, and the batch both
    take: ``batch(model, spec, device, dtype, seed=0, rows=None) -> dict`` with ``labels``. ``theirs_only``: batch
    keys only transformers' class is given (ours infers them: ``mm_token_type_ids`` is 1 exactly at image tokens,
    and the ``lm`` objective's label-only path takes no such argument). ``setup(model)``: what our built model needs
    before ``to_hf`` can write it as ``hf_class`` (SmolVLM: its image layout), or ``None``; ``format``: the
    ``vlm.interop.FORMATS`` name to export as when another format can hold the model too (SmolVLM / Idefics3)."""

    sizes: dict[str, dict[str, Any]]
    config: Callable[..., dict[str, Any]]
    hf_class: str
    batch: Callable[..., dict[str, torch.Tensor]]
    theirs_only: tuple[str, ...] = ()
    setup: Callable[[Any], None] | None = None
    format: str | None = None

    def ours_batch(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``b`` without the ``theirs_only`` keys: what our model and objective take."""
        return {k: v for k, v in b.items() if k not in self.theirs_only}


FAMILIES: dict[str, Family] = {
    "llava": Family(SIZES, model_config, "LlavaForConditionalGeneration", batch),
    "llava_next": Family(LLAVA_NEXT_SIZES, next_config, "LlavaNextForConditionalGeneration", next_batch),
    "llava_onevision": Family(LLAVA_NEXT_SIZES, onevision_config, "LlavaOnevisionForConditionalGeneration",
                              onevision_batch),
    "qwen2_5_vl": Family(QWEN2_5_VL_SIZES, qwen_config, "Qwen2_5_VLForConditionalGeneration", qwen_batch,
                         theirs_only=("mm_token_type_ids",)),
    "smolvlm": Family(SMOLVLM_SIZES, smolvlm_config, "SmolVLMForConditionalGeneration", smolvlm_batch,
                      setup=smolvlm_setup, format="smolvlm"),
}


def get_family(name: str) -> Family:
    """``FAMILIES[name]``; ``ValueError`` naming the known families for another name."""
    if name not in FAMILIES:
        raise ValueError(f"--family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]
