"""Input data: ArrayRecord shards, caption mixing, tokenizer, the grain pipeline, demo data.

records    the shard format (msgpack v1) with a writer and a reader
captions   VeCLIP's AltText/VeCap mixing and caption cleaning
tokenizer  sentencepiece in T5's convention (pad 0, eos 1, unk 2), training CLI
image_ops  decoding (simplejpeg, PIL fallback), RandomResizedCrop, CLIP normalisation
sources    training sources: ArrayRecord shards, WebDataset tars, Parquet files; mixtures by weight
lane_streams  a reader lane's files: round-robin, window shuffle, resumable positions
pipeline   make_train_iterator: sources -> per-process batches, resumable (assembles the next four)
preprocess  one example: record or sample -> the batch keys asked for (crop, tokens, views, ...)
skips      why an example is skipped: one vocabulary for the trainer and the converter
skip_and_batch  skip bad examples, batch, count skips by source and reason
workers    worker processes or a prefetch thread, and the workers' lifetime
train_iterator  TrainIterator and its checkpointed state
demo       ensure_demo_data: coloured shapes with web-like AltTexts and VeCap captions
seeds      per-example randomness from (seed, epoch, record index)
paths      the one path-spec syntax: comma lists, {a..b} ranges, {x,y} lists, globs
readers/   raw formats: webdataset tars, VeCap JSON (+ URL index), CSV/TSV tables, ImageFolders, Parquet
convert    the offline converter: raw pairs -> ArrayRecord shards (launch/make_dataset.py);
           convert_shard writes one shard, convert_run runs the shards and sums up

See veclip_jax/data/README.md.
"""
