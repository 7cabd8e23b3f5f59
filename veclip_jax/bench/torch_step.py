"""The same train step in PyTorch: HF transformers' CLIPModel or open_clip's CLIP, the baselines on a CPU.

  # torch==2.13.0 (the CPU build) is in requirements.txt, for the export checks and this baseline
  python -m veclip_jax.bench.torch_step --config=configs/base.py:B/16 --config.batch_size=8
  python -m veclip_jax.bench.torch_step --config=configs/base.py:RN50 --config.batch_size=8 --peer=open_clip
  # on a GPU (a CUDA torch, scripts/bench_gpu.sh installs one): bf16 autocast, SDPA attention
  python -m veclip_jax.bench.torch_step --config=configs/base.py:B/16 --config.batch_size=256 \
      --peer=open_clip --device=cuda --precision=bf16

`--peer=hf` builds `transformers.CLIPModel` with the config's tower sizes (the HF exporter's config;
it has no ResNet); `--peer=open_clip` builds `open_clip.CLIP` from the open_clip exporter's
model_cfg (veclip_jax/openclip/config.py: for RN50 the sizes of open_clip's `create_model("RN50")`)
and its `ClipLoss`. Either times forward (CLIP loss) + backward + AdamW, as veclip_jax.bench.step
does for ours. open_clip imports torchvision, which cannot share a process with this project's
CPU torch (tests/openclip_ref.py says why): its step runs in a process of its own, through
tests/openclip_ref.py's `import_open_clip()` (so from a clone, after `make setup`).

On a GPU (--device=cuda, or auto with a CUDA torch) the open_clip step is what a user would
otherwise run: fp32 parameters under `torch.autocast(bfloat16)` (open_clip's --precision amp_bf16),
attention through PyTorch's scaled_dot_product_attention (open_clip's nn.MultiheadAttention calls
it with need_weights=False), TF32 matmuls allowed; the report adds the peak CUDA memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from veclip_jax import defaults
from veclip_jax.errors import UserError


def _define_flags() -> tuple[Any, Any, Any]:
    """The command line's flags, defined only when run as a script: importing this module (tests,
    bench.step beside it) defines no absl flag, so it never clashes with another entry point's."""
    return (
        config_flags.DEFINE_config_file(
            "config", None, "Experiment config file (default: veclip_jax/defaults.py, the tiny model)."
        ),
        flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step)."),
        flags.DEFINE_enum(
            "peer", "hf", ["hf", "open_clip"], "Whose torch model: HF transformers or open_clip."
        ),
        flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "open_clip: auto = cuda if there."),
        flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "open_clip: bf16 = autocast to bfloat16."),
    )


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPENCLIP_REF = os.path.join(ROOT, "tests", "openclip_ref.py")


def time_steps(step: Callable[[], float], steps: int) -> tuple[list[float], float]:
    """(seconds of each of `steps` timed calls after one warm-up call, the last loss)."""
    step()  # warm-up
    times = []
    loss = float("nan")
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return times, loss


def report(model: str, batch: int, times: list[float], loss: float, memory: int | None = None) -> str:
    """The lines both peers print (the step's median, images/s, loss; the peak memory on a GPU)."""
    step_s = float(np.median(times))
    lines = [
        f"model            {model}",
        f"global batch     {batch}",
        f"step (median)    {step_s * 1e3:.1f} ms over {len(times)} steps (min {min(times) * 1e3:.1f})",
        f"images/s         {batch / step_s:.1f}",
        f"loss             {loss:.4f}",
    ]
    if memory is not None:
        lines.append(f"peak memory      {memory / 2**30:.2f} GiB (device 0)")
    return "\n".join(lines)


