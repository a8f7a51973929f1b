//! Weight shapes without weights: what a model built from a config expects (its variable paths,
//! which are the checkpoint's keys, and their shapes), and what a checkpoint holds (read from the
//! safetensors headers alone, single files or shards with their index). Checking a 7B checkpoint
//! against its config this way reads a few megabytes of headers and allocates nothing.
//!
//! The large models (the UNet, the Chameleon decoder, the CLIP text towers) have their inventories
//! written out from their configs; `models/tests/shapes.rs` keeps each equal to the variables the
//! model itself creates. Small models (the VAE, the VQ tokenizers) are simply built:
//! [`of_store`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;

use crate::ar::chameleon::ChameleonConfig;
use crate::diffusion::unet::UNetConfig;
use crate::error::{ModelError, Result};
use crate::transformer::clip::ClipTextConfig;

/// Variable paths and their shapes.
pub type Shapes = BTreeMap<String, Vec<i64>>;

/// One tensor of a checkpoint's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    /// The safetensors dtype (`F32`, `BF16`, …).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// The file it is in.
    pub file: PathBuf,
    /// Where its bytes are in the file: `[start, end)`, absolute offsets.
    pub data: (u64, u64),
}

impl HeaderEntry {
    /// Bytes of one element.
    pub fn element_bytes(&self) -> u64 {
        match self.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        }
    }

    /// Elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d.max(0) as u64).product()
    }
}

/// Every tensor of a checkpoint, by key.
pub type Header = BTreeMap<String, HeaderEntry>;

/// Reads the header of one safetensors file.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let bad = |m: String| io(std::io::Error::new(std::io::ErrorKind::InvalidData, m));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("implausible safetensors header size {len}")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("not a safetensors header: {e}")))?;
    let mut out = Header::new();
    for (key, value) in json {
        if key == "__metadata__" {
            continue;
        }
        let dtype = value.get("dtype").and_then(|d| d.as_str()).unwrap_or_default().to_string();
        let shape = value
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|dims| dims.iter().filter_map(|d| d.as_i64()).collect())
            .ok_or_else(|| bad(format!("tensor `{key}` has no shape")))?;
        let offsets: Vec<u64> = value
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .map(|o| o.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let [start, end] = offsets[..] else {
            return Err(bad(format!("tensor `{key}` has no data_offsets")));
        };
        let data = (8 + len + start, 8 + len + end);
        out.insert(key, HeaderEntry { dtype, shape, file: path.to_path_buf(), data });
    }
    Ok(out)
}

/// The weight files of a model folder: `<stem>[.<variant>].safetensors`, or the shards listed by
/// `<stem>[.<variant>].safetensors.index.json`. `stems` are tried in order (`model`,
/// `diffusion_pytorch_model`).
pub fn weight_files(dir: &Path, stems: &[&str], variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut tried = Vec::new();
    for stem in stems {
        let name = match variant {
            Some(v) => format!("{stem}.{v}.safetensors"),
            None => format!("{stem}.safetensors"),
        };
        let single = dir.join(&name);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            return shards(&index);
        }
        tried.push(name);
    }
    Err(ModelError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no weights: none of {} (nor their .index.json) exists", tried.join(", ")),
        ),
    })
}

/// The shard files an `*.safetensors.index.json` names (each once, in order), all present.
pub fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .map_err(|source| ModelError::Io { path: index.to_path_buf(), source })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { what: index.display().to_string(), message: e.to_string() })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
        what: index.display().to_string(),
        message: "no `weight_map`".into(),
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for file in map.values().filter_map(|v| v.as_str()) {
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    for f in &files {
        if !f.is_file() {
            return Err(ModelError::Io {
                path: f.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("shard listed by {} is missing", index.display()),
                ),
            });
        }
    }
    Ok(files)
}

/// The union of the headers of `files`.
pub fn read_headers(files: &[PathBuf]) -> Result<Header> {
    let mut out = Header::new();
    for f in files {
        out.extend(read_header(f)?);
    }
    Ok(out)
}

/// The variables of a built store and their shapes.
pub fn of_store(vs: &VarStore) -> Shapes {
    vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect()
}

