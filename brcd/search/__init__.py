"""Hamming search over packed binary codes: the packed store, flat (exhaustive) and multi-index hashing."""

from __future__ import annotations

import zipfile
from typing import Any

from brcd.io import PathLike, existing_file
from brcd.search.flat import HammingIndex, PackedSearcher
from brcd.search.mih import MultiIndexHashingIndex
from brcd.search.packed import PackedCodeStore

__all__ = ["HammingIndex", "MultiIndexHashingIndex", "PackedCodeStore", "PackedSearcher", "load_index"]


def load_index(path: PathLike, **options: Any) -> HammingIndex | MultiIndexHashingIndex:
    """A :meth:`HammingIndex.save` file (``options``: its ``load``'s) or a :meth:`MultiIndexHashingIndex.save`
    one, by content; a missing or unreadable file is a one-line :class:`brcd.io.ArtifactError`."""
    path = existing_file(path, "index file ")
    if zipfile.is_zipfile(path):
        return MultiIndexHashingIndex.load(path)
    return HammingIndex.load(path, **options)
