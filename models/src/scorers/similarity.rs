//! The DreamBench similarity arithmetic: DINO, CLIP-I and FEAT-I are the mean pairwise cosine
//! between generated and reference embeddings; the "real images" row is the mean cosine between
//! distinct reference images of one subject.

use tch::{Kind, Tensor};

/// Rows scaled to unit L2 norm.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [-1i64], true).clamp_min(1e-12)
}

/// Mean cosine over all pairs `(a_i, b_j)`. `a: [N, D]`, `b: [M, D]`.
pub fn mean_pairwise_cosine(a: &Tensor, b: &Tensor) -> f64 {
    let sims = l2_normalize(a).matmul(&l2_normalize(b).transpose(0, 1)); // [N, M]
    sims.mean(Kind::Double).double_value(&[])
}

/// Mean cosine over distinct pairs of one set (`i != j`), `None` with fewer than two rows.
pub fn mean_distinct_pair_cosine(a: &Tensor) -> Option<f64> {
    let n = a.size()[0];
    if n < 2 {
        return None;
    }
    let sims = l2_normalize(a).matmul(&l2_normalize(a).transpose(0, 1)); // [N, N]
    let off_diagonal = sims.sum(Kind::Double) - sims.diagonal(0, 0, 1).sum(Kind::Double);
    Some(off_diagonal.double_value(&[]) / (n * (n - 1)) as f64)
}

#[cfg(test)]
mod tests {
    use tch::{Device, Tensor};

    use super::*;

    fn t(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 2]).to_device(Device::Cpu)
    }

    #[test]
    fn hand_built_embeddings_give_known_answers() {
        // Cosines: (1,0)·(1,0)=1, (1,0)·(0,1)=0, (0,2)·(1,0)=0, (0,2)·(0,1)=1 -> mean 0.5.
        let a = t(&[[1.0, 0.0], [0.0, 2.0]]);
        let b = t(&[[3.0, 0.0], [0.0, 1.0]]);
        assert!((mean_pairwise_cosine(&a, &b) - 0.5).abs() < 1e-9);
        // 45 degrees: cos = 1/sqrt(2).
        let c = t(&[[1.0, 1.0]]);
        assert!((mean_pairwise_cosine(&c, &t(&[[1.0, 0.0]])) - 0.5f64.sqrt()).abs() < 1e-6);
        // Distinct pairs of {(1,0), (0,1), (1,0)}: cosines 0, 1, 0 (each twice) -> 1/3.
        let d = t(&[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]);
        assert!((mean_distinct_pair_cosine(&d).unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert!(mean_distinct_pair_cosine(&t(&[[1.0, 0.0]])).is_none());
        // Opposite vectors: -1.
        assert!((mean_pairwise_cosine(&t(&[[1.0, 0.0]]), &t(&[[-5.0, 0.0]])) + 1.0).abs() < 1e-9);
    }
}
