"""Compile a config's train step for a TPU pod on this host (veclip_jax/cli/compile.py):
python launch/compile.py --config=configs/vecap200m_b16.py --topology=v5p:4x4x8"""

from veclip_jax.cli.compile import run

if __name__ == "__main__":
    run()
