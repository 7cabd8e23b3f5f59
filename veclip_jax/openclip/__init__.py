"""open_clip interop: its checkpoints in (`veclip_jax.load`, init_from) and out (launch/export.py)."""
