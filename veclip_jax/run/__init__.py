"""The files of a run and what reads them: a layer below the trainer (train/) and evaluation (eval/).

  workdir.py     the workdir's layout and lock, the run's tokenizer, its metrics files, and
                 `run_path`: the one reading of a "workdir / checkpoints dir / step dir" path
  checkpoint.py  the checkpoint reader (parameters and metadata; train/checkpoint.py writes them)
  inference.py   jitted, sharded encoders (pooled and token-wise)
  load.py        a model with its tokenizer and preprocessing, as `veclip_jax.load` gives it

Nothing here imports train/ or eval/: loading, exporting and evaluating a
model need neither the trainer nor (for loading and export) the evaluation
package.
"""
