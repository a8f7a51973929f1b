//! Activation checkpointing (recomputation) for tch, which has no custom-autograd-function API.
//!
//! A model's forward is written as a list of [`Segment`]s, each mapping the tensors alive between
//! two units of the network (a decoder layer's hidden state; a UNet's hidden state, time embedding
//! and skip stack) to the next such list. [`forward`] runs them in order on the autograd graph: the
//! plain forward, and the same operations in the same order as a hand-written loop.
//!
//! [`backward`] trains through them. The head (the loss) receives the last segment's outputs as
//! fresh leaves and runs its own backward passes (one, or one per chunk of positions for a chunked
//! loss); the gradient the leaves collect is then carried back segment by segment with
//! `Σ output · gradient` (whose gradient with respect to each output is that gradient, exactly).
//! With `recompute`, the forward runs without a graph and keeps only each segment's input; the
//! backward rebuilds one segment's graph at a time from its stored input, so the activations held at
//! once are the segment boundaries plus one segment's internals, as in PyTorch's
//! `torch.utils.checkpoint`. Segments must be deterministic (no dropout draws) for the recomputed
//! forward to equal the first one; every proxytune model is.

use tch::Tensor;

use crate::error::Result;

/// One unit of a segmented forward: the tensors alive before it → the tensors alive after it.
/// Constants (masks, rotary tables, the text context) are captured by the closure, not passed.
pub type Segment<'a> = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'a>;

/// Runs `segments` over `input` on the autograd graph (the plain forward).
pub fn forward(segments: &[Segment<'_>], input: Vec<Tensor>) -> Result<Vec<Tensor>> {
    segments.iter().try_fold(input, |state, segment| segment(&state))
}

/// Fresh leaves for `state`: detached copies, floating-point ones requiring a gradient.
fn leaves(state: &[Tensor]) -> Vec<Tensor> {
    state
        .iter()
        .map(|t| {
            let leaf = t.detach();
            if leaf.is_floating_point() {
                leaf.set_requires_grad(true)
            } else {
                leaf
            }
        })
        .collect()
}

/// The gradients the leaves collected (undefined where none reached them).
fn grads(leaves: &[Tensor]) -> Vec<Tensor> {
    leaves.iter().map(|l| if l.requires_grad() { l.grad() } else { Tensor::new() }).collect()
}

/// Back-propagates `grads` (one per output; undefined ones carry nothing) from `outputs`, which
/// are on their graph, into everything that graph reaches.
fn carry(outputs: &[Tensor], grads: &[Tensor]) -> Result<()> {
    let mut total: Option<Tensor> = None;
    for (out, g) in outputs.iter().zip(grads) {
        if !g.defined() || !out.requires_grad() {
            continue;
        }
        let term = (out * g).sum(out.kind());
        total = Some(match total {
            Some(t) => t + term.to_kind(tch::Kind::Float),
            None => term.to_kind(tch::Kind::Float),
        });
    }
    if let Some(t) = total {
        t.f_backward()?;
    }
    Ok(())
}

/// Runs `segments` over `input`, hands the final tensors to `head` as leaves requiring gradients
/// (the head computes its loss and calls backward on it, as often as it likes), then carries their
/// gradients back through the segments into the parameters. With `recompute` the forward keeps no
/// graph and each segment is recomputed from its stored input during the backward. Returns what the
/// head returned.
pub fn backward<R>(
    segments: &[Segment<'_>],
    input: Vec<Tensor>,
    recompute: bool,
    head: impl FnOnce(&[Tensor]) -> Result<R>,
) -> Result<R> {
    if !recompute {
        let outputs = forward(segments, input)?;
        let ends = leaves(&outputs);
        let value = head(&ends)?;
        carry(&outputs, &grads(&ends))?;
        return Ok(value);
    }
    let mut inputs = Vec::with_capacity(segments.len());
    let last = {
        let _graph_off = tch::no_grad_guard();
        let mut state = input;
        for segment in segments {
            let next = segment(&state)?;
            inputs.push(state);
            state = next;
        }
        state
    };
    let ends = leaves(&last);
    drop(last);
    let value = head(&ends)?;
    let mut g = grads(&ends);
    drop(ends);
    for (segment, stored) in segments.iter().zip(inputs).rev() {
        let starts = leaves(&stored);
        drop(stored);
        let outputs = segment(&starts)?;
        carry(&outputs, &g)?;
        drop(outputs);
        g = grads(&starts);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use tch::{nn, nn::Module, Device, Kind};

    use super::*;
    use crate::rng::{redraw_initial_values, Draws, Stream};

    /// A small residual net with a skip that crosses segments, in three segments.
    fn net(vs: &nn::VarStore) -> (nn::Linear, nn::Linear, nn::Linear) {
        let r = vs.root();
        let lin = |name: &str| crate::nn::linear(&r / name, 6, 6, Default::default());
        (lin("a"), lin("b"), lin("c"))
    }

    fn grads_of(vs: &nn::VarStore) -> Vec<(String, Vec<f32>)> {
        let mut out: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, Vec::<f32>::try_from(t.grad().flatten(0, -1)).unwrap()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn recomputed_segments_give_the_plain_gradients_and_leave_no_graph_between_them() {
        let vs = nn::VarStore::new(Device::Cpu);
        let (a, b, c) = net(&vs);
        redraw_initial_values(&vs, 3);
        let x = Draws::new(1, Stream::Init, 0).normal(&[4, 6], Device::Cpu);
        let segments: Vec<Segment> = vec![
            // [x] → [h, skip]
            Box::new(|s: &[Tensor]| {
                let h = a.forward(&s[0]).tanh();
                Ok(vec![h.shallow_clone(), h])
            }),
            // [h, skip] → [h', skip]
            Box::new(|s: &[Tensor]| Ok(vec![b.forward(&s[0]).tanh(), s[1].shallow_clone()])),
            // [h, skip] → [out]
            Box::new(|s: &[Tensor]| Ok(vec![c.forward(&(&s[0] + &s[1]))])),
        ];
        let loss = |out: &Tensor| out.square().mean(Kind::Float) + out.sin().sum(Kind::Float);

        // The reference: one graph, one backward.
        let out = forward(&segments, vec![x.shallow_clone()]).unwrap();
        let reference_loss = loss(&out[0]);
        reference_loss.backward();
        let reference = grads_of(&vs);

        for recompute in [false, true] {
            for (_, t) in vs.variables() {
                let _ = t.grad().zero_();
            }
            let value = backward(&segments, vec![x.shallow_clone()], recompute, |ends| {
                assert!(ends[0].requires_grad() && ends[0].is_leaf());
                // Two backward calls, one per half of the rows, as a chunked loss makes.
                let mut total = 0.0;
                for rows in [ends[0].narrow(0, 0, 2), ends[0].narrow(0, 2, 2)] {
                    let l = rows.square().mean(Kind::Float) / 2.0 + rows.sin().sum(Kind::Float);
                    l.backward();
                    total += l.double_value(&[]);
                }
                Ok(total)
            })
            .unwrap();
            assert!((value - reference_loss.double_value(&[])).abs() < 1e-5, "recompute {recompute}");
            for ((name, got), (_, want)) in grads_of(&vs).iter().zip(&reference) {
                let diff = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
                assert!(diff < 1e-6, "recompute {recompute}: {name} differs by {diff}");
            }
        }
    }
}
