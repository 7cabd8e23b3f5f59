"""To and from HuggingFace `transformers.CLIPModel`: a table of renames, reshapes and transposes.

Our parameter tree already uses HF's names (veclip_jax/models), so each entry
below only says how a tensor's layout differs:

  ours                                   HF                                     change
  */patch_embedding/kernel  [p,p,3,D]    *.patch_embedding.weight  [D,3,p,p]    transpose (3,2,0,1)
  */encoder/layers/X        [L, ...]     *.encoder.layers.{i}.X                 split the stacked axis
  */self_attn/{q,k,v}_proj/kernel [D,H,K] *.{q,k,v}_proj.weight [H*K, D]        flatten heads, transpose
  */self_attn/{q,k,v}_proj/bias   [H,K]   *.{q,k,v}_proj.bias   [H*K]           flatten heads
  */self_attn/out_proj/kernel [H,K,D]    *.out_proj.weight [D, H*K]             flatten heads, transpose
  */Dense kernel            [in, out]    *.weight [out, in]                     transpose
  */LayerNorm scale, bias                *.weight, *.bias                       rename
  logit_scale               ()           logit_scale ()                         clipped at ln(logit_scale_max)

from_hf  reads HF CLIP directories (weights, config, tokenizer, image processor): `veclip_jax.load`, init_from
to_hf    writes them (launch/export.py)

Neither imports the trainer nor the evaluation package: checkpoints are read
through the run layer (veclip_jax/run/).
"""

WEIGHTS = "model.safetensors"
