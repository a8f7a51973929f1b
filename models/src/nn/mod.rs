//! Building blocks shared by the model families, and the constructors every model builds its
//! linear, convolution and embedding layers with ([`linear`], [`conv2d`], [`embedding`]): tch's,
//! except while a model is built [`for_loading`], when their variables start as zeros instead of
//! random draws. A load overwrites every variable (strictly: a missing tensor is an error), so
//! drawing initial values first is wasted work; on the CPU it dominated building a model (a
//! 93 M-parameter Chameleon: 1.0 s of drawing before a 0.1 s load).

use std::borrow::Borrow;
use std::cell::Cell;

use tch::nn::{self, Init};

mod mlp;

pub use mlp::{Mlp, MlpConfig};

thread_local! {
    static FOR_LOADING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` (a model's constructor) with the layers' initial values skipped (zeros: one
/// memset, no random draws). Only for a model whose every variable is then loaded from a
/// checkpoint; LoRA adapters, which are not, draw theirs as always.
pub fn for_loading<T>(build: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FOR_LOADING.with(|f| f.set(self.0));
        }
    }
    let _restore = Restore(FOR_LOADING.with(|f| f.replace(true)));
    build()
}

fn loading() -> bool {
    FOR_LOADING.with(Cell::get)
}

const ZERO: Init = Init::Const(0.0);

/// `tch::nn::linear`, its initial values skipped under [`for_loading`].
pub fn linear<'a, T: Borrow<nn::Path<'a>>>(
    vs: T,
    in_dim: i64,
    out_dim: i64,
    c: nn::LinearConfig,
) -> nn::Linear {
    let c = if loading() { nn::LinearConfig { ws_init: ZERO, bs_init: Some(ZERO), ..c } } else { c };
    nn::linear(vs, in_dim, out_dim, c)
}

/// `tch::nn::conv2d`, its initial values skipped under [`for_loading`].
pub fn conv2d<'a, T: Borrow<nn::Path<'a>>>(vs: T, i: i64, o: i64, k: i64, c: nn::ConvConfig) -> nn::Conv2D {
    let c = if loading() { nn::ConvConfig { ws_init: ZERO, bs_init: ZERO, ..c } } else { c };
    nn::conv2d(vs, i, o, k, c)
}

/// `tch::nn::embedding`, its initial values skipped under [`for_loading`].
pub fn embedding<'a, T: Borrow<nn::Path<'a>>>(
    vs: T,
    n: i64,
    dim: i64,
    c: nn::EmbeddingConfig,
) -> nn::Embedding {
    let c = if loading() { nn::EmbeddingConfig { ws_init: ZERO, ..c } } else { c };
    nn::embedding(vs, n, dim, c)
}

/// `init`, or zeros under [`for_loading`] (for variables made with `Path::var`).
pub fn init(init: Init) -> Init {
    if loading() {
        ZERO
    } else {
        init
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    #[test]
    fn layers_built_for_loading_start_at_zero_and_others_draw() {
        let vs = nn::VarStore::new(Device::Cpu);
        let drawn = linear(vs.root() / "a", 4, 3, Default::default());
        let skipped = for_loading(|| linear(vs.root() / "b", 4, 3, Default::default()));
        let after = embedding(vs.root() / "c", 5, 2, Default::default());
        assert!(drawn.ws.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
        assert_eq!(skipped.ws.abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
        assert_eq!(skipped.bs.as_ref().unwrap().abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
        assert!(after.ws.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0, "the flag is restored");
        // Restored after a panic inside too.
        let _ = std::panic::catch_unwind(|| for_loading(|| panic!("constructor failed")));
        assert!(!loading());
    }
}
