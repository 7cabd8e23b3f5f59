"""Evaluate a model (veclip_jax/cli/eval.py):
python launch/eval.py --model=PATH --tasks=imagenet,imagenet_v2,coco,flickr30k --data_dir=DIR"""

from veclip_jax.cli.eval import run

if __name__ == "__main__":
    run()
