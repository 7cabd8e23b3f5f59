"""Run a config on a SLURM GPU cluster (veclip_jax/cli/slurm.py):
python launch/slurm.py --nodes=4 --gpus_per_node=8 --config=configs/vecap200m_b16.py \
    --workdir=/shared/ckpt/vecap200m_b16 [--dry_run]"""

from veclip_jax.cli.slurm import run

if __name__ == "__main__":
    run()
