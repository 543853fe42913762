"""Named model configurations (`ModelConfig.preset(name)`): the test and demo sizes, and the
published LLaVA-1.5-7B and LLaVA-OneVision-7B (Qwen2 + SigLIP) shapes."""

from ee_mllm_jax.config import SIGLIP_MEAN, SIGLIP_STD, LLMConfig, ModelConfig, VisionConfig
from ee_mllm_jax.mode import Self

PRESETS: dict[str, ModelConfig] = {
    # Unit tests: everything small, GQA on, two images of 16 tokens fit easily.
    "tiny": ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                            mlp_dim=64, feature_layer=-1),
        llm=LLMConfig(vocab_size=256, width=64, depth=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_dim=128),
    ),
    # Trains on the synthetic dataset on 2 CPU cores in minutes (EE-MLLM, composite).
    "demo": ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, num_heads=4,
                            mlp_dim=512, feature_layer=-1),
        llm=LLMConfig(vocab_size=1024, width=256, depth=4, num_heads=8, num_kv_heads=4,
                      head_dim=32, mlp_dim=704),
    ),
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (feature layer -2, 576 tokens), mlp2x_gelu,
    # Vicuna-7B v1.5. A released self-attention checkpoint: run with
    # `.run_as(attention="composite")` for EE-MLLM-F, or
    # `.replace(attention="composite", visual_ffn=False)` to train EE-MLLM.
    "llava-1.5-7b": ModelConfig(
        vision=VisionConfig(kind="clip", image_size=336, patch_size=14, width=1024, depth=24,
                            num_heads=16, mlp_dim=4096, layer_norm_eps=1e-5, feature_layer=-2),
        llm=LLMConfig(vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=32,
                      head_dim=128, mlp_dim=11008, rope_theta=10000.0, rms_norm_eps=1e-5),
        projector="mlp2x_gelu", mode=Self(),
    ),
    # Qwen2-7B + SigLIP-so400m/14 at 384 px (729 tokens), as LLaVA-OneVision-7B ships it
    # (the tower's last layer removed, features from the new last layer).
    "qwen2-7b-siglip": ModelConfig(
        vision=VisionConfig(kind="siglip", image_size=384, patch_size=14, width=1152, depth=26,
                            num_heads=16, mlp_dim=4304, layer_norm_eps=1e-6, feature_layer=-1,
                            image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
        llm=LLMConfig(vocab_size=152064, width=3584, depth=28, num_heads=28, num_kv_heads=4,
                      head_dim=128, mlp_dim=18944, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      qkv_bias=True),
        projector="mlp2x_gelu", mode=Self(),
    ),
}
