"""Input data: ArrayRecord shards, caption mixing, tokenizer, the grain pipeline, demo data.

records    the shard format (msgpack v1) with a writer and a reader
captions   VeCLIP's AltText/VeCap mixing and caption cleaning
tokenizer  sentencepiece in T5's convention (pad 0, eos 1, unk 2), training CLI
image_ops  decoding (simplejpeg, PIL fallback), RandomResizedCrop, CLIP normalisation
sources    training sources: ArrayRecord shards, WebDataset tars, Parquet files; mixtures by weight
pipeline   make_train_iterator: sources -> per-process batches, resumable
demo       ensure_demo_data: coloured shapes with web-like AltTexts and VeCap captions
seeds      per-example randomness from (seed, epoch, record index)
paths      the one path-spec syntax: comma lists, {a..b} ranges, {x,y} lists, globs
readers/   raw formats: webdataset tars, VeCap JSON (+ URL index), CSV/TSV tables, ImageFolders, Parquet
convert    the offline converter: raw pairs -> ArrayRecord shards (launch/make_dataset.py)

See veclip_jax/data/README.md.
"""
