"""Export a checkpoint to a HuggingFace CLIP directory (veclip_jax/cli/export.py):
python launch/export.py --checkpoint=workdir/demo --out=exported/demo"""

from veclip_jax.cli.export import run

if __name__ == "__main__":
    run()
