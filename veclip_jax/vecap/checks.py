"""Rule checks, no model: the AltText's class, the checks every model output passes, the check verdict.

AltText classes (`classify_alt_text`), decided before the fusion step:

  text    an AltText with something to keep: fused with the visual caption by the LLM
  empty   None, or nothing left after the loader's cleaning (captions.clean_caption)
  url     a URL, a domain or a bare file name ("http://x.org/a.jpg", "IMG_4821.jpg")
  noise   boilerplate without content: only generic web words ("image", "click here to enlarge",
          "thumbnail"), camera or screenshot names ("DSC01234", "screenshot_2231"), or fewer
          than two letters

An AltText that is empty, a URL or noise has no fact for the fusion to keep: the VeCap caption is
then the visual caption itself (prompts.py).

Output checks (`output_problem`), on the visual caption and on the VeCap caption: "empty"
(nothing left after cleaning and stripping labels), "repetitive" (a word or phrase looping: a
word over half of 6+ words, a word 3-gram three times, a character run of 8), "too_long" (over
`max_words` words: far longer than asked, a model rambling). A caption failing one is dropped and
counted under STAGE_REASON (e.g. visual_repetitive).
"""

from __future__ import annotations

import collections
import re

from veclip_jax.data.captions import clean_caption

ALT_CLASSES = ("text", "empty", "url", "noise")

_URL = re.compile(
    r"^(?:[a-z][a-z0-9+.-]*://|www\.)\S+$|^\S+\.(?:com|org|net|edu|gov|io|co|de|uk|fr|jp|ru|cn)(?:/\S*)?$",
    re.IGNORECASE,
)
_FILE = re.compile(r"^[\w\-. ()]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|heic|avif)$", re.IGNORECASE)
_CAMERA = re.compile(
    r"^(?:img|dsc|dscn|dscf|pic|photo|image|screenshot|scan|untitled|p|mvimg|pxl)"
    r"[\s_\-(]*\d[\d_\-() ]*$",
    re.IGNORECASE,
)
# Words that carry no content on their own: a caption made only of these (and numbers) is noise.
GENERIC_WORDS = frozenset(
    """
a an the of for to and or in on at by with from this that here there is are be my our your
image images img photo photos picture pictures pic pics thumbnail thumb icon logo banner placeholder
untitled default click tap enlarge zoom view open close more read see full size large small
home page homepage menu button link loading spinner header footer background bg avatar profile
screenshot screen shot copy final new stock free download jpg jpeg png gif webp file
""".split()
)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_LABEL = re.compile(
    r"^(?:visual caption|vecap caption|new caption|caption|answer|description)\s*:\s*", re.IGNORECASE
)


def classify_alt_text(alt_text: str | None) -> str:
    """One of ALT_CLASSES: how the fusion step treats this AltText (see the module docstring)."""
    text = clean_caption(alt_text)
    if not text:
        return "empty"
    if " " not in text and (_URL.match(text) or _FILE.match(text)):
        return "url"
    if _FILE.match(text) or _CAMERA.match(text):
        return "url" if _FILE.match(text) else "noise"
    words = [w.lower() for w in _WORD.findall(text)]
    if sum(len(w) for w in words) < 2 or all(w in GENERIC_WORDS for w in words):
        return "noise"
    return "text"


def clean_output(text: str | None) -> str:
    """A model's answer as a caption: cleaned, its first paragraph, a leading label and quotes removed."""
    if not text:
        return ""
    text = text.strip().split("\n\n")[0]
    text = clean_caption(text)
    text = _LABEL.sub("", text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def output_problem(text: str, *, max_words: int) -> str | None:
    """Why a cleaned caption is not kept ("empty", "repetitive", "too_long"), or None if it is fine."""
    words = [w.lower() for w in text.split()]
    if not words or not _WORD.search(text):
        return "empty"
    if re.search(r"(.)\1{7,}", text):
        return "repetitive"
    if len(words) >= 6 and collections.Counter(words).most_common(1)[0][1] * 2 > len(words):
        return "repetitive"
    trigrams = collections.Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and trigrams.most_common(1)[0][1] >= 3:
        return "repetitive"
    if len(words) > max_words:
        return "too_long"
    return None


# The answers of the check prompt: the first token of each spelling is read, "yes" keeps the caption.
YES_ANSWERS = ("yes", "Yes", "YES", " yes", " Yes")
NO_ANSWERS = ("no", "No", "NO", " no", " No")


def verdict(scores: dict[str, float]) -> bool:
    """Whether the check keeps a caption, from the best score of each answer ({"yes": s, "no": s}).

    Ties keep the caption: a model that cannot tell is not evidence of harm (counted as kept).
    """
    return scores["yes"] >= scores["no"]
