//! What the model test binaries share: the tiny configs their tests build.

use proxytune_models::ar::llamagen::LlamaGenConfig;

/// A LlamaGen GPT small enough for CPU tests: 2 layers of width 32, a 64-code vocabulary, a
/// 3x3 grid, captions of 4 tokens of width 12.
pub fn tiny_llamagen() -> LlamaGenConfig {
    LlamaGenConfig {
        dim: 32,
        n_layer: 2,
        n_head: 2,
        n_kv_head: None,
        multiple_of: 16,
        ffn_dim_multiplier: None,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        vocab_size: 64,
        cls_token_num: 4,
        caption_dim: 12,
        grid_size: 3,
        class_dropout_prob: 0.1,
        init: Default::default(),
    }
}
