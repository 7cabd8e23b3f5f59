"""Write VeCap captions for your own images (veclip_jax/cli/make_vecap.py):
python launch/make_vecap.py --webdataset='/data/{00000..00331}.tar' --captioner=/models/llava \\
    --fuser=/models/llm --out=/data/vecap/vecap"""

from veclip_jax.cli.make_vecap import run

if __name__ == "__main__":
    run()
