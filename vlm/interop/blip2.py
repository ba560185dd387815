"""transformers ``Blip2ForConditionalGeneration`` (decoder-only text model) <-> ``vlm.VLM``, weight for weight.

| BLIP-2                                              | vlm                                                         |
| --------------------------------------------------- | ----------------------------------------------------------- |
| ``vision_model`` (``Blip2VisionModel``)             | ``encoder.model`` (``blip2`` encoder, ``feature_layer=-1``, |
|                                                     | ``select="all"``: CLS + patches)                            |
| ``vision_model.post_layernorm``                     | ``connector.input_norm`` (``qformer``)                      |
| ``query_tokens``                                    | ``connector.query_tokens``                                  |
| ``qformer.layernorm``                               | ``connector.query_norm``                                    |
| ``qformer.encoder.layer.{i}.*``                     | ``connector.layers.{i}.*`` (``qformer.HF_LAYER_NAMES``)      |
| ``language_projection``                             | ``connector.proj``                                          |
| ``language_model`` (``AutoModelForCausalLM``)       | ``llm.model``                                               |
| ``num_query_tokens``, ``qformer_config``            | ``qformer`` options (``num_queries``, sizes, ``act``, ...)  |
| ``image_token_index`` (``image_token_id``)          | ``image_token_id``                                          |

The Q-Former reads the tower's last layer through ``post_layernorm``, all tokens (CLS included); each image becomes
``num_query_tokens`` placeholder ids. A BLIP-2 directory whose text model is an encoder-decoder (Flan-T5) has no
causal-LM equivalent here and is refused before any weight is read. Only local directories are read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vlm import connectors
from vlm.connectors.qformer import QFormerConnector, to_hf_name
from vlm.encoders.blip2 import Blip2Encoder
from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.interop.mapping import ACT_FROM_HF, ACT_TO_HF
from vlm.interop.processor import save_processor
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE

BLIP2_MODEL_TYPE = "blip-2"
#: Blip2Processor always looks for this literal token (unless the tokenizer names its own ``image_token``)
BLIP2_IMAGE_TOKEN = "<image>"


# ----------------------------------------------------------------------------------------------------- import
def read_blip2_config(path: Path) -> Any:
    """The directory's ``Blip2Config``; ``ValueError`` naming the file for an invalid config (or another
    ``model_type``), a text model that is not a decoder-only causal LM (T5), or no ``image_token_index``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg_file = str(path / CONFIG_FILE)
    config = common.read_hf_config(path, Blip2Config, BLIP2_MODEL_TYPE, Blip2ForConditionalGeneration)
    text_type = config.text_config.model_type
    if not config.use_decoder_only_language_model:
        raise ValueError(f"from_hf: {cfg_file!r} is a BLIP-2 model whose text model is {text_type!r}, an "
                         f"encoder-decoder (is_encoder_decoder={config.text_config.is_encoder_decoder}); vlm's LLM is "
                         f"a decoder-only causal LM: use a BLIP-2 checkpoint with a decoder-only text model (OPT, "
                         f"Llama, Qwen2, ... e.g. Salesforce/blip2-opt-2.7b), not a Flan-T5 one")
    if config.image_token_index is None:
        raise ValueError(f"from_hf: {cfg_file!r} has no image_token_index (image_token_id): BLIP-2 then cannot tell "
                         f"where the query tokens go; set it to the tokenizer's '<image>' id")
    return config


