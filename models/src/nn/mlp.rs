//! A two-layer perceptron, `fc2(act(fc1(x)))`: the shape of the timestep-embedding MLP of the
//! diffusion UNet and of the projection heads of the scorers.

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

/// Configuration of an [`Mlp`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Input features.
    pub in_features: i64,
    /// Hidden features.
    pub hidden_features: i64,
    /// Output features.
    pub out_features: i64,
}

/// `fc2(silu(fc1(x)))`, with variables `fc1.{weight,bias}` and `fc2.{weight,bias}`.
///
/// # Shapes
/// `[.., in_features] -> [.., out_features]`.
#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    /// Creates the layers under `vs`.
    pub fn new(vs: nn::Path, cfg: &MlpConfig) -> Self {
        let fc1 = crate::nn::linear(&vs / "fc1", cfg.in_features, cfg.hidden_features, Default::default());
        let fc2 = crate::nn::linear(&vs / "fc2", cfg.hidden_features, cfg.out_features, Default::default());
        Mlp { fc1, fc2 }
    }

    /// Applies the MLP.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.fc1).silu().apply(&self.fc2) // [.., out]
    }
}

#[cfg(test)]
mod tests {
    use tch::nn::OptimizerConfig;
    use tch::{Device, Kind};

    use super::*;

    /// The tch smoke test: a small network learns a fixed regression on CPU.
    #[test]
    fn trains_on_cpu_and_loss_drops() {
        use crate::rng::{redraw_initial_values, Draws, Stream};
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = MlpConfig { in_features: 4, hidden_features: 32, out_features: 1 };
        let mlp = Mlp::new(vs.root(), &cfg);
        redraw_initial_values(&vs, 0);
        let xs = Draws::new(0, Stream::Train, 0).normal(&[64, 4], Device::Cpu);
        let ys = (xs.sin() * 2.0).sum_dim_intlist(1, true, Kind::Float); // [64, 1]
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        let loss_at = |mlp: &Mlp| mlp.forward(&xs).mse_loss(&ys, tch::Reduction::Mean);
        let first = loss_at(&mlp).double_value(&[]);
        for _ in 0..200 {
            let loss = loss_at(&mlp);
            opt.backward_step(&loss);
        }
        let last = loss_at(&mlp).double_value(&[]);
        assert!(last < first * 0.1, "loss {first} -> {last}");
    }
}
