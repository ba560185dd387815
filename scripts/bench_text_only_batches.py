"""Step time (forward + backward + AdamW step) of the micro recipe's model on CPU (gloo), median of STEPS steps:
batches with images vs text-only batches, the stand-in (VLM.stand_in_zero, find_unused_parameters=false) vs
find_unused_parameters=true without it. The numbers in docs/training.md (distributed training).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/bench_text_only_batches.py 2 40   # 2 processes
    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/bench_text_only_batches.py 1 40   # 1 process
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP


def batch(model, images: bool, B=2, L=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (B, L), generator=g)
    out = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if images:
        K = model.num_image_tokens()
        ids[:, 2:2 + K] = model.image_token_id
        out["labels"][:, :2 + K] = -100
        out["pixel_values"] = torch.randn(B, 3, model.image_size, model.image_size, generator=g)
    return out


def worker(rank, world, cases, steps, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29777"))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from vlm.objectives import TrainModule
    from vlm.objectives import build as build_objective
    from vlm.train import compose
    from vlm.train.build import build_model, build_tokenizer, seed_everything
    from vlm.train.policy import freeze_unused_encoder_layers
    cfg = compose(overrides=["recipe=micro"])
    res = {}
    for name, images, find_unused, stand_in in cases:
        seed_everything(0)
        model = build_model(cfg, build_tokenizer(cfg, ["chatml"]))
        freeze_unused_encoder_layers(model)
        if not stand_in:
            model.stand_in_zero = lambda device: None
        module = TrainModule(model, build_objective({"name": "lm"}, model=model)).train()
        wrapped = DDP(module, find_unused_parameters=find_unused) if world > 1 else module
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        b = batch(model, images)
        times = []
        for i in range(steps + 5):
            t0 = time.perf_counter()
            loss = wrapped(dict(b)).loss
            loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
            if world > 1:
                dist.barrier()
            times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times[5:]) * 1e3
    if rank == 0:
        q.put(res)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    world, steps = int(sys.argv[1]), int(sys.argv[2])
    cases = [("image, find_unused=false", True, False, True), ("image, find_unused=true", True, True, True),
             ("text, stand-in, find_unused=false", False, False, True),
             ("text, no stand-in, find_unused=true", False, True, False)]
    if world == 1:
        cases = [("image", True, False, True), ("text, stand-in", False, False, True),
                 ("text, no stand-in", False, False, False)]
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    ps = [ctx.Process(target=worker, args=(r, world, cases, steps, q)) for r in range(world)]
    [p.start() for p in ps]; res = q.get(); [p.join() for p in ps]
    for k, v in res.items():
        print(f"{world} proc  {k:40s} {v:7.2f} ms/step (median of {steps})")
