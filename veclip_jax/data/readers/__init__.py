"""Readers of raw image-text inputs, shared by the converter (data/convert.py) and whatever else streams them.

webdataset   img2dataset's tars: iter_tar_samples(path) -> (key, {extension: bytes}) per sample
vecap_json   VeCLIP's VeCap captions {url: caption}: a streaming JSON reader, an SQLite index by URL
table        CSV/TSV tables of image paths and captions: TableColumns, Row, read_table

None of them imports the converter.
"""
