"""Images of a request: ``image_url`` parts -> decoded ``PIL.Image``s, each checked before the model sees it.

Accepted URLs: ``data:image/...;base64,...`` always; ``file://`` paths only under ``--image-root`` (the path is
resolved, ``..`` and symlinks included, and must stay inside the resolved root); ``http(s)://`` only with
``--allow-urls`` (fetched with a timeout and the body size limit). An image is refused before it is decoded when its
width x height exceeds ``--max-image-pixels``. Every refusal is an ``APIError`` 400 naming the message and part.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from vlm.serve.errors import bad_request

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.ASCII)


@dataclass
class ImagePolicy:
    """What the server accepts: ``root`` (``--image-root``, ``None``: no ``file://``), ``allow_urls``,
    ``max_pixels`` (width x height) and ``max_bytes`` of a fetched image."""

    root: Path | None = None
    allow_urls: bool = False
    max_pixels: int = 4096 * 4096
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0

    def open(self, url: str, where: str) -> Image.Image:
        """The image at ``url`` (decoded, RGB as ``vlm.data.images.load_image`` gives it); ``where`` names the
        part in errors (``messages[0].content[1].image_url.url``)."""
        if url.startswith("data:"):
            return self._decode(self._data(url, where), where)
        scheme = urlparse(url).scheme.lower()
        if scheme == "file":
            return self._decode(self._file(url, where), where)
        if scheme in ("http", "https"):
            if not self.allow_urls:
                raise bad_request(f"{where}: remote image URLs are refused ({url[:80]!r}); send the image as a "
                                  f"base64 data: URL, or start the server with --allow-urls", param=where,
                                  code="image_url_refused")
            return self._decode(self._fetch(url, where), where)
        raise bad_request(f"{where}: unsupported image URL {url[:80]!r}; expected a data:image/...;base64, URL, "
                          f"a file:// path under --image-root or (with --allow-urls) an http(s) URL", param=where,
                          code="invalid_image_url")

    def _data(self, url: str, where: str) -> bytes:
        m = _DATA_URL.match(url)
        if m is None or not m.group("b64"):
            raise bad_request(f"{where}: malformed data URL; expected data:image/<type>;base64,<payload>",
                              param=where, code="invalid_image_url")
        try:
            return base64.b64decode(url[m.end():], validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"{where}: the data URL's payload is not valid base64 ({e})", param=where,
                              code="invalid_base64") from None

    def _file(self, url: str, where: str) -> bytes:
        if self.root is None:
            raise bad_request(f"{where}: file:// image URLs are refused; start the server with --image-root DIR to "
                              f"serve images from DIR", param=where, code="image_url_refused")
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{where}: file:// URL with host {parsed.netloc!r}; expected file:///path",
                              param=where, code="invalid_image_url")
        root = os.path.realpath(self.root)
        path = os.path.realpath(unquote(parsed.path))   # resolves .. and every symlink on the way
        if os.path.commonpath([root, path]) != root:
            raise bad_request(f"{where}: {unquote(parsed.path)!r} resolves outside --image-root {root!r}; refused",
                              param=where, code="image_path_outside_root")
        if not os.path.isfile(path):
            raise bad_request(f"{where}: no such image file {unquote(parsed.path)!r} under --image-root",
                              param=where, code="image_not_found")
        if os.path.getsize(path) > self.max_bytes:
            raise bad_request(f"{where}: the image file is larger than {self.max_bytes} bytes", param=where,
                              code="image_too_large")
        return Path(path).read_bytes()

    def _fetch(self, url: str, where: str) -> bytes:
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.timeout_s, follow_redirects=False) as r:
                r.raise_for_status()
                data = b""
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise bad_request(f"{where}: the image at {url[:80]!r} is larger than {self.max_bytes} "
                                          f"bytes", param=where, code="image_too_large")
                return data
        except httpx.HTTPError as e:
            raise bad_request(f"{where}: could not fetch {url[:80]!r}: {e}", param=where,
                              code="image_fetch_failed") from None

    def _decode(self, data: bytes, where: str) -> Image.Image:
        from vlm.data.errors import DataError
        from vlm.data.images import load_image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
                w, h = img.size
                if w * h > self.max_pixels:
                    raise bad_request(f"{where}: the image is {w}x{h} = {w * h} pixels, more than --max-image-pixels "
                                      f"{self.max_pixels}", param=where, code="image_too_large")
                return load_image(img, sample_id=where)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            reason = type(e).__name__ if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
            raise bad_request(f"{where}: not an image that can be opened ({reason}); expected PNG, "
                              f"JPEG, WebP, GIF or another format Pillow reads", param=where,
                              code="invalid_image") from None
        except (DataError, OSError, SyntaxError, ValueError) as e:
            raise bad_request(f"{where}: the image cannot be decoded: {e}", param=where,
                              code="invalid_image") from None