/// `expected` against a checkpoint's `header`, keys under `prefix` in the checkpoint: one line per
/// problem (missing tensors, shape mismatches and, when `strict`, unexpected tensors; each kind
/// listed up to 5 times, then counted).
pub fn compare(expected: &Shapes, header: &Header, prefix: &str, strict: bool) -> Vec<String> {
    let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
    for (key, shape) in expected {
        match header.get(&format!("{prefix}{key}")) {
            None => missing.push(format!("{prefix}{key} {shape:?}")),
            Some(e) if &e.shape != shape => mismatched.push(format!(
                "{prefix}{key}: the config makes {shape:?}, {} holds {:?}",
                e.file.display(),
                e.shape
            )),
            Some(_) => {}
        }
    }
    let mut problems = Vec::new();
    let mut list = |what: &str, items: Vec<String>| {
        if items.is_empty() {
            return;
        }
        let shown: Vec<&str> = items.iter().take(5).map(String::as_str).collect();
        let more = if items.len() > 5 { format!(" (and {} more)", items.len() - 5) } else { String::new() };
        problems.push(format!("{} {what}: {}{more}", items.len(), shown.join("; ")));
    };
    list("tensors missing", missing);
    list("shape mismatches", mismatched);
    if strict {
        let unexpected: Vec<String> = header
            .keys()
            .filter(|k| k.starts_with(prefix) && !expected.contains_key(&k[prefix.len()..]))
            .cloned()
            .collect();
        list("tensors the config does not make", unexpected);
    }
    problems
}

/// Parameters (elements) of an inventory.
pub fn parameters(shapes: &Shapes) -> u64 {
    shapes.values().map(|s| s.iter().map(|&d| d.max(0) as u64).product::<u64>()).sum()
}

fn put(out: &mut Shapes, key: String, shape: &[i64]) {
    out.insert(key, shape.to_vec());
}

fn linear(out: &mut Shapes, key: &str, c_in: i64, c_out: i64, bias: bool) {
    put(out, format!("{key}.weight"), &[c_out, c_in]);
    if bias {
        put(out, format!("{key}.bias"), &[c_out]);
    }
}

fn norm(out: &mut Shapes, key: &str, c: i64) {
    put(out, format!("{key}.weight"), &[c]);
    put(out, format!("{key}.bias"), &[c]);
}

fn conv(out: &mut Shapes, key: &str, c_in: i64, c_out: i64, k: i64) {
    put(out, format!("{key}.weight"), &[c_out, c_in, k, k]);
    put(out, format!("{key}.bias"), &[c_out]);
}

fn resnet(out: &mut Shapes, key: &str, c_in: i64, c_out: i64, temb: i64) {
    norm(out, &format!("{key}.norm1"), c_in);
    conv(out, &format!("{key}.conv1"), c_in, c_out, 3);
    linear(out, &format!("{key}.time_emb_proj"), temb, c_out, true);
    norm(out, &format!("{key}.norm2"), c_out);
    conv(out, &format!("{key}.conv2"), c_out, c_out, 3);
    if c_in != c_out {
        conv(out, &format!("{key}.conv_shortcut"), c_in, c_out, 1);
    }
}

fn transformer_2d(out: &mut Shapes, key: &str, c: i64, cfg: &UNetConfig, depth: i64) {
    norm(out, &format!("{key}.norm"), c);
    for proj in ["proj_in", "proj_out"] {
        if cfg.use_linear_projection {
            linear(out, &format!("{key}.{proj}"), c, c, true);
        } else {
            conv(out, &format!("{key}.{proj}"), c, c, 1);
        }
    }
    for j in 0..depth {
        let b = format!("{key}.transformer_blocks.{j}");
        for n in ["norm1", "norm2", "norm3"] {
            norm(out, &format!("{b}.{n}"), c);
        }
        for (attn, context) in [("attn1", c), ("attn2", cfg.cross_attention_dim)] {
            linear(out, &format!("{b}.{attn}.to_q"), c, c, false);
            linear(out, &format!("{b}.{attn}.to_k"), context, c, false);
            linear(out, &format!("{b}.{attn}.to_v"), context, c, false);
            linear(out, &format!("{b}.{attn}.to_out.0"), c, c, true);
        }
        linear(out, &format!("{b}.ff.net.0.proj"), c, c * 8, true);
        linear(out, &format!("{b}.ff.net.2"), c * 4, c, true);
    }
}

