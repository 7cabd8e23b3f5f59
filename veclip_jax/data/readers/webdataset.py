"""img2dataset's webdataset output: tars whose samples are KEY.jpg (or .jpeg, .png, .webp), KEY.txt, KEY.json.

The members of one sample are consecutive in the tar (the webdataset
convention); a tar is streamed once, front to back, so it may be a pipe or a
file on a slow disk. `iter_tar_samples` reads the members, `sample_fields`
makes of them an image, captions and a URL, or the reason the sample is
unusable: the converter and the trainer's streamed reader both call it, so
the same tar gives the same samples whichever reads it.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from veclip_jax.data.readers.cells import caption_text

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_MEMBER_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))
log = logging.getLogger(__name__)
# tarfile reads a pax or GNU long-name header whole before it hands out the member it describes.
_MAX_HEADER_BYTES = 1 << 20
_LONG_HEADER_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose extended headers over _MAX_HEADER_BYTES end the tar (tarfile: ReadError)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _LONG_HEADER_TYPES and self.size > _MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)


# A member larger than this is never read: its sample is skipped as "bad_record". The size is the
# tar header's, known before a byte of the member is read; in a gzip-compressed tar it is what the
# read would decompress (a 1.5 MB .tar.gz held a 1.5 GB member). No real image or caption is near it.
MAX_MEMBER_BYTES = 64 << 20


def _split_member(name: str) -> tuple[str, str]:
    # The webdataset convention: the key is the path up to the first dot of the basename.
    directory, _, base = name.removeprefix("./").rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]] | str]:
    """(key, {extension: bytes}) per sample of a tar, or a skip reason (for the tar, or one sample).

    Only the image (IMAGE_EXTENSIONS), .txt and .json members are read; the
    first member of each extension wins. A tar that cannot be opened yields
    "missing_file" (not found, no permission, a directory) or
    "unreadable_file" (not a tar) and nothing else; a tar damaged part-way
    yields its samples up to the damage, then "unreadable_file" (the sample
    being read then is dropped: it may be incomplete). A sample with a member
    to read larger than MAX_MEMBER_BYTES yields "bad_record" in its place,
    that member unread; the tar goes on. Reasons: data/skips.py.
    """
    try:
        tar = tarfile.open(
            path, mode="r|*", tarinfo=_BoundedTarInfo
        )  # a stream: tars are read once, front to back
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        yield "missing_file"
        return
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        yield "unreadable_file"
        return
    key, members, oversized = None, {}, False
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield "bad_record" if oversized else (key, members)
                    key, members, oversized = member_key, {}, False
                if ext in _MEMBER_EXTENSIONS and ext not in members and not oversized:
                    if member.size > MAX_MEMBER_BYTES:
                        # Skipped, not read: the stream passes over it in bounded chunks.
                        log.warning(
                            "%s: member %s of %d bytes exceeds %d: sample skipped",
                            path,
                            member.name,
                            member.size,
                            MAX_MEMBER_BYTES,
                        )
                        oversized, members = True, {}
                        continue
                    members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        # The sample being read when the damage showed is incomplete: dropped with the rest.
        yield "unreadable_file"
        return
    if key is not None:
        yield "bad_record" if oversized else (key, members)


class TarSample(NamedTuple):
    """One tar sample: the image bytes (None: no image member), its captions as written, its URL."""

    image: bytes | None
    alt_text: str | None
    vecap_text: str | None
    url: str | None


def sample_fields(
    members: Mapping[str, bytes],
    *,
    image_field: str = "",
    alt_text_field: str = "txt",
    vecap_text_field: str = "none",
) -> TarSample | str:
    """The image, captions and URL of one tar sample, or the reason it is unusable (data/skips.py).

    Checks, in this order: "bad_record" (a .json member that is not a JSON
    object), "not_success" (its "status" is there and not "success": a failed
    img2dataset download), "bad_caption" (a caption that is not UTF-8 text).
    A caption field names a member ("txt") or a key of the .json
    ("json:caption"); "none" reads no caption. An AltText field "txt" without a
    .txt member reads the .json "caption" (img2dataset writes the caption to
    both). `image_field` "" takes the first of IMAGE_EXTENSIONS present.
    Captions are as written: cleaning, and the empty-caption and missing-image
    checks that follow, are the caller's.
    """
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:  # also UnicodeDecodeError
            return "bad_record"
        if not isinstance(meta, dict):
            return "bad_record"
    status = meta.get("status")
    if status is not None and status != "success":
        return "not_success"

    def field(name: str) -> str | None:
        if name == "none":
            return None
        if name.startswith("json:"):
            return caption_text(meta.get(name[5:]))
        return caption_text(members.get(name))

    try:
        alt = field(alt_text_field)
        if alt is None and alt_text_field == "txt" and "txt" not in members:
            alt = field("json:caption")
        vecap = field(vecap_text_field)
    except ValueError:
        return "bad_caption"
    if image_field:
        image = members.get(image_field)
    else:
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    url = meta.get("url")
    return TarSample(image, alt, vecap, url if isinstance(url, str) else None)
