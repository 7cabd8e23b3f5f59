"""Readers of raw image-text inputs, shared by the converter (data/convert.py) and whatever else streams them.

webdataset   img2dataset's tars: iter_tar_samples(path) -> (key, {extension: bytes}) per sample,
             sample_fields -> image, captions, URL (the converter's and the trainer's one parsing)
parquet      Parquet tables: iter_parquet_rows (converter), row_fields (trainer's streamed reader)
cells        the one rule for a caption cell (UTF-8 text, else bad_caption)
vecap_json   VeCLIP's VeCap captions {url: caption}: a streaming JSON reader, an SQLite index by URL
table        CSV/TSV tables of image paths and captions: TableColumns, Row, read_table

None of them imports the converter.
"""
