"""Training FLOPs of a Qwen-VL batch from config shapes, for tokens/s -> MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B): one multiply-add = 2 FLOPs; a training
step costs 3x the forward pass (backward = 2x forward) for full fine-tuning. With LoRA the
frozen weights need no weight gradients, so use backward_factor=1 (2x forward) instead of 2.

Forward FLOPs per text token (decoder, H = hidden, I = intermediate, nh/nkv heads of dim d,
V = vocab, S = padded row length, layers = N):
    N * [ 2*H*(nh*d) + 2*2*H*(nkv*d) + 2*(nh*d)*H      q, k, v, o projections
          + 3 * 2*H*I                                  gated MLP (gate, up, down)
          + 2*2*nh*d*S ]                               scores QK^T and AV (no causal halving,
                                                       as in PaLM's 12*N*H*S term)
    + 2*H*V                                            unembedding (lm_head), per token that gets logits:
                                                       all, or only those a target follows (target_positions)
Forward FLOPs per vision patch (Hv, Iv, depth Nv, P_img patches in the patch's image, m = merge):
    2*patch_dim*Hv                                     patch embedding
    + Nv * [ 2*Hv*3Hv + 2*Hv*Hv + mlp + 2*2*Hv*P_img ]  qkv, proj, MLP, attention
        mlp = 2*2*Hv*Iv (Qwen3-VL fc1/fc2) or 3*2*Hv*Iv (Qwen2.5-VL gated)
    + (1 + n_deepstack)/m^2 * [2*(Hv m^2)^2 + 2*(Hv m^2)*H]   patch merger(s) per merged token
MFU = achieved FLOPs/s / (peak FLOPs/s per device * devices).
"""
from __future__ import annotations

# Dense bf16 peak FLOPs/s per chip (vendor datasheets). CPU has no meaningful single number; a
# rough default is used unless the config gives one (train.peak_flops_per_device).
PEAK_FLOPS_PER_DEVICE = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}
CPU_PEAK_FLOPS_PER_DEVICE = 1e11  # ~2 AVX2 cores at fp32; only for a rough CPU MFU


def text_forward_flops_per_token(text, seq_len: int, unembedding: bool = True) -> float:
    """Decoder FLOPs of one token, with the lm_head's 2*H*V unless `unembedding` is off."""
    h, i, n = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    q_width = text.num_attention_heads * text.head_dim
    kv_width = text.num_key_value_heads * text.head_dim
    per_layer = (2 * h * q_width + 2 * 2 * h * kv_width + 2 * q_width * h
                 + 3 * 2 * h * i + 2 * 2 * q_width * seq_len)
    return float(n * per_layer + (2 * h * text.vocab_size if unembedding else 0))


def vision_forward_flops_per_patch(vision, text_hidden: int, patches_per_image: float) -> float:
    hv, iv = vision.hidden_size, vision.intermediate_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    mlp = (2 * 2 * hv * iv) if vision.arch == "qwen3_vl" else (3 * 2 * hv * iv)
    per_block = 2 * hv * 3 * hv + 2 * hv * hv + mlp + 2 * 2 * hv * patches_per_image
    m2 = vision.spatial_merge_size ** 2
    n_mergers = 1 + (len(vision.deepstack_visual_indexes) if vision.arch == "qwen3_vl" else 0)
    merger_per_merged_token = 2 * (hv * m2) ** 2 + 2 * (hv * m2) * text_hidden
    return float(2 * patch_dim * hv + vision.depth * per_block + n_mergers * merger_per_merged_token / m2)


def train_flops(model_config, *, num_tokens: int, seq_len: int, num_patches: int = 0,
                num_images: int = 0, backward_factor: float = 2.0, logit_tokens: int | None = None) -> float:
    """FLOPs of one training pass over `num_tokens` text tokens (rows padded to `seq_len`) and
    `num_patches` real vision patches in `num_images` images. logit_tokens: the tokens the lm_head runs on
    (None: all; with target_positions, the targets)."""
    text = model_config.text
    logit_tokens = num_tokens if logit_tokens is None else logit_tokens
    forward = (num_tokens * text_forward_flops_per_token(text, seq_len, unembedding=False)
               + logit_tokens * 2 * text.hidden_size * text.vocab_size)
    if num_patches:
        per_image = num_patches / max(num_images, 1)
        forward += num_patches * vision_forward_flops_per_patch(
            model_config.vision, model_config.text.hidden_size, per_image)
    return (1.0 + backward_factor) * forward


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
    """Peak FLOPs/s of one device from its `jax.Device.device_kind` (or `override` if > 0)."""
    if override > 0:
        return float(override)
    kind = device_kind.lower()
    for name, flops in sorted(PEAK_FLOPS_PER_DEVICE.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return flops
    return CPU_PEAK_FLOPS_PER_DEVICE


def mfu(flops: float, seconds: float, num_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1]."""
    if seconds <= 0:
        return 0.0
    return flops / seconds / (num_devices * peak_per_device)