/// The variables [`UNet2DConditionModel`](crate::diffusion::unet::UNet2DConditionModel) makes for
/// `cfg` (without adapters).
pub fn unet(cfg: &UNetConfig) -> Shapes {
    let mut out = Shapes::new();
    let ch = &cfg.block_out_channels;
    let temb = ch[0] * 4;
    conv(&mut out, "conv_in", cfg.in_channels, ch[0], 3);
    linear(&mut out, "time_embedding.linear_1", ch[0], temb, true);
    linear(&mut out, "time_embedding.linear_2", temb, temb, true);
    if let (Some("text_time"), Some(input)) =
        (cfg.addition_embed_type.as_deref(), cfg.projection_class_embeddings_input_dim)
    {
        linear(&mut out, "add_embedding.linear_1", input, temb, true);
        linear(&mut out, "add_embedding.linear_2", temb, temb, true);
    }
    let mut c_out = ch[0];
    for (i, t) in cfg.down_block_types.iter().enumerate() {
        let c_in = c_out;
        c_out = ch[i];
        for j in 0..cfg.layers_per_block {
            let res_in = if j == 0 { c_in } else { c_out };
            resnet(&mut out, &format!("down_blocks.{i}.resnets.{j}"), res_in, c_out, temb);
            if t == "CrossAttnDownBlock2D" {
                let key = format!("down_blocks.{i}.attentions.{j}");
                transformer_2d(&mut out, &key, c_out, cfg, cfg.transformer_layers_per_block.get(i));
            }
        }
        if i + 1 < ch.len() {
            conv(&mut out, &format!("down_blocks.{i}.downsamplers.0.conv"), c_out, c_out, 3);
        }
    }
    let top = *ch.last().expect("levels");
    let last = ch.len() - 1;
    if cfg.mid_block_type.is_some() {
        resnet(&mut out, "mid_block.resnets.0", top, top, temb);
        transformer_2d(
            &mut out,
            "mid_block.attentions.0",
            top,
            cfg,
            cfg.transformer_layers_per_block.get(last),
        );
        resnet(&mut out, "mid_block.resnets.1", top, top, temb);
    }
    let rev: Vec<i64> = ch.iter().rev().copied().collect();
    let mut prev_out = top;
    for (i, t) in cfg.up_block_types.iter().enumerate() {
        let o = rev[i];
        let input = rev[(i + 1).min(rev.len() - 1)];
        let level = ch.len() - 1 - i;
        let n = cfg.layers_per_block + 1;
        for j in 0..n {
            let skip = if j == n - 1 { input } else { o };
            let res_in = if j == 0 { prev_out } else { o };
            resnet(&mut out, &format!("up_blocks.{i}.resnets.{j}"), res_in + skip, o, temb);
            if t == "CrossAttnUpBlock2D" {
                let key = format!("up_blocks.{i}.attentions.{j}");
                transformer_2d(&mut out, &key, o, cfg, cfg.transformer_layers_per_block.get(level));
            }
        }
        if i + 1 < ch.len() {
            conv(&mut out, &format!("up_blocks.{i}.upsamplers.0.conv"), o, o, 3);
        }
        prev_out = o;
    }
    norm(&mut out, "conv_norm_out", ch[0]);
    conv(&mut out, "conv_out", ch[0], cfg.out_channels, 3);
    out
}

/// The variables of a CLIP text tower (`prefix` is `text_model.` when the checkpoint nests it),
/// with `text_projection` when `projection` (SDXL's second encoder).
pub fn clip_text(cfg: &ClipTextConfig, prefix: &str, projection: bool) -> Shapes {
    let mut out = Shapes::new();
    let d = cfg.hidden_size;
    put(&mut out, format!("{prefix}embeddings.token_embedding.weight"), &[cfg.vocab_size, d]);
    put(&mut out, format!("{prefix}embeddings.position_embedding.weight"), &[cfg.max_position_embeddings, d]);
    for i in 0..cfg.num_hidden_layers {
        let l = format!("{prefix}encoder.layers.{i}");
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(&mut out, &format!("{l}.self_attn.{p}"), d, d, true);
        }
        norm(&mut out, &format!("{l}.layer_norm1"), d);
        norm(&mut out, &format!("{l}.layer_norm2"), d);
        linear(&mut out, &format!("{l}.mlp.fc1"), d, cfg.intermediate_size, true);
        linear(&mut out, &format!("{l}.mlp.fc2"), cfg.intermediate_size, d, true);
    }
    norm(&mut out, &format!("{prefix}final_layer_norm"), d);
    if let (true, Some(p)) = (projection, cfg.projection_dim) {
        linear(&mut out, "text_projection", d, p, false);
    }
    out
}

