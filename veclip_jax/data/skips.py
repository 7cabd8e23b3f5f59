"""Why an example is skipped: one vocabulary for the converter's summary and the trainer's counters.

A sample that cannot become a training example is skipped, never silently:
the converter (data/convert.py) counts it in its summary, the trainer
(data/skip_and_batch.py) in its batches' "bad_counts" and the logged
counters ("bad_record", "missing_image/NAME", ...). Both use the names of
REASONS, so a skip means the same whichever reads the sample, and the same
tar read both ways gives the same counts (tests/test_data_convert.py).

A sample counts once, under the first check it fails, in the order of
REASONS (file, then record, then metadata, captions, image). Only some
reasons can occur on each side: BAD_REASONS are the trainer's (their order
is that of its count arrays: append, never reorder), CONVERTER_REASONS the
converter's.
"""

from __future__ import annotations

REASONS: dict[str, str] = {
    "missing_file": "an input tar or Parquet file that does not exist or cannot be opened (one per file)",
    "unreadable_file": "a tar or Parquet file that is not one, is damaged part-way (one, where it shows), "
    "or has a Parquet row group over readers/parquet.py's MAX_ROW_GROUP_BYTES (one, nothing read)",
    "empty_file": "a readable tar or Parquet file without a sample (one per file)",
    "bad_record": "bytes that are not a record (a damaged shard chunk, a newer format); a bad .json; a tar "
    "member over readers/webdataset.py's MAX_MEMBER_BYTES (not read)",
    "bad_row": "a table row that is not UTF-8 or that the csv module cannot parse (file and line logged)",
    "not_success": "the .json status is present and not 'success' (a failed img2dataset download)",
    "bad_caption": "a caption that is not UTF-8 text (bytes that do not decode, a number)",
    "empty_caption": "neither an AltText nor a VeCap caption left after cleaning",
    "missing_image": "no image: no image member (tar), an empty image cell (Parquet) or path (table)",
    "image_not_found": "table: the image file a row names does not exist or cannot be read",
    "image_outside_root": "table, Parquet, folder: the image path resolves outside --image_root (refused)",
    "duplicate_key": "a key already written to the same output shard",
    "undecodable_image": "no decoder reads the image bytes",
}

# The trainer's reasons, in the order of its per-batch count arrays (checkpoints store them by name).
BAD_REASONS = (
    "bad_record",
    "empty_caption",
    "undecodable_image",
    "missing_image",
    "bad_caption",
    "unreadable_file",
    "empty_file",
    "not_success",
)
# The converter's reasons, in the order its summary lists them.
CONVERTER_REASONS = tuple(r for r in REASONS if r != "empty_file")
