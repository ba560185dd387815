"""``dpo_forward``: one training step of the ``dpo`` objective, shared-prompt rows (one forward per pair) vs the naive
two forwards per pair (prompt + chosen, prompt + rejected), on the same model and pairs, interleaved.

Pairs are shapes preference pairs (``vlm.data.shapes.preference``: one image, a short question, short answers), so
the prompt (image tokens included) is most of each sequence, as in VLM preference data (RLAIF-V, VLFeedback:
an image of hundreds of tokens, answers of tens to hundreds). The model is a tiny CLIP-style tower + MLP + Llama
built from configs (``--quick``: smaller). ``step_s``: on a CPU the process's CPU seconds (a shared machine's
wall time also counts the other processes; ``wall_s`` is reported beside), on a GPU wall seconds. Step = policy forward + backward with a ``copy`` reference forward
(``vlm.objectives.reference``), as the stage runs it. Reported: median step seconds of each form and their ratio.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from vlm.bench.common import median, sync
from vlm.bench.registry import BENCHES


def setup(quick: bool, batch_size: int, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """A tiny VLM, its tokenizer and ``batch_size`` collated pair rows on ``device``."""
    from vlm.data.datasets import build_dataset
    from vlm.data.preference import PairCollator
    from vlm.data.processor import Processor
    from vlm.train import compose
    from vlm.train.build import build_model, build_tokenizer, seed_everything

    size = 32 if quick else 48
    hidden = 32 if quick else 64
    cfg = compose("micro", [f"encoder.image_size={size}", "encoder.patch_size=4", f"encoder.hidden_size={hidden}",
                            f"llm.config.hidden_size={hidden}", f"llm.config.intermediate_size={4 * hidden}",
                            "llm.config.num_attention_heads=4", "llm.config.num_key_value_heads=2",
                            "llm.config.max_position_embeddings=1024"])
    seed_everything(0)
    tok = build_tokenizer(cfg, ["chatml"])
    model = build_model(cfg, tok).to(device)
    proc = Processor.for_model(model, tok, template="chatml", max_length=1024)
    data = build_dataset({"name": "shapes_preference", "split": "train", "size": batch_size, "image_size": size,
                          "tasks": {"vqa_color": 1.0, "vqa_count": 1.0, "vqa_shape": 1.0}}, proc)
    batch = PairCollator(tok.pad_token_id)([data[i] for i in range(batch_size)])
    batch.pop("meta")
    return model, tok, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@BENCHES.register("dpo_forward")
def dpo_forward(args: argparse.Namespace) -> dict[str, Any]:
    from vlm.objectives import build as build_objective

    device = torch.device(args.device)
    batch_size = 4 if args.quick else 8
    model, tok, batch = setup(args.quick, batch_size, device)
    objectives = {name: build_objective({"name": "dpo", "reference": "copy", "shared_prompt": shared}, model=model)
                  for name, shared in (("shared_prompt", True), ("two_forwards", False))}

    def step(name: str) -> None:
        model.zero_grad(set_to_none=True)
        objectives[name](model, batch).loss.backward()

    names = list(objectives)
    for _ in range(args.warmup):
        for name in names:
            step(name)
    # one interleaved loop (a b, b a, ...) measuring wall and process CPU seconds of every step: on a shared CPU
    # the wall time also counts the other processes, the CPU time is this step's own cost
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            step(name)
            sync(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    times = cpu if device.type == "cpu" else wall
    prompt = int((batch["part"] == 1).sum()) / batch_size
    answers = int((batch["part"] > 1).sum()) / batch_size
    rows = [{"form": name, "step_s": median(t), "ratio_vs_two_forwards": median(t) / median(times["two_forwards"]),
             "wall_s": median(wall[name]), "tokens_per_pair": answers + (prompt if name == "shared_prompt" else 2 * prompt)}
            for name, t in times.items()]
    return {"rows": rows, "columns": ["form", "step_s", "ratio_vs_two_forwards", "wall_s", "tokens_per_pair"],
            "setup": {"pairs": batch_size, "prompt_tokens_per_pair": prompt, "answer_tokens_per_pair": answers,
                      "repeats": args.repeats, "warmup": args.warmup, "reference": "copy",
                      "step_s": "CPU seconds of the process on a CPU (time.process_time), wall seconds on a GPU"},
            "results": {"step_s": times, "wall_s": wall}}
