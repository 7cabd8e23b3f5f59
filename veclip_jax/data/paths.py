"""Path specs: how every file list is written, on the command line and in configs.

One parser for all of them (the converter's inputs, `config.data.train_files`,
eval files), so that what one accepts the others accept too:

    /data/cc3m/{00000..00331}.tar                  332 names, zero-padded like the bounds
    /data/train-{00000..00003}-of-00004.array_record
    /data/{cc3m,cc12m}/*.tar                       brace lists, then sorted globs
    /data/a.tar,/data/b.tar                        a comma-separated list (commas in braces excepted)
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence


def _split_top_level_commas(spec: str) -> list[str]:
    # Commas inside braces belong to a brace list ("{a,b}.tar"), not to the spec's list.
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return items


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.fullmatch(body)
    if numeric:
        a, b = numeric.groups()
        # Zero-padded bounds ("00000..00331") give zero-padded names, as in img2dataset's output.
        padded = (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0")
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = [match.group(0)]  # "{x}" is not a pattern: keep it literally
    head, rest = pattern[: match.start()], _expand_braces(pattern[match.end() :])
    return [head + option + tail for option in options for tail in rest]


def expand_paths(spec: str | Sequence[str], *, what: str = "files") -> list[str]:
    """Paths from a spec: comma-separated paths, brace ranges and globs (or a list of them).

    `/data/cc3m/{00000..00331}.tar` expands to 332 names (zero-padded like its
    bounds), `{a,b}` to both, `~` to the home directory; a list's items are
    not split at commas. Globs are sorted and must match something (else
    FileNotFoundError "no {what} match PATTERN"). Plain names are kept whether
    or not the file exists: the caller decides (a converter counts missing
    inputs, a training run refuses them). Duplicates are dropped, first kept.
    """
    items = _split_top_level_commas(spec) if isinstance(spec, str) else [str(s) for s in spec]
    paths: list[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        for pattern in _expand_braces(os.path.expanduser(item)):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise FileNotFoundError(f"no {what} match {pattern!r}")
                paths.extend(matches)
            else:
                paths.append(pattern)
    return list(dict.fromkeys(paths))
