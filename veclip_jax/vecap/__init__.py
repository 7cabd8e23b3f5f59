"""VeCap for anyone's images: VeCLIP's caption-rewriting pipeline on Ray Data (launch/make_vecap.py).

prompts    our default caption / check / fusion prompts (the paper's were never published), their hashes
checks     rule checks without a model: AltText classes (empty, URL, noise, text), output checks (empty,
           repetitive, far too long), the check's verdict
generate   the models, loaded once per Ray actor from local HuggingFace directories: transformers'
           batched greedy `generate`, or vLLM when it is importable on a GPU host
options    what a run is asked: models, prompts, decoding (CaptionOptions), resources (Resources)
shards     the input shards (the converter's planning and readers) and the read stage
stages     the model stages as Ray actors: caption; rule checks, LLM check and fusion
pipeline   the Ray Data plan, the per-shard JSON + Parquet writer, resume, the output's lock, the summary
progress   images/s per stage and the ETA on the console
cost       the --dry_run plan (shards, images, tokens), the cost model, --measure on real models
"""
