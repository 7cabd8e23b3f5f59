"""CLIP's ModifiedResNet image tower (OpenAI CLIP = open_clip `modified_resnet.py`), channels-last.

Topology, exactly as open_clip's: a stem of three 3x3 convolutions (the first with stride 2), each
with BatchNorm + ReLU, then a 2x2 average pool; four stages of bottlenecks (planes w, 2w, 4w, 8w,
expansion 4) whose stride is an average pool before the last 1x1 convolution ("anti-aliased"), with
an average-pool -> 1x1 conv -> BN shortcut where the shape changes; attention pooling (the mean token
prepended, learned positions, separate q/k/v/c_proj) to the joint embedding. Images are NHWC, the
layout XLA's TPU convolutions want.

Parameter tree (names as open_clip's modules, so the weight mapping is a table):
  conv1, bn1, conv2, bn2, conv3, bn3                      the stem
  layer{1..4}/block0/{conv1,bn1,conv2,bn2,conv3,bn3,downsample_conv,downsample_bn}
  layer{1..4}/blocks/{conv1,...,bn3}                      blocks 1..n-1, stacked on a leading
                                                          "layers" axis (nn.scan; absent when n=1)
  attnpool/{positional_embedding, q_proj, k_proj, v_proj, c_proj}
Each BN has params {scale, bias} and batch_stats {mean, var} (the "batch_stats" collection).

Batch norm follows torch's BatchNorm2d to the bit of its definition, not flax's nn.BatchNorm:
training normalises with the biased batch variance but moves the running variance towards the
*unbiased* one (n / (n - 1), n = batch x height x width), as torch does; flax's nn.BatchNorm moves it
towards the biased one, which would drift from open_clip-trained (and OpenAI) statistics. Statistics
are float32 whatever the compute dtype. Under `jax.jit` with the batch sharded over a mesh, the
means over the batch axis are global (XLA inserts the all-reduce): every mesh gives the 1-device
update, unlike the DeCLIP toolkit's per-GPU BN (its YFCC-15M RN50 configs set use_sync_bn False).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from veclip_jax.models.layers import REMAT_POLICIES, Dtype, HeadsDense, with_axes

EXPANSION = 4  # bottleneck output channels = planes * 4
HEAD_WIDTH = 64  # open_clip: heads = width * 32 // 64


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The shape of a ModifiedResNet image tower (open_clip's vision_cfg with `layers` a tuple)."""

    layers: tuple[int, int, int, int]  # bottlenecks per stage: (3, 4, 6, 3) for RN50
    width: int  # stem width (64 for RN50); stage i has planes width * 2**i
    heads: int  # attention-pool heads (open_clip: width * 32 // 64)
    image_size: int
    embed_dim: int  # attention-pool output = the joint embedding (open_clip's output_dim)
    dtype: Dtype = jnp.float32  # compute dtype; parameters and BN statistics are float32
    remat: str = "none"  # a key of models/layers.py REMAT_POLICIES, applied per bottleneck
    # Unroll the block scans (XLA then counts every block's FLOPs). Stage.scan_unroll: a scan of
    # convolution blocks is unrolled whatever this says (its while-loop backward is slow on XLA:CPU).
    unroll: bool = False
    bn_momentum: float = 0.9  # flax convention: running = m * running + (1 - m) * batch (torch 0.1)
    bn_eps: float = 1e-5

    @property
    def token_width(self) -> int:
        """Channels of the final feature map (2048 for RN50)."""
        return self.width * 32

    @property
    def grid(self) -> int:
        """Side of the final feature map (the image is downsampled 32x)."""
        return self.image_size // 32