def qformer_options(config: Any) -> dict[str, Any]:
    """The ``qformer`` connector options equal to a ``Blip2Config``'s Q-Former (+ the tower's ``post_layernorm``)."""
    q = config.qformer_config
    if q.hidden_act not in ACT_FROM_HF:
        raise ValueError(f"from_hf: qformer_config.hidden_act={q.hidden_act!r} has no equivalent in the qformer "
                         f"connector; supported: {sorted(ACT_FROM_HF)}")
    return {"name": "qformer", "num_queries": int(config.num_query_tokens), "hidden_size": q.hidden_size,
            "num_layers": q.num_hidden_layers, "num_heads": q.num_attention_heads,
            "intermediate_size": q.intermediate_size, "cross_attention_frequency": q.cross_attention_frequency,
            "act": ACT_FROM_HF[q.hidden_act], "dropout": float(q.hidden_dropout_prob),
            "attention_dropout": float(q.attention_probs_dropout_prob), "layer_norm_eps": q.layer_norm_eps,
            "input_norm": True, "input_norm_eps": config.vision_config.layer_norm_eps}


def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``Blip2ForConditionalGeneration`` directory (decoder-only text model) as a
    ``vlm.VLM`` (eval mode). ``dtype``: parameter dtype of the result (default float32). The tokenizer, image
    mean/std, image geometry and generation settings come from the directory as for LLaVA (``vlm.interop.llava``)."""
    from transformers import Blip2ForConditionalGeneration

    path = Path(path)
    config = read_blip2_config(path)
    hf, torch_dtype = common.load_checkpoint(Blip2ForConditionalGeneration, path, dtype)

    encoder, image_processor, image_processor_file = common.import_encoder(path, type(config.vision_config), {
        "name": "blip2", "config": common.arch_config(config.vision_config), "feature_layer": -1, "select": "all",
        "attn_implementation": attn_implementation, "dtype": common.dtype_name(torch_dtype)})
    lm = common.import_llm(config.text_config, common.is_tied(hf.language_model), attn_implementation, torch_dtype)
    connector = connectors.build(qformer_options(config), in_dim=encoder.hidden_size, out_dim=lm.hidden_size)
    connector = connector.to(torch_dtype)

    theirs = hf.state_dict()
    with torch.no_grad():
        # the tower keeps its own post_layernorm too (unused by the features, as CLIP's); the connector applies it
        common.copy_state(encoder.model, hf.vision_model.state_dict(), "from_hf: vision tower")
        common.copy_state(connector, {k: theirs[to_hf_name(k)] for k in connector.state_dict()}, "from_hf: Q-Former")
        common.copy_state(lm.model, hf.language_model.state_dict(), "from_hf: language model")
    del hf, theirs

    return common.assemble(path, config, encoder, connector, lm, image_token_id=int(config.image_token_index),
                           tokenizer=tokenizer, image_processor=image_processor,
                           image_processor_file=image_processor_file)


# ----------------------------------------------------------------------------------------------------- export
def blip2_problems(model: VLM) -> list[str]:
    """Why ``model`` cannot be written as a transformers BLIP-2 checkpoint (empty when it can)."""
    problems = []
    enc, conn, lm = model.encoder, model.connector, model.llm
    enc_name, conn_name = common.part_name(enc), common.part_name(conn)
    if not isinstance(enc, Blip2Encoder):
        problems.append(f"the encoder is {enc_name!r}; BLIP-2's vision tower is transformers' Blip2VisionModel "
                        f"(our 'blip2' encoder)")
    else:
        if enc.layers != [-1] and enc.layers != [enc.hf_config.num_hidden_layers]:
            problems.append(f"the blip2 encoder has feature_layer={enc.feature_layer}; BLIP-2's Q-Former reads the "
                            f"last layer (feature_layer=-1)")
        if enc.drops_first:
            problems.append(f"the blip2 encoder has select={enc.select!r}; BLIP-2's Q-Former reads every token, CLS "
                            f"included (select='all')")
    if not isinstance(conn, QFormerConnector):
        problems.append(f"the connector is {conn_name!r}; BLIP-2's bridge is the Q-Former (our 'qformer' connector)")
    else:
        opts = conn.options
        if not opts.get("input_norm"):
            problems.append("the qformer connector has input_norm=False; BLIP-2 applies the vision tower's "
                            "post_layernorm to the image tokens (input_norm=True)")
        if opts.get("act") not in ACT_TO_HF:
            problems.append(f"the qformer connector act={opts.get('act')!r} has no BLIP-2 equivalent; supported: "
                            f"{sorted(ACT_TO_HF)}")
        if isinstance(enc, Blip2Encoder) and opts.get("input_norm") \
                and opts.get("input_norm_eps") != enc.hf_config.layer_norm_eps:
            problems.append(f"the qformer connector has input_norm_eps={opts.get('input_norm_eps')}, but BLIP-2's "
                            f"post_layernorm uses the tower's layer_norm_eps={enc.hf_config.layer_norm_eps}")
    return problems + common.lm_problems(lm, "BLIP-2", "Blip2ForConditionalGeneration")


def blip2_config(model: VLM) -> Any:
    """The ``Blip2Config`` describing ``model`` (``ValueError`` listing what BLIP-2 cannot express)."""
    common.refuse_export(blip2_problems(model), "BLIP-2")
    from transformers import Blip2Config

    enc, conn, lm = model.encoder, model.connector, model.llm
    opts = conn.options
    qformer_cfg = {"hidden_size": conn.hidden_size, "num_hidden_layers": opts["num_layers"],
                   "num_attention_heads": opts["num_heads"],
                   "intermediate_size": opts["intermediate_size"] or 4 * conn.hidden_size,
                   "cross_attention_frequency": opts["cross_attention_frequency"], "hidden_act": ACT_TO_HF[opts["act"]],
                   "hidden_dropout_prob": opts["dropout"], "attention_probs_dropout_prob": opts["attention_dropout"],
                   "layer_norm_eps": opts["layer_norm_eps"], "encoder_hidden_size": enc.hidden_size}
    return Blip2Config(vision_config=common.arch_config(enc.hf_config), qformer_config=qformer_cfg,
                       text_config=common.text_config_for_export(lm, model), num_query_tokens=conn.num_queries,
                       image_token_index=model.image_token_id)


def to_hf(model: VLM, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``Blip2ForConditionalGeneration`` directory (safetensors) and return it.

    ``dtype``: dtype of the written weights (default: the LLM's). With ``processor`` (default) also writes the image
    processor, the tokenizer (if ``model.tokenizer``) and the ``Blip2Processor`` config (``num_query_tokens``), when
    the tokenizer encodes ``<image>`` as the single ``image_token_id`` (otherwise it warns and skips that file)."""
    from transformers import Blip2ForConditionalGeneration

    config = blip2_config(model)
    enc, conn, lm = model.encoder, model.connector, model.llm
    common.warn_fixed_size(enc, "Blip2Config")
    out = Path(path)
    hf = Blip2ForConditionalGeneration(config).to(common.export_dtype(lm, dtype))
    state = {f"vision_model.{k}": v for k, v in enc.model.state_dict().items()}
    state.update(conn.hf_state_dict())  # incl. vision_model.post_layernorm: the connector's input_norm is applied
    state.update({f"language_model.{k}": v for k, v in lm.model.state_dict().items()})
    with torch.no_grad():
        common.copy_state(hf, state, "to_hf: BLIP-2")
    common.check_tying(lm, hf.language_model, "BLIP-2")
    common.save_hf(hf, model, out)
    del hf
    if processor:
        from transformers import Blip2Processor

        save_processor(model, out, processor_class=Blip2Processor,
                       options={"num_query_tokens": conn.num_queries}, image_token=BLIP2_IMAGE_TOKEN)
    return out


@FORMATS.register("blip2")
class Blip2Format(HFFormat):
    """transformers ``Blip2ForConditionalGeneration`` with a decoder-only text model."""

    model_type = BLIP2_MODEL_TYPE
    hf_class = "Blip2ForConditionalGeneration"
    from_hf = staticmethod(from_hf)
    to_hf = staticmethod(to_hf)
    problems = staticmethod(blip2_problems)
