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
    /// Initial values of a freshly built model's variables, keyed by variable name
    /// ([`redraw_initial_values`]).
    Init = 6,
    /// Data augmentation of a training image, keyed by the image and its copy.
    Augment = 7,
}

/// A stable 64-bit key of a variable name (FNV-1a), for draws keyed by name.
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Makes a freshly built model's random initial values a function of `seed` and each variable's
/// name instead of libtorch's global generator (which any thread building a model moves): every
/// floating-point variable built with spread is re-drawn LeCun-normal, `N(0, 1/fan_in)` with
/// `fan_in` the product of its dimensions after the first (a vector: `N(0, 0.02²)`); constants
/// (norm scales of one, zero biases) stay as built.
pub fn redraw_initial_values(vs: &tch::nn::VarStore, seed: u64) {
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if !t.is_floating_point() || t.numel() < 2 {
                continue;
            }
            let constant = t.to_kind(tch::Kind::Double).std(true).double_value(&[]) == 0.0;
            if constant {
                continue;
            }
            let size = t.size();
            let std = match size.as_slice() {
                [_] => 0.02,
                [_, rest @ ..] => 1.0 / (rest.iter().product::<i64>().max(1) as f64).sqrt(),
                [] => continue,
            };
            let values = Draws::new(seed, Stream::Init, name_key(&name)).normal(&size, Device::Cpu) * std;
            t.copy_(&values.to_kind(t.kind()).to_device(t.device()));
        }
    });
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

    #[test]
    fn redrawn_initial_values_depend_on_the_seed_alone_and_follow_the_fan_in() {
        use crate::nn::{Mlp, MlpConfig};
        let build = |global: i64| {
            tch::manual_seed(global); // whatever the global generator holds
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let cfg = MlpConfig { in_features: 64, hidden_features: 128, out_features: 2 };
            let _ = Mlp::new(vs.root() / "head", &cfg);
            vs
        };
        let (a, b) = (build(1), build(2));
        redraw_initial_values(&a, 5);
        redraw_initial_values(&b, 5);
        let (va, vb) = (a.variables(), b.variables());
        assert!(va.iter().all(|(k, t)| t.equal(&vb[k])), "same seed, same values");
        let std = va["head.fc1.weight"].std(true).double_value(&[]); // [128, 64]: 1/8
        assert!((std - 0.125).abs() < 0.01, "fan-in spread {std}");
        let std = va["head.fc1.bias"].std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.005, "vector spread {std}");
        let c = build(1);
        redraw_initial_values(&c, 6);
        assert!(
            !c.variables()["head.fc1.weight"].equal(&va["head.fc1.weight"]),
            "another seed, other values"
        );
    }
}
