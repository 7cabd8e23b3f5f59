"""img2dataset's webdataset output: tars whose samples are KEY.jpg (or .jpeg, .png, .webp), KEY.txt, KEY.json.

The members of one sample are consecutive in the tar (the webdataset
convention); a tar is streamed once, front to back, so it may be a pipe or a
file on a slow disk.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MEMBER_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))


def _split_member(name: str) -> tuple[str, str]:
    # The webdataset convention: the key is the path up to the first dot of the basename.
    directory, _, base = name.removeprefix("./").rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]] | str]:
    """(key, {extension: bytes}) per sample of a tar, or a skip reason for the tar itself.

    Only the image (IMAGE_EXTENSIONS), .txt and .json members are read; the
    first member of each extension wins. A tar that cannot be opened yields
    "missing_input" (not found, no permission, a directory) or
    "unreadable_input" (not a tar) and nothing else; a tar damaged part-way
    yields its samples up to the damage, then "unreadable_input" (the sample
    being read then is dropped: it may be incomplete).
    """
    try:
        tar = tarfile.open(path, mode="r|*")  # a stream: tars are read once, front to back
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        yield "missing_input"
        return
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        yield "unreadable_input"
        return
    key, members = None, {}
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                if ext in _MEMBER_EXTENSIONS and ext not in members:
                    members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        # The sample being read when the damage showed is incomplete: dropped with the rest.
        yield "unreadable_input"
        return
    if key is not None:
        yield key, members
