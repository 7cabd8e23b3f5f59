"""The same train step in HF transformers / PyTorch: the baseline on a CPU.

  # torch==2.13.0 (the CPU build) is in requirements.txt, for the export checks and this baseline
  python -m veclip_jax.bench.torch_step --config=configs/base.py:B/16 --config.batch_size=8

Builds `transformers.CLIPModel` with the config's tower sizes, and times
forward (CLIP loss) + backward + AdamW, as veclip_jax.bench.step does for ours.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from veclip_jax import defaults
from veclip_jax.hf.to_hf import hf_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (default: veclip_jax/defaults.py, the tiny model)."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")


def main(_: list[str]) -> None:
    import torch
    import transformers

    config = _CONFIG.value or defaults.get_config()
    torch.manual_seed(config.seed)
    model = transformers.CLIPModel(hf_config(config.model)).train()  # the exporter's config: same model
    o = config.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    rng = np.random.default_rng(0)
    v, t = config.model.vision, config.model.text
    b = config.batch_size
    tokens = rng.integers(3, t.vocab_size, size=(b, t.context_length))
    tokens[:, -1] = t.eos_id
    pixels = torch.tensor(rng.normal(size=(b, 3, v.image_size, v.image_size)), dtype=torch.float32)
    ids = torch.tensor(tokens, dtype=torch.long)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        if o.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        opt.step()
        return float(loss)

    step()  # warm-up
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    n = sum(p.numel() for p in model.parameters())
    print(
        f"model            HF CLIPModel, {config.model.size} sizes ({n / 1e6:.1f}M params), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"global batch     {b}")
    print(f"step (median)    {step_s * 1e3:.1f} ms over {len(times)} steps (min {min(times) * 1e3:.1f})")
    print(f"images/s         {b / step_s:.1f}")
    print(f"loss             {loss:.4f}")


if __name__ == "__main__":
    app.run(main)
