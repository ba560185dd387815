"""Convert between a vlm directory and a transformers LLaVA directory.

    python -m vlm.convert SRC DST [--to hf|vlm] [--dtype bfloat16] [--no-processor]

The direction comes from ``SRC/config.json``: ``{"format": "vlm", ...}`` (written by ``VLM.save_pretrained``) is
exported to transformers LLaVA; ``{"model_type": "llava", ...}`` is imported as a vlm directory. ``--to`` forces it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DIRECTIONS = {"hf": "vlm -> transformers LLaVA", "vlm": "transformers LLaVA -> vlm"}
EXPECTED = ("a vlm directory (config.json with format 'vlm', from VLM.save_pretrained) or a transformers LLaVA "
            "directory (config.json with model_type 'llava')")


def read_config(src: Path) -> dict:
    """``SRC/config.json`` as a dict; errors name the file and what was expected."""
    from vlm.pretrained import read_config as read

    return read(src, "convert", EXPECTED)


def detect_direction(src: Path) -> str:
    """``"hf"`` (export) for a vlm directory, ``"vlm"`` (import) for a LLaVA one; errors name the file."""
    cfg = read_config(src)
    if cfg.get("format") == "vlm":
        return "hf"
    if cfg.get("model_type") == "llava":
        return "vlm"
    raise ValueError(f"cannot tell what {str(src / 'config.json')!r} holds: format={cfg.get('format')!r}, "
                     f"model_type={cfg.get('model_type')!r}; expected format 'vlm' (export to LLaVA) or model_type "
                     f"'llava' (import); pass --to to force a direction")


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = None,
            processor: bool = True) -> Path:
    """Convert ``src`` into ``dst`` (direction detected unless ``to`` is given) and return ``dst``."""
    import vlm
    from vlm.interop import from_hf, to_hf

    src, dst = Path(src), Path(dst)
    direction = to or detect_direction(src)
    if direction not in DIRECTIONS:
        raise ValueError(f"--to {direction!r}; expected one of {sorted(DIRECTIONS)}")
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"SRC and DST are the same directory ({str(src)!r}); write the conversion elsewhere")
    if direction == "hf":
        cfg = read_config(src)
        if cfg.get("format") != "vlm":
            raise ValueError(f"--to hf needs a vlm directory, but {str(src / 'config.json')!r} has "
                             f"format={cfg.get('format')!r} (model_type={cfg.get('model_type')!r}); expected format "
                             f"'vlm' as written by VLM.save_pretrained")
        model = vlm.load(src)
        return to_hf(model, dst, dtype=dtype, processor=processor)
    model = from_hf(src, dtype=dtype)
    return model.save_pretrained(dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a vlm directory (VLM.save_pretrained) or a transformers LLaVA directory")
    parser.add_argument("dst", help="output directory (created if missing)")
    parser.add_argument("--to", choices=sorted(DIRECTIONS), default=None,
                        help="force the direction: hf = write transformers LLaVA, vlm = write a vlm directory "
                             "(default: detected from SRC/config.json)")
    parser.add_argument("--dtype", default=None,
                        help="weights dtype of the output, e.g. float32, bfloat16 (default: export keeps the LLM's "
                             "dtype, import loads float32)")
    parser.add_argument("--no-processor", action="store_true",
                        help="export only: do not write the image processor / tokenizer / processor config")
    args = parser.parse_args(argv)
    try:
        direction = args.to or detect_direction(Path(args.src))
        out = convert(args.src, args.dst, to=direction, dtype=args.dtype, processor=not args.no_processor)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"vlm.convert: error: {e}", file=sys.stderr)
        return 1
    print(f"vlm.convert: {DIRECTIONS[direction]}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
