"""Benchmarks: ``python -m vlm.bench NAME [--quick] [--out FILE] [--repeats N]`` (docs/performance.md).

Each bench is one module registering a function in ``BENCHES``: ``bench(args) -> dict`` of results; the runner
adds the machine description, prints the bench's table and writes everything as JSON. Comparisons with transformers
run both models in the same process on identical weights and batches, interleaved, and report ratios (ours / theirs
for times and memory, theirs / ours never): on a shared machine absolute times drift, ratios hold.
"""
from vlm.bench import (  # noqa: F401  (registration)
    cached_features, dataloader, dpo_forward, generate, mfu, packing, quantize, serve, train_step)
from vlm.bench.registry import BENCHES

__all__ = ["BENCHES"]
