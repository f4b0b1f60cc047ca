"""Print the tiny Qwen 3.5 / Qwen3-Next configs that `src/model/config/tests.rs` embeds.

transformers 5.25.0 only (no torch: configs only). One compact JSON line per model type, as
`to_json_string(use_diff=True)` writes it (what `save_pretrained` puts in config.json), with the
kwargs of shared/docs/ARCHITECTURES-2026.md section 6.1.

    pip install transformers==5.25.0 && python scripts/reference/print_hybrid_configs.py
"""

import json

from transformers import AutoConfig

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
MROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
         "mrope_interleaved": True}
TEXT = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_conv_kernel_dim=4, tie_word_embeddings=True, rope_parameters=MROPE)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, temporal_patch_size=2,
              spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16)


def main():
    moe_common = {k: v for k, v in COMMON.items() if k != "intermediate_size"}  # no dense MLP
    next_text = dict(TEXT, rope_parameters={k: MROPE[k] for k in ("rope_type", "rope_theta", "partial_rotary_factor")})
    configs = {
        "qwen3_5_text": AutoConfig.for_model("qwen3_5_text", **COMMON, **TEXT),
        "qwen3_5": AutoConfig.for_model("qwen3_5", text_config=dict(model_type="qwen3_5_text", **COMMON, **TEXT),
                                        vision_config=VISION, tie_word_embeddings=True),
        "qwen3_5_moe_text": AutoConfig.for_model("qwen3_5_moe_text", **moe_common, **TEXT, **MOE),
        "qwen3_5_moe": AutoConfig.for_model(
            "qwen3_5_moe", text_config=dict(model_type="qwen3_5_moe_text", **moe_common, **TEXT, **MOE),
            vision_config=VISION, tie_word_embeddings=True),
        "qwen3_next": AutoConfig.for_model("qwen3_next", **COMMON, **next_text, **MOE),
    }
    for name, config in configs.items():
        print(name, json.dumps(json.loads(config.to_json_string(use_diff=True)), separators=(",", ":")))


if __name__ == "__main__":
    main()
