"""Our default prompts for the three model steps, and the hashes that name them in the provenance.

VeCLIP's prompts, models and decoding settings were never published (facts: VECLIP_NOTES.md 1.1):
the repo's diagram names a "visual exploitation prompt" for the LLaVA caption, an "LLM ethical
check" and an "LLM knowledge fusion" of AltText and caption, and its examples keep the AltText's
names and facts. The texts below are ours, written to that description; every one can be replaced
on the command line (--caption_prompt, --check_prompt, --fusion_prompt) and each caption's
provenance row names the prompts it was made with by their hash (`prompt_hash`).

* The caption prompt asks for one short sentence of visible concepts (objects, colours, counts,
  layout, setting), without guessing names: names come from the AltText in the fusion step. Short,
  because the caption must fit a 77-token text tower and long LLaVA outputs hallucinate more.
* The check prompt asks a yes/no question about the caption; the answer is read as a one-token
  choice between the yes and the no tokens (checks.py `verdict`), so it is never unreadable.
* The fusion prompt is few-shot: four worked examples (names and a registration, people and a
  date, a fact wrapped in shop boilerplate, a plain label). Which AltTexts reach it is decided by
  rules first (checks.py `classify_alt_text`): an empty AltText, a URL or file name, or
  boilerplate noise carries no fact to keep, so the VeCap caption is then the visual caption
  itself and the LLM is not asked (cheaper, and nothing is invented from noise).
"""

from __future__ import annotations

import hashlib

# Placeholders: {alt_text} and {caption} in the fusion prompt, {caption} in the check prompt.
CAPTION_PROMPT = (
    "Describe the image concisely in one sentence of less than 20 words: the main objects, their "
    "colours, counts and positions, and the setting. Do not guess names, brands or places."
)

CHECK_PROMPT = (
    "Here is a caption written for an image:\n"
    '"{caption}"\n'
    "Is this caption free of harmful, hateful, sexual, violent or personal content, and suitable for "
    "a public dataset? Answer yes or no."
)

FUSION_PROMPT = """\
Write one concise caption (less than 40 words) for an image, fusing two sources: the AltText \
written by a person on the web, and a visual caption written by a model that saw the image. Keep \
every name, number and fact of the AltText that fits the image (people, places, brands, models, \
dates); keep the visual concepts of the caption (objects, colours, layout, setting). When they \
disagree on what is visible, trust the visual caption. Answer with the caption only.

AltText: Boeing 737-800 N8606C Southwest Airlines at LAX
Visual caption: A large blue and orange airplane is taking off from a runway under a clear sky.
Caption: A blue and orange Southwest Airlines Boeing 737-800, registration N8606C, taking off from \
a runway at LAX under a clear sky.

AltText: Anna and Tom's wedding, June 2019
Visual caption: A bride in a white dress and a groom in a dark suit stand under a tree.
Caption: Anna and Tom on their wedding day in June 2019, the bride in a white dress and the groom \
in a dark suit, standing under a tree.

AltText: handmade ceramic mug - free shipping - buy now
Visual caption: A white mug with blue stripes sits on a wooden table next to a plant.
Caption: A handmade white ceramic mug with blue stripes on a wooden table next to a plant.

AltText: Golden retriever puppy
Visual caption: A small dog with light brown fur lies on green grass holding a red ball.
Caption: A golden retriever puppy with light brown fur lying on green grass with a red ball.

AltText: {alt_text}
Visual caption: {caption}
Caption:"""


def prompt_hash(text: str) -> str:
    """A short, stable name for a prompt's exact text (16 hex digits of its SHA-256)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_placeholders(name: str, text: str, needed: tuple[str, ...]) -> None:
    """Raises ValueError naming the flag when a prompt lacks one of its placeholders."""
    missing = [p for p in needed if "{" + p + "}" not in text]
    if missing:
        raise ValueError(f"--{name} must contain {', '.join('{' + p + '}' for p in missing)}")


def fill(template: str, **values: str) -> str:
    """The template with its placeholders filled; other braces in it are kept as they are."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template
