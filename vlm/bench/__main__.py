"""``python -m vlm.bench NAME [--quick] [--out FILE] ...``: run one bench, print its table, write its JSON and a plot
of its table (the same path, ``.png``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vlm.bench import BENCHES
from vlm.bench.common import machine, plot_table, table, write_json
from vlm.bench.models import FAMILIES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlm.bench", description=__doc__)
    p.add_argument("name", choices=BENCHES.names(), help="which bench")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the bench runs, measures little")
    p.add_argument("--size", default=None, help="model size from the family's sizes (default: full, or quick)")
    p.add_argument("--family", default="llava", choices=sorted(FAMILIES),
                   help="train_step: the model family, ours vs transformers' class (vlm.bench.models.FAMILIES)")
    p.add_argument("--out", default=None, help="JSON file to write (default: bench/<name>.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5, help="measured rounds (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--memory-repeats", type=int, default=2, help="train_step: steps measured for peak memory")
    p.add_argument("--compile", action="store_true", help="torch.compile our decoder layers")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="generate: KV cache kind")
    p.add_argument("--workers", type=int, default=2, help="dataloader: worker processes")
    p.add_argument("--samples", type=int, default=None, help="packing/dataloader/quantize: samples (default per bench)")
    p.add_argument("--quantize", default=None,
                   help="quantize: schemes compared with fp32, comma-separated (default int8,int4; + nf4 on CUDA)")
    p.add_argument("--model", default=None, help="quantize: a run or model directory (default: newest runs/tiny/*)")
    p.add_argument("--server-threads", type=int, default=None,
                   help="serve: torch threads of each server subprocess (OMP_NUM_THREADS; default: torch's own)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.memory_repeats < 1:
        raise SystemExit("--repeats and --memory-repeats must be >= 1, --warmup >= 0")
    t0, where = time.time(), machine(torch.device(args.device))   # before a bench changes the thread count
    result = BENCHES.get(args.name)(args)
    result = {"bench": args.name, "machine": where, **result, "wall_s": time.time() - t0}
    print(f"== vlm.bench {args.name} on {result['machine']['cpu']} ({result['machine']['device']}, "
          f"{result['machine']['torch_threads']} threads)")
    print(table(result["rows"], result.get("columns")))
    out = write_json(args.out or Path("bench") / f"{args.name}.json", result)
    try:
        png = plot_table(result, out.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished bench
        png = None
        print(f"could not plot the table: {e}", file=sys.stderr)
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
