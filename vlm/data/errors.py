"""Errors raised by the data pipeline.

``DataError`` is a ``ValueError`` so callers that already guard against bad values catch it; its message always names
what is known of the sample id, the file and the problem, e.g.
``sample 'coco/42': image 'train/42.jpg': cannot identify image file``.
"""
from __future__ import annotations

import os
from typing import Any


class DataError(ValueError):
    """A record, image or box that cannot be used.

    Attributes: ``problem`` (str), ``sample_id`` (or ``None``), ``file`` (path/URL string, or ``None``).
    """

    def __init__(self, problem: str, *, sample_id: Any = None, file: str | os.PathLike | None = None) -> None:
        self.problem = problem
        self.sample_id = sample_id
        self.file = None if file is None else str(file)
        where = []
        if sample_id is not None:
            where.append(f"sample {sample_id!r}")
        if self.file is not None:
            where.append(f"image {self.file!r}")
        super().__init__(": ".join(where + [problem]))

    def __reduce__(self):  # keep picklable across DataLoader workers (keyword-only args)
        return (_rebuild, (self.problem, self.sample_id, self.file))


def _rebuild(problem: str, sample_id: Any, file: str | None) -> DataError:
    return DataError(problem, sample_id=sample_id, file=file)