/// The variables of a T5 encoder (transformers' `T5EncoderModel` keys, without the tied
/// `encoder.embed_tokens.weight`), from its config.
pub fn t5_encoder(cfg: &crate::transformer::t5::T5Config) -> crate::error::Result<Shapes> {
    let (_, gated) = cfg.feed_forward()?;
    let mut out = Shapes::new();
    let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
    put(&mut out, "shared.weight".into(), &[cfg.vocab_size, d]);
    for i in 0..cfg.num_layers {
        let b = format!("encoder.block.{i}.layer");
        for name in ["q", "k", "v"] {
            linear(&mut out, &format!("{b}.0.SelfAttention.{name}"), d, inner, false);
        }
        linear(&mut out, &format!("{b}.0.SelfAttention.o"), inner, d, false);
        put(&mut out, format!("{b}.0.layer_norm.weight"), &[d]);
        let names: &[&str] = if gated { &["wi_0", "wi_1"] } else { &["wi"] };
        for name in names {
            linear(&mut out, &format!("{b}.1.DenseReluDense.{name}"), d, ff, false);
        }
        linear(&mut out, &format!("{b}.1.DenseReluDense.wo"), ff, d, false);
        put(&mut out, format!("{b}.1.layer_norm.weight"), &[d]);
    }
    put(
        &mut out,
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(),
        &[cfg.relative_attention_num_buckets, cfg.num_heads],
    );
    put(&mut out, "encoder.final_layer_norm.weight".into(), &[d]);
    Ok(out)
}

/// The variables of LlamaGen's T2I GPT (the reference state dict's keys), from its arguments.
pub fn llamagen(cfg: &crate::ar::llamagen::LlamaGenConfig) -> Shapes {
    let mut out = Shapes::new();
    let (d, c) = (cfg.dim, cfg.caption_dim);
    let kv = cfg.n_kv_head.unwrap_or(cfg.n_head) * (d / cfg.n_head);
    put(&mut out, "cls_embedding.cap_proj.fc1.weight".into(), &[d, c]);
    put(&mut out, "cls_embedding.cap_proj.fc2.weight".into(), &[d, d]);
    put(&mut out, "cls_embedding.uncond_embedding".into(), &[cfg.cls_token_num, c]);
    put(&mut out, "tok_embeddings.weight".into(), &[cfg.vocab_size, d]);
    for i in 0..cfg.n_layer {
        let l = format!("layers.{i}");
        put(&mut out, format!("{l}.attention.wqkv.weight"), &[d + 2 * kv, d]);
        put(&mut out, format!("{l}.attention.wo.weight"), &[d, d]);
        put(&mut out, format!("{l}.feed_forward.w1.weight"), &[cfg.ffn_dim(), d]);
        put(&mut out, format!("{l}.feed_forward.w3.weight"), &[cfg.ffn_dim(), d]);
        put(&mut out, format!("{l}.feed_forward.w2.weight"), &[d, cfg.ffn_dim()]);
        put(&mut out, format!("{l}.attention_norm.weight"), &[d]);
        put(&mut out, format!("{l}.ffn_norm.weight"), &[d]);
    }
    put(&mut out, "norm.weight".into(), &[d]);
    put(&mut out, "output.weight".into(), &[cfg.vocab_size, d]);
    out
}

/// The variables of the Chameleon decoder (`model.*` without `model.vqmodel.*`, and `lm_head`).
pub fn chameleon_decoder(cfg: &ChameleonConfig) -> Shapes {
    let mut out = Shapes::new();
    let (d, hd, h, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
    put(&mut out, "model.embed_tokens.weight".into(), &[cfg.vocab_size, d]);
    for i in 0..cfg.num_hidden_layers {
        let l = format!("model.layers.{i}");
        let a = cfg.attention_bias;
        linear(&mut out, &format!("{l}.self_attn.q_proj"), d, h * hd, a);
        linear(&mut out, &format!("{l}.self_attn.k_proj"), d, kv * hd, a);
        linear(&mut out, &format!("{l}.self_attn.v_proj"), d, kv * hd, a);
        linear(&mut out, &format!("{l}.self_attn.o_proj"), h * hd, d, a);
        put(&mut out, format!("{l}.self_attn.q_norm.weight"), &[h, hd]);
        put(&mut out, format!("{l}.self_attn.q_norm.bias"), &[h, hd]);
        put(&mut out, format!("{l}.self_attn.k_norm.weight"), &[kv, hd]);
        put(&mut out, format!("{l}.self_attn.k_norm.bias"), &[kv, hd]);
        let m = cfg.mlp_bias;
        linear(&mut out, &format!("{l}.mlp.gate_proj"), d, cfg.intermediate_size, m);
        linear(&mut out, &format!("{l}.mlp.up_proj"), d, cfg.intermediate_size, m);
        linear(&mut out, &format!("{l}.mlp.down_proj"), cfg.intermediate_size, d, m);
        put(&mut out, format!("{l}.input_layernorm.weight"), &[d]);
        put(&mut out, format!("{l}.post_attention_layernorm.weight"), &[d]);
    }
    put(&mut out, "model.norm.weight".into(), &[d]);
    if !cfg.tie_word_embeddings {
        put(&mut out, "lm_head.weight".into(), &[cfg.vocab_size, d]);
    }
    out
}
