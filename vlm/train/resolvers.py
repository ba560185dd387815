"""Config resolvers for settings that follow the data (``recipes/data/files.yaml``): ``${vlm.image_size:PATH,ROOT}``
(the longest image side of the file's first samples with images, in px; null for a file without images),
``${vlm.or:VALUE,DEFAULT}`` (a null value's default), ``${vlm.cells:SIZE,STRIDE}`` (the tokens of a ``SIZE`` px
image on a stride-``STRIDE`` grid) and ``${vlm.multiple:SIZE,OF}`` (rounded up to a multiple) let a recipe size its
encoder input and per-token tables from the data (the ``tiny`` recipe does). Their mistakes are ``ConfigError`` s
naming the key the user set (``data.train``, ``data.image_root``)."""
from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlm.data.errors import DataError
from vlm.data.files import _Part, data_records
from vlm.registry import OptionError
from vlm.train.errors import ConfigError

#: samples whose images are measured by ``${vlm.image_size:...}``
IMAGE_SIZE_SAMPLES = 64


@lru_cache(maxsize=8)
def _image_size(path: str, image_root: str | None, mtime: float, allow_outside_root: bool = False) -> int | None:
    """The longest image side (px) of the first ``IMAGE_SIZE_SAMPLES`` samples of ``path`` that have images (text-only
    samples are passed over, however many), ``None`` when no sample has an image (nothing to size). A sample the
    reader rejects for its conversation (an unknown role, ...) is passed over too: the data sets name and count it
    when training. Raises ``ValueError`` when samples have images but none can be read."""
    from PIL import Image

    from vlm.data.images import load_image

    ds = _Part(path, None, image_folder=image_root if image_root is not None else os.path.dirname(os.path.abspath(path)),
               allow_outside_root=allow_outside_root)
    side, with_images, unreadable = 0, 0, []
    for i in range(len(ds)):
        if with_images >= IMAGE_SIZE_SAMPLES:
            break
        try:
            images = ds.sample(i).images
        except DataError as e:  # an image the reader refuses (missing, outside the folder) names its file
            if getattr(e, "file", None) is not None:
                with_images += 1
                unreadable.append(str(e))
            continue  # else a bad sample is the data sets' business (skip_bad, max_bad_fraction)
        with_images += bool(images)
        for src in images:
            try:
                if isinstance(src, (str, os.PathLike)):
                    with Image.open(src) as im:  # reads the header only
                        w, h = im.size
                else:
                    w, h = load_image(src).size
                side = max(side, w, h)
            except (DataError, OSError) as e:
                unreadable.append(f"sample #{i}: image {src!r}: {e}" if isinstance(e, OSError) else str(e))
    if side:
        return side
    if not with_images:
        return None
    more = f"; and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
    raise ValueError(f"none of the images of its first {with_images} samples with images can be read "
                     f"({unreadable[0]}{more}); expected readable images (relative paths start from the data "
                     f"file's folder, or data.image_root), or set data.image_size=N (px) to size the model without "
                     f"measuring them")


@lru_cache(maxsize=8)
def _file_problem(path: str, mtime: float) -> str | None:
    """What is wrong with a data file as a whole (``data_records``), or None; once per file version (the resolver
    runs at every access)."""
    try:
        data_records(path)
    except OptionError as e:
        return e.problem
    return None


def data_image_size(path: Any, image_root: Any = None, allow_outside_root: Any = False) -> int | None:
    """``${vlm.image_size:PATH,ROOT[,ALLOW_OUTSIDE_ROOT]}``: the longest image side (px) among the first 64 samples
    of ``PATH`` that have images; ``None`` for a file without images (no image needs sizing: a recipe reads its own
    size, ``${vlm.or:${oc.select:data.image_size,null},48}``). A file that cannot be read as a whole, or whose
    images cannot be read, is a ``ConfigError`` naming ``data.train`` (the file is the mistake, not the size)."""
    if path is None or not Path(str(path)).exists():
        raise ConfigError(f"data.train={path!r}: does not exist; expected your training file (json, jsonl, parquet "
                          f"or a save_to_disk folder)")
    root = None if image_root in (None, "None") else str(image_root)
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"data.image_root={root!r}: not a folder; expected the folder your image paths are "
                          f"relative to (or leave it unset: each data file's own folder)")
    problem = _file_problem(str(path), os.path.getmtime(path))
    if problem is not None:
        raise ConfigError(f"data.train={path!r}: {problem}")
    try:
        return _image_size(str(path), root, os.path.getmtime(path), str(allow_outside_root).lower() == "true")
    except (DataError, OSError, ValueError) as e:
        raise ConfigError(f"data.train={path!r}: {e}") from e


def or_default(value: Any, default: Any) -> Any:
    """``${vlm.or:VALUE,DEFAULT}``: ``VALUE``, or ``DEFAULT`` when it is null (e.g. ``data.image_size`` of a file
    without images)."""
    return default if value is None or value == "None" else value


def cells(size: Any, stride: Any) -> int:
    """``${vlm.cells:SIZE,STRIDE}``: tokens of a ``SIZE`` px square image on a stride-``STRIDE`` grid,
    ``ceil(SIZE / STRIDE) ** 2`` (each stride-2 stage of a padded CNN rounds up)."""
    return math.ceil(int(size) / int(stride)) ** 2


def multiple(size: Any, of: Any) -> int:
    """``${vlm.multiple:SIZE,OF}``: ``SIZE`` rounded up to a multiple of ``OF`` (an input a stride-``OF`` tower
    takes whole)."""
    return math.ceil(int(size) / int(of)) * int(of)


def register_resolvers() -> None:
    for name, fn in (("vlm.image_size", data_image_size), ("vlm.cells", cells), ("vlm.multiple", multiple),
                     ("vlm.or", or_default)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
