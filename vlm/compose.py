"""``vlm.build``: compose a ``VLM`` from component configs; ``from_config``: rebuild the architecture a saved
``config.json`` describes. Above ``vlm.model`` and the component registries (encoders, connectors, LLMs)."""
from __future__ import annotations

from typing import Any

from vlm import arrangements, connectors, encoders, llm as llms
from vlm.data.image_placement import DEFAULT as DEFAULT_IMAGE_LAYOUT, ImagePlacement
from vlm.generation import generation_settings
from vlm.dtypes import param_dtype
from vlm.model import VLM
from vlm.persistence import DEFAULT_IMAGE_PREPROCESSING
from vlm.registry import to_dict

BUILD_KEYS = ("encoder", "connector", "llm", "image_token", "image_token_id", "video_token", "video_token_id",
              "arrangement")


def add_token(tokenizer: Any, token: str) -> int:
    """``token``'s id in ``tokenizer``, added as a special token when missing."""
    if token not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        # add_tokens appends; add_special_tokens({"additional_special_tokens": ...}) would replace the list
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def build(cfg: Any, tokenizer: Any = None) -> VLM:
    """Compose a ``VLM`` from ``{encoder: {...}, connector: {...}, llm: {...}}`` (+ optional ``image_token``, and
    ``arrangement: {name: ...}``: how each image's view tokens are arranged, ``vlm.arrangements``).

    With a ``tokenizer``: adds the image token to it if missing, resizes the LLM embeddings to ``len(tokenizer)``
    when needed, and attaches it as ``model.tokenizer``. Without one (and no ``image_token_id``), a fresh id is
    appended to the embedding table so the placeholder never collides with a real token. An encoder that states
    ``native_resolution`` (or an arrangement that ``takes_videos``: onevision) also takes videos: a ``video_token``
    (default ``<video>``) is added the same way.
    """
    cfg = to_dict(cfg)
    unknown = sorted(set(cfg) - set(BUILD_KEYS))
    if unknown:
        raise TypeError(f"vlm.build: unknown key(s) {unknown}; accepted: {list(BUILD_KEYS)}")
    for key in ("encoder", "connector", "llm"):
        if key not in cfg:
            raise KeyError(f"vlm.build: missing {key!r} config (a mapping with 'name')")
    encoder = encoders.build(cfg["encoder"])
    lm = llms.build(cfg["llm"])
    # the connector computes in its own ``dtype`` when configured, else in the LLM's
    connector = connectors.build(cfg["connector"], default_dtype=param_dtype(lm), in_dim=encoder.hidden_size,
                                 out_dim=lm.hidden_size)
    image_token = cfg.get("image_token", "<image>")
    image_token_id = cfg.get("image_token_id")
    video_token = cfg.get("video_token", "<video>")
    video_token_id = cfg.get("video_token_id")
    # videos: as flat patches by a native-resolution encoder, or as fixed-size frames by an arrangement (onevision)
    arr_cfg = to_dict(cfg["arrangement"]) if cfg.get("arrangement") is not None else None
    arranges_videos = arr_cfg is not None and bool(getattr(arrangements.ARRANGEMENTS.get(arr_cfg.get("name")),
                                                           "takes_videos", False))
    takes_videos = bool(getattr(encoder, "native_resolution", False)) or arranges_videos
    if tokenizer is not None:
        image_token_id = add_token(tokenizer, image_token)
        if takes_videos:
            video_token_id = add_token(tokenizer, video_token)
        if len(tokenizer) > lm.vocab_size:
            lm.resize_token_embeddings(len(tokenizer))
    else:
        if image_token_id is None:
            image_token_id = lm.vocab_size
            lm.resize_token_embeddings(lm.vocab_size + 1)
        if takes_videos and video_token_id is None:
            video_token_id = lm.vocab_size
            lm.resize_token_embeddings(lm.vocab_size + 1)
    arrangement = build_arrangement(cfg.get("arrangement"), lm)
    model = VLM(encoder, connector, lm, image_token_id=image_token_id, image_token=image_token,
                video_token_id=video_token_id if takes_videos else None, video_token=video_token,
                arrangement=arrangement)
    try:  # every image (or tile) is encoder.image_size square: the parts must agree on its token count
        model.num_image_tokens()
    except ValueError as e:
        raise ValueError(f"vlm.build: the encoder's image (tile) size {encoder.image_size} x {encoder.image_size} "
                         f"does not fit the model: {e}") from e
    model.tokenizer = tokenizer
    model.generation = generation_settings(tokenizer)
    return model


def build_arrangement(cfg: Any, lm: Any) -> Any:
    """The arrangement of ``cfg`` (``None`` stays ``None``) for ``lm``'s hidden size, in its dtype."""
    if cfg is None:
        return None
    return arrangements.build(cfg, dim=lm.hidden_size).to(param_dtype(lm))


def from_config(config: dict[str, Any]) -> VLM:
    """Rebuild the architecture described by a saved ``config.json`` (random weights)."""
    encoder = encoders.build(config["encoder"])
    lm = llms.build(config["llm"])
    connector = connectors.build(config["connector"], default_dtype=param_dtype(lm))  # older configs: no dtype
    model = VLM(encoder, connector, lm, image_token_id=config["image_token_id"],
                image_token=config.get("image_token", "<image>"), video_token_id=config.get("video_token_id"),
                video_token=config.get("video_token") or "<video>",
                arrangement=build_arrangement(config.get("arrangement"), lm))
    model.generation = dict(config.get("generation") or {})
    model.source_format = config.get("source_format")  # configs written before it was recorded: None
    # configs written before the preprocessing was recorded: ImageProcessor's default
    model.image_preprocessing = dict(config.get("image_preprocessing") or DEFAULT_IMAGE_PREPROCESSING)
    # configs written before the placement was recorded: the documented default; an explicit null stays None
    model.image_placement = ImagePlacement.from_dict(config.get("image_placement", DEFAULT_IMAGE_LAYOUT.to_dict()))
    return model
