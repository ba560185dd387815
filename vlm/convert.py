"""Convert between a vlm directory and a transformers directory (LLaVA, and every format in ``vlm.interop``).

    python -m vlm.convert SRC DST [--to hf|vlm] [--format llava] [--dtype bfloat16] [--no-processor]

The direction comes from ``SRC/config.json``: ``{"format": "vlm", ...}`` (written by ``VLM.save_pretrained``) is
exported to the format it was imported from (``source_format``) when that can hold it, else the first transformers
format that can (``--format`` names one); a ``model_type`` that ``vlm.interop`` imports (``llava``, ...) is imported
as a vlm directory (``--format`` other than its own is refused). ``--to`` forces the direction.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DIRECTIONS = {"hf": "vlm -> transformers", "vlm": "transformers -> vlm"}


def _expected() -> str:
    from vlm.interop import supported_model_types

    return ("a vlm directory (config.json with format 'vlm', from VLM.save_pretrained) or a transformers directory "
            f"(config.json with model_type one of {sorted(supported_model_types())})")


def read_config(src: Path) -> dict:
    """``SRC/config.json`` as a dict; errors name the file and what was expected."""
    from vlm.pretrained import read_config as read

    return read(src, "convert", _expected())


def detect_direction(src: Path) -> str:
    """``"hf"`` (export) for a vlm directory, ``"vlm"`` (import) for a LLaVA one; errors name the file."""
    cfg = read_config(src)
    if cfg.get("format") == "vlm":
        return "hf"
    from vlm.interop import supported_model_types

    if cfg.get("model_type") in supported_model_types():
        return "vlm"
    raise ValueError(f"cannot tell what {str(src / 'config.json')!r} holds: format={cfg.get('format')!r}, "
                     f"model_type={cfg.get('model_type')!r}; expected format 'vlm' (export) or a model_type vlm "
                     f"imports ({sorted(supported_model_types())}); pass --to to force a direction")


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = None,
            processor: bool = True, format: str | None = None) -> Path:
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
        return to_hf(model, dst, format=format, dtype=dtype, processor=processor)
    check_import_format(src, format)
    model = from_hf(src, dtype=dtype)
    return model.save_pretrained(dst)


def check_import_format(src: Path, format: str | None) -> None:
    """``--format`` on an import: the format comes from ``SRC/config.json``'s ``model_type``, so a ``format`` naming
    another one is a ``ValueError`` (naming both and saying that ``--format`` applies to export); the source's own
    name (or none) is accepted. The vlm directory records it (``source_format``), and exporting it again writes
    that format by default."""
    if format is None:
        return
    from vlm.interop.formats import FORMATS, format_for_model_type

    model_type = read_config(src).get("model_type")
    fmt = format_for_model_type(model_type, f"convert: {str(src / 'config.json')!r}")
    if format != fmt.registry_name:
        known = "" if format in FORMATS.names() else f" (not a format: expected one of {', '.join(FORMATS.names())})"
        raise ValueError(f"--format {format!r}{known} applies to export (vlm -> transformers) only; "
                         f"{str(src / 'config.json')!r} is a transformers directory (model_type {model_type!r}, "
                         f"format {fmt.registry_name!r}), imported as such and recorded in the vlm directory, whose "
                         f"export writes {fmt.registry_name!r} again by default; drop --format, or export the vlm "
                         f"directory with --format NAME")


def describe(direction: str, hf_dir: Path) -> str:
    """``"vlm -> transformers LlavaForConditionalGeneration"`` (or the reverse) for the transformers directory."""
    from vlm.interop.formats import format_for_model_type

    hf_class = format_for_model_type(read_config(hf_dir).get("model_type"), "convert").hf_class
    return f"vlm -> transformers {hf_class}" if direction == "hf" else f"transformers {hf_class} -> vlm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a vlm directory (VLM.save_pretrained) or a transformers directory vlm imports")
    parser.add_argument("dst", help="output directory (created if missing)")
    parser.add_argument("--to", choices=sorted(DIRECTIONS), default=None,
                        help="force the direction: hf = write a transformers directory, vlm = write a vlm directory "
                             "(default: detected from SRC/config.json)")
    parser.add_argument("--dtype", default=None,
                        help="weights dtype of the output, e.g. float32, bfloat16 (default: export keeps the LLM's "
                             "dtype, import loads float32)")
    parser.add_argument("--no-processor", action="store_true",
                        help="export only: do not write the image processor / tokenizer / processor config")
    parser.add_argument("--format", default=None,
                        help="export only: the transformers format to write (a vlm.interop.FORMATS name, e.g. llava; "
                             "default: the format the model was imported from when it can hold it, else the first "
                             "that can); on an import only SRC's own format is accepted")
    args = parser.parse_args(argv)
    try:
        direction = args.to or detect_direction(Path(args.src))
        out = convert(args.src, args.dst, to=direction, dtype=args.dtype, processor=not args.no_processor,
                      format=args.format)
    except (FileNotFoundError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is its repr
        print(f"vlm.convert: error: {message}", file=sys.stderr)
        return 1
    hf_dir = Path(args.src) if direction == "vlm" else out
    print(f"vlm.convert: {describe(direction, hf_dir)}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