def random_inputs(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [B, 3, S, S] float32, token ids [B, L] int64 ending in end-of-text), seeded."""
    rng = np.random.default_rng(0)
    v, t = config.model.vision, config.model.text
    b = config.batch_size
    tokens = rng.integers(3, t.vocab_size - 1, size=(b, t.context_length))
    tokens[:, -1] = t.eos_id
    pixels = rng.normal(size=(b, 3, v.image_size, v.image_size)).astype(np.float32)
    return pixels, tokens


def adamw(torch: Any, params: Any, o: Any) -> Any:
    """torch's AdamW with the config's optimizer settings (config.optim)."""
    return torch.optim.AdamW(
        params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )


def hf_step(config: Any, steps: int) -> str:
    """The HF transformers CLIPModel step with the config's tower sizes; its report."""
    import torch
    import transformers

    from veclip_jax.hf.to_hf import hf_config

    torch.manual_seed(config.seed)
    model = transformers.CLIPModel(hf_config(config.model)).train()  # the exporter's config: same model
    o = config.optim
    opt = adamw(torch, model.parameters(), o)
    pixels, tokens = (torch.tensor(x) for x in random_inputs(config))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        if o.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        opt.step()
        return float(loss)

    times, loss = time_steps(step, steps)
    n = sum(p.numel() for p in model.parameters())
    name = f"HF CLIPModel, {config.model.size} sizes ({n / 1e6:.1f}M params), torch {torch.__version__}, "
    return report(name + f"{torch.get_num_threads()} threads", config.batch_size, times, loss)


def open_clip_step(args: dict[str, Any]) -> str:
    """open_clip's CLIP step (run in the process `run_open_clip` starts, open_clip imported there):
    `args` holds the open_clip model_cfg, the config as a dict, and the number of steps."""
    import ml_collections
    import open_clip
    import torch

    config = ml_collections.ConfigDict(args["config"])
    device = args.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = args.get("precision", "fp32") == "bf16"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    model = open_clip.CLIP(**args["model_cfg"], output_dict=True).to(device).train()
    loss_fn = open_clip.ClipLoss()
    o = config.optim
    opt = adamw(torch, model.parameters(), o)
    pixels, tokens = (torch.tensor(x).to(device) for x in random_inputs(config))
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
    # What the matmuls really ran in (the Linear layers' outputs), reported beside the precision asked.
    seen: set[str] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.add(str(out.dtype).removeprefix("torch.")))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(pixels, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        if o.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        opt.step()
        return float(loss)

    times, loss = time_steps(step, args["steps"])  # float(loss) waits for the device
    n = sum(p.numel() for p in model.parameters())
    name = f"open_clip {open_clip.__version__} CLIP, {config.model.size} sizes ({n / 1e6:.1f}M params), "
    precision = f"{'bf16 autocast' if bf16 else 'fp32'} (matmuls in {'/'.join(sorted(seen))})"
    if device == "cuda":
        name += f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {precision}"
        return report(name, config.batch_size, times, loss, torch.cuda.max_memory_allocated())
    name += f"torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}"
    return report(name, config.batch_size, times, loss)


def run_open_clip(config: Any, steps: int, device: str = "auto", precision: str = "fp32") -> str:
    """`open_clip_step` in a fresh process (open_clip imported through tests/openclip_ref.py)."""
    from veclip_jax.openclip.config import open_clip_model_cfg

    if not os.path.exists(OPENCLIP_REF):
        raise UserError(f"--peer=open_clip runs from a clone: {OPENCLIP_REF} is missing")
    model_cfg = open_clip_model_cfg(config.model, hf_tokenizer=False, pool_type="argmax")
    args = {"model_cfg": model_cfg, "config": config.to_dict(), "steps": steps, "device": device,
            "precision": precision}  # fmt: skip
    args = json.dumps(args, default=list)
    prog = (
        f"import sys, json; sys.path.insert(0, {os.path.dirname(OPENCLIP_REF)!r})\n"
        "from openclip_ref import import_open_clip\n"
        "import_open_clip()\n"
        "from veclip_jax.bench.torch_step import open_clip_step\n"
        "print(open_clip_step(json.loads(sys.stdin.read())))\n"
    )
    run = subprocess.run([sys.executable, "-c", prog], input=args, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        raise UserError(f"open_clip's step failed:\n{run.stderr[-3000:]}")
    return run.stdout.strip()


def main(_: list[str]) -> None:
    config = _CONFIG.value or defaults.get_config()
    try:
        if _PEER.value == "hf":
            print(hf_step(config, _STEPS.value))
        else:
            print(run_open_clip(config, _STEPS.value, _DEVICE.value, _PRECISION.value))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _CONFIG, _STEPS, _PEER, _DEVICE, _PRECISION = _define_flags()
    app.run(main)
