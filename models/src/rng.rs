//! Counter-based randomness for training and sampling: every draw is a pure function of
//! `(seed, stream, counter)`, so a run never depends on which thread touched libtorch's global
//! generator first, and a resumed run draws exactly what the uninterrupted run would have drawn.
//! Its whole state is a seed and a counter, both saved in checkpoints.
//!
//! Values are drawn on the CPU with ChaCha12 (`rand`'s `StdRng`) and moved to the target device.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use tch::{Device, Tensor};

/// SplitMix64's finaliser: mixes a 64-bit value into a well-spread one.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Named streams, so that (say) timestep draws and noise draws never share values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Per-micro-step training draws (timesteps, latent samples, noise).
    Train = 1,
    /// Shuffling of the training data, per epoch.
    Shuffle = 2,
    /// Initial sampling noise for one image, keyed by its seed.
    SampleNoise = 3,
    /// Initial values of LoRA adapters, keyed by variable name.
    LoraInit = 4,
    /// Token draws of autoregressive sampling, per step.
    TokenSample = 5,
}

/// A generator for one `(seed, stream, counter)`.
#[derive(Debug)]
pub struct Draws {
    rng: StdRng,
}

impl Draws {
    /// The draws for `counter` in `stream` of `seed`.
    pub fn new(seed: u64, stream: Stream, counter: u64) -> Self {
        let key = mix(mix(seed ^ mix(stream as u64)) ^ counter);
        Draws { rng: StdRng::seed_from_u64(key) }
    }

    /// Standard-normal float32 values of `shape` on `device`.
    pub fn normal(&mut self, shape: &[i64], device: Device) -> Tensor {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.sample(StandardNormal)).collect();
        Tensor::from_slice(&values).view(shape).to_device(device)
    }

    /// Float32 values of `shape`, uniform in `[lo, hi)`, on the CPU.
    pub fn uniform(&mut self, shape: &[i64], lo: f64, hi: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.random_range(lo..hi) as f32).collect();
        Tensor::from_slice(&values).view(shape)
    }

    /// One value uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// `n` integers uniform in `0..max`.
    pub fn below(&mut self, max: u64, n: usize) -> Vec<i64> {
        (0..n).map(|_| self.rng.random_range(0..max) as i64).collect()
    }

    /// A uniformly shuffled `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.rng.random_range(0..=i);
            p.swap(i, j);
        }
        p
    }
}

/// The initial latent noise `[1, C, h, w]` of the image sampled with `seed` (the same whatever
/// batch the image is sampled in).
pub fn sample_noise(seed: u64, shape: &[i64], device: Device) -> Tensor {
    Draws::new(seed, Stream::SampleNoise, 0).normal(shape, device)
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    #[test]
    fn draws_are_a_function_of_seed_stream_and_counter() {
        let a = Draws::new(7, Stream::Train, 3).normal(&[2, 3], Device::Cpu);
        let b = Draws::new(7, Stream::Train, 3).normal(&[2, 3], Device::Cpu);
        assert!(a.equal(&b));
        let c = Draws::new(7, Stream::Train, 4).normal(&[2, 3], Device::Cpu);
        let d = Draws::new(7, Stream::Shuffle, 3).normal(&[2, 3], Device::Cpu);
        let e = Draws::new(8, Stream::Train, 3).normal(&[2, 3], Device::Cpu);
        assert!(!a.equal(&c) && !a.equal(&d) && !a.equal(&e));
        let big = Draws::new(1, Stream::Train, 0).normal(&[20000], Device::Cpu);
        let (mean, std) = (big.mean(Kind::Float).double_value(&[]), big.std(true).double_value(&[]));
        assert!(mean.abs() < 0.03 && (std - 1.0).abs() < 0.03, "mean {mean}, std {std}");
        let mut p = Draws::new(1, Stream::Shuffle, 0).permutation(10);
        assert_ne!(p, (0..10).collect::<Vec<_>>());
        p.sort();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
        assert!(Draws::new(1, Stream::Train, 0).below(5, 100).iter().all(|&t| (0..5).contains(&t)));
    }
}
