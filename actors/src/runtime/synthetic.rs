//! Synthetic actors for load generation, benchmarks and runtime diagnostics: a source of
//! proxy-schema rows carrying real PNG payloads of a chosen size, and a pass-through stage that
//! can simulate per-batch compute. They exercise the runtime and the corpus exactly as the model
//! actors do, without a model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use proxytune_schemas::{Proxy, Table};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::runtime::{Context, Operator, Output, Produced, Signal, Source};
use crate::stages::intake::encode_png;

/// Configuration of a [`SyntheticProxies`] source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Job id written into every row.
    pub job_id: String,
    /// Rows per batch.
    pub batch_rows: usize,
    /// Batches to produce; unbounded (until cancelled) when `None`.
    pub batches: Option<u64>,
    /// Approximate PNG payload per row, in bytes (noise images compress to about their raw size).
    pub payload_bytes: usize,
    /// Pause between batches, in milliseconds.
    pub interval_ms: u64,
    /// Emit a checkpoint barrier after every this many batches (0: never).
    pub barrier_every_batches: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            job_id: "synthetic".into(),
            batch_rows: 256,
            batches: Some(16),
            payload_bytes: 4096,
            interval_ms: 0,
            barrier_every_batches: 0,
        }
    }
}

/// Produces proxy rows with distinct keys (seed = row number) and real PNG payloads.
pub struct SyntheticProxies {
    config: SyntheticConfig,
    pngs: Vec<(Vec<u8>, u32)>,
    batch: u64,
    produced_rows: Arc<AtomicU64>,
}

impl SyntheticProxies {
    /// A source; the returned counter holds the rows it has emitted.
    pub fn new(config: SyntheticConfig) -> (Self, Arc<AtomicU64>) {
        let side = (((config.payload_bytes.max(3)) as f64 / 3.0).sqrt().ceil() as u32).max(1);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let pngs = (0..16)
            .map(|_| {
                let img = image::RgbImage::from_fn(side, side, |_, _| {
                    // xorshift noise: incompressible, so the PNG is about payload_bytes.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
                });
                (encode_png(&img), side)
            })
            .collect();
        let produced = Arc::new(AtomicU64::new(0));
        (SyntheticProxies { config, pngs, batch: 0, produced_rows: produced.clone() }, produced)
    }

    /// Builds batch number `n` (deterministic).
    pub fn batch(&self, n: u64) -> Result<RecordBatch> {
        let rows: Vec<Proxy> = (0..self.config.batch_rows as u64)
            .map(|i| {
                let seed = n * self.config.batch_rows as u64 + i;
                let (png, side) = &self.pngs[(seed % self.pngs.len() as u64) as usize];
                Proxy {
                    job_id: self.config.job_id.clone(),
                    subject: "synthetic".into(),
                    class_noun: "thing".into(),
                    prompt: format!("a sks thing, variation {}", seed % 25),
                    prompt_index: (seed % 25) as u32,
                    seed,
                    supervisor_id: "synthetic".into(),
                    supervisor_version: 1,
                    image_png: png.clone(),
                    width: *side,
                    height: *side,
                    score_dino: None,
                    score_clip_i: None,
                    score_clip_t: None,
                    score_feat_i: None,
                    dup_max_cosine: None,
                    keep: None,
                    reject_reason: None,
                    generated_at_us: 0,
                    filtered_at_us: None,
                }
            })
            .collect();
        Ok(Proxy::to_batch(&rows)?)
    }
}

impl Source for SyntheticProxies {
    fn produce(&mut self, _ctx: &mut Context, out: &mut Output) -> Result<Produced> {
        if self.config.batches.is_some_and(|n| self.batch >= n) {
            return Ok(Produced::Done);
        }
        if self.config.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.config.interval_ms));
        }
        let batch = self.batch(self.batch)?;
        self.produced_rows.fetch_add(batch.num_rows() as u64, Ordering::SeqCst);
        out.emit(batch);
        self.batch += 1;
        let every = self.config.barrier_every_batches;
        if every > 0 && self.batch.is_multiple_of(every) {
            out.signal(Signal::Barrier { epoch: self.batch / every });
        }
        Ok(Produced::More)
    }
}

/// Forwards every batch unchanged, optionally spending `work_ms` of simulated compute per batch.
#[derive(Clone, Debug, Default)]
pub struct PassThrough {
    /// Simulated compute per batch, in milliseconds (a sleep: it stands for a GPU call that
    /// does not hold a CPU core).
    pub work_ms: u64,
}

impl Operator for PassThrough {
    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _ctx: &mut Context,
        out: &mut Output,
    ) -> Result<()> {
        if self.work_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.work_ms));
        }
        out.emit(batch);
        Ok(())
    }
}

/// A sink that drops every batch (for benchmarks and tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Discard;

impl Operator for Discard {
    fn process_batch(
        &mut self,
        _input: usize,
        _batch: RecordBatch,
        _ctx: &mut Context,
        _out: &mut Output,
    ) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_distinct_keys_and_real_pngs_of_the_asked_size() {
        let (mut source, produced) = SyntheticProxies::new(SyntheticConfig {
            batch_rows: 4,
            batches: Some(2),
            payload_bytes: 4096,
            barrier_every_batches: 2,
            ..Default::default()
        });
        let mut ctx = Context::for_tests("gen");
        let mut out = Output::default();
        assert_eq!(source.produce(&mut ctx, &mut out).unwrap(), Produced::More);
        assert_eq!(source.produce(&mut ctx, &mut out).unwrap(), Produced::More);
        assert_eq!(source.produce(&mut ctx, &mut out).unwrap(), Produced::Done);
        assert_eq!(produced.load(Ordering::SeqCst), 8);
        let items = out.take();
        assert!(matches!(items.last(), Some(crate::runtime::Emitted::Signal(Signal::Barrier { epoch: 1 }))));
        let rows: Vec<Proxy> = items
            .iter()
            .filter_map(|e| match e {
                crate::runtime::Emitted::Data { batch, .. } => Some(Proxy::from_batch(batch).unwrap()),
                _ => None,
            })
            .flatten()
            .collect();
        let keys: std::collections::HashSet<_> = rows.iter().map(|p| p.key()).collect();
        assert_eq!(keys.len(), 8);
        let png = &rows[0].image_png;
        assert!((3500..6000).contains(&png.len()), "payload {} bytes", png.len());
        assert_eq!(image::load_from_memory(png).unwrap().width(), rows[0].width);
    }
}
