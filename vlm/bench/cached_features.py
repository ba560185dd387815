"""``cached_features``: a pretrain-stage step (encoder and LLM frozen, connector trained; ``recipes/stage/
pretrain.yaml``'s policy) with the frozen encoder run every step vs its outputs read from a warm ``FeatureCache``
(``stage.pretrain.cache_features=true``), on the ``train_step`` model and batch, interleaved. Also reports the
difference of the two losses on the same batch (0: the cache returns exactly what the encoder computed).
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

from vlm.bench.common import interleaved, median
from vlm.bench.models import batch, model_config, size
from vlm.bench.registry import BENCHES
from vlm.bench.train_step import step_fn


@BENCHES.register("cached_features")
def cached_features(args: argparse.Namespace) -> dict[str, Any]:
    import vlm
    from vlm.encoders.cache import FeatureCache
    from vlm.objectives import build as build_objective

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = size(args.quick, args.size)
    torch.manual_seed(0)
    model = vlm.build(model_config(spec)).to(device, dtype)
    model.encoder.requires_grad_(False)
    model.llm.requires_grad_(False)
    model.train()
    b = batch(model, spec, device, dtype)
    obj = build_objective({"name": "lm"}, model=model)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp, model.encoder)

        def loss(use_cache: bool) -> torch.Tensor:
            model.feature_cache = cache if use_cache else None
            return obj(model, b).loss

        with torch.no_grad():
            plain, cached_cold = float(loss(False)), float(loss(True))   # fills the cache
            cached_warm = float(loss(True))
        cache.flush()
        steps = {"encoder_every_step": step_fn(model, lambda: loss(False)),
                 "cached_features": step_fn(model, lambda: loss(True))}
        times = interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device)
        stored = sum(p.stat().st_size for p in cache.dir.glob("*.safetensors"))
    ref = median(times["encoder_every_step"])
    rows = [{"pretrain_step": name, "step_s": median(times[name]), "speedup": ref / median(times[name])}
            for name in steps]
    return {"rows": rows, "columns": ["pretrain_step", "step_s", "speedup"],
            "setup": {"size": args.size or ("quick" if args.quick else "full"), "spec": spec,
                      "images_per_step": int(b["pixel_values"].shape[0]), "repeats": args.repeats,
                      "policy": {"encoder": "frozen", "connector": "full", "llm": "frozen"}},
            "loss_abs_diff": max(abs(plain - cached_cold), abs(plain - cached_warm)),
            "cache_bytes_per_image": stored / max(len(cache), 1), "times_s": times}
