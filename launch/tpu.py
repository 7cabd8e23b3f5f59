"""Run a config on a Cloud TPU pod (veclip_jax/cli/tpu.py):
python launch/tpu.py run --name=NAME --accelerator=v5p-256 --zone=Z --project=P --spot \
    --config=configs/vecap200m_b16.py --workdir=gs://BUCKET/run --watch"""

from veclip_jax.cli.tpu import run

if __name__ == "__main__":
    run()