# Kernels HWIO: spatial axes whole, input channels whole, output channels named so a rule can
# shard them (defaults.py SHARDING_RULES). torchvision's ResNet init (kaiming normal, fan_out):
# open_clip leaves torch's default conv init, which is not meant for deep ReLU stacks.
CONV_AXES = (None, None, "conv_in", "conv_out")
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(cfg: ResNetConfig, features: int, size: int, name: str, stride: int = 1) -> nn.Conv:
    pad = (size - 1) // 2
    return nn.Conv(
        features,
        kernel_size=(size, size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=jnp.float32,
        kernel_init=with_axes(CONV_INIT, *CONV_AXES),
        name=name,
    )


def avg_pool(x: jax.Array, k: int) -> jax.Array:
    """torch's AvgPool2d(k): window k, stride k, no padding, floor."""
    return x if k == 1 else nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


class BatchNorm(nn.Module):
    """torch's BatchNorm2d on NHWC: biased variance to normalise, unbiased for the running one.

    As flax's nn.BatchNorm, the running statistics stay at their initial values while the module
    is initialised (so `init` with train=True changes nothing), and move only when "batch_stats"
    is mutable.
    """

    cfg: ResNetConfig
    train: bool
    zero_scale: bool = False  # the last BN of a bottleneck: the block starts as the identity

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, c = self.cfg, x.shape[-1]
        scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
        scale = self.param("scale", with_axes(scale_init, "norm"), (c,))
        bias = self.param("bias", with_axes(nn.initializers.zeros, "norm"), (c,))
        ra_mean = self.variable(
            "batch_stats", "mean", with_axes(nn.initializers.zeros, "norm"), None, (c,), jnp.float32
        )
        ra_var = self.variable(
            "batch_stats", "var", with_axes(nn.initializers.ones, "norm"), None, (c,), jnp.float32
        )
        if self.train:
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))  # two passes: no cancellation
            if not self.is_initializing():
                n = x.shape[0] * x.shape[1] * x.shape[2]
                m = cfg.bn_momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * jax.lax.rsqrt(var + cfg.bn_eps)
        add = bias - mean * mul
        return x * mul.astype(cfg.dtype) + add.astype(cfg.dtype)


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> avgpool(stride) -> 1x1 -> BN, + shortcut, ReLU.

    Shaped for nn.scan: (x, None) -> (x, None). The shortcut is avgpool(stride) -> 1x1 -> BN when
    the stride or the channel count changes (open_clip's `downsample`), else the identity.
    """

    cfg: ResNetConfig
    planes: int
    stride: int
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        cfg, planes, out = self.cfg, self.planes, self.planes * EXPANSION
        x = nn.with_logical_constraint(x, ("batch", None, None, None))
        y = nn.relu(BatchNorm(cfg, self.train, name="bn1")(conv(cfg, planes, 1, "conv1")(x)))
        y = nn.relu(BatchNorm(cfg, self.train, name="bn2")(conv(cfg, planes, 3, "conv2")(y)))
        y = avg_pool(y, self.stride)
        y = BatchNorm(cfg, self.train, zero_scale=True, name="bn3")(conv(cfg, out, 1, "conv3")(y))
        if self.stride > 1 or x.shape[-1] != out:
            x = conv(cfg, out, 1, "downsample_conv")(avg_pool(x, self.stride))
            x = BatchNorm(cfg, self.train, name="downsample_bn")(x)
        return nn.relu(y + x), None


class Stage(nn.Module):
    """One stage: block0 (stride, new width), then blocks 1..n-1 (identical) scanned as one.

    The scan stacks the identical blocks' parameters (one array per stage and name, like the ViT's
    layers) but is always fully unrolled: XLA:CPU runs a scanned convolution block's backward pass
    about 10x slower than the unrolled one (RN50, batch 4, float32 on the 2-core CPU: 32 s against
    3.4 s per step; compile 46 s against 24 s), and a ResNet has only 16 (RN50) to 64 (RN50x64)
    blocks to unroll."""

    cfg: ResNetConfig
    planes: int
    blocks: int
    stride: int
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        block = Bottleneck
        if cfg.remat != "none":
            block = nn.remat(Bottleneck, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        x, _ = block(cfg, self.planes, self.stride, self.train, name="block0")(x)
        if self.blocks > 1:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=self.blocks - 1,
                unroll=self.blocks - 1,  # see below: always unrolled
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, self.planes, 1, self.train, name="blocks")(x, None)
        return x


class AttentionPool(nn.Module):
    """[mean token; tokens] + positions, multi-head attention, the mean token's output.

    open_clip attends with every token as a query and keeps token 0; only token 0's query is
    computed here (the same result, HW times fewer query rows). Initialisation as open_clip's
    `init_parameters`: q/k/v/c_proj kernels normal(C^-0.5), positions normal(C^-0.5); biases zero
    (torch's default Linear bias init is uniform; open_clip does not reset it).
    """

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, c = self.cfg, self.cfg.token_width
        std = c**-0.5
        heads = (cfg.heads, c // cfg.heads)
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)  # [B, HW + 1, C]
        pos = self.param(
            "positional_embedding",
            with_axes(nn.initializers.normal(std), "positions", "embed"),
            (cfg.grid**2 + 1, c),
        )
        x = x + pos.astype(x.dtype)[None]

        def proj(name: str) -> HeadsDense:
            return HeadsDense((c,), heads, ("embed",), ("heads", "kv"), std, cfg.dtype, name=name)

        q = proj("q_proj")(x[:, :1])
        k, v = proj("k_proj")(x), proj("v_proj")(x)
        out = jax.nn.dot_product_attention(q, k, v)  # scale head_dim^-0.5, as torch's MHA
        c_proj = HeadsDense(
            heads, (cfg.embed_dim,), ("heads", "kv"), ("proj",), std, cfg.dtype, name="c_proj"
        )
        return c_proj(out)[:, 0]


class ModifiedResNet(nn.Module):
    """Images [B, S, S, 3] (normalised, NHWC) -> pooled [B, embed_dim] in cfg.dtype.

    `train` uses and updates batch statistics (apply with mutable=["batch_stats"]); otherwise the
    running ones. With `return_tokens`, also the final feature map's positions [B, grid**2,
    token_width], row-major (after layer4, before attention pooling: the DeCLIP toolkit's
    `return_dense`, FILIP's image tokens).
    """

    cfg: ResNetConfig

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False, return_tokens: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {images.shape[1:3]}, the model expects {cfg.image_size}px")
        x = images.astype(cfg.dtype)
        half = cfg.width // 2
        for i, (features, stride) in enumerate(((half, 2), (half, 1), (cfg.width, 1)), start=1):
            x = conv(cfg, features, 3, f"conv{i}", stride)(x)
            x = nn.relu(BatchNorm(cfg, train, name=f"bn{i}")(x))
        x = avg_pool(x, 2)
        for i, blocks in enumerate(cfg.layers):
            x = Stage(cfg, cfg.width * 2**i, blocks, 1 if i == 0 else 2, train, name=f"layer{i + 1}")(x)
        b, h, w, c = x.shape
        tokens = nn.with_logical_constraint(x.reshape(b, h * w, c), ("batch", "length", "act_embed"))
        pooled = AttentionPool(cfg, name="attnpool")(tokens)
        pooled = nn.with_logical_constraint(pooled, ("batch", "act_embed"))
        return (pooled, tokens) if return_tokens else pooled
