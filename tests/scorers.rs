//! Scorers on real weights and real photos: EfficientNet-Lite0 (FEAT-I) against its reference
//! implementation, and the DreamBench "real images" row at 128 and 64 px against an independent
//! reference computation.

use std::path::PathBuf;

use proxytune_actors::stages::intake::read_subjects_tsv;
use proxytune_models::rng::{Draws, Stream};
use proxytune_models::scorers::feat_i::{FeatI, WEIGHTS_FILE};
use proxytune_models::scorers::preprocess::rgb8_to_tensor;
use proxytune_models::scorers::similarity::mean_distinct_pair_cosine;
use proxytune_models::scorers::ImageEmbedder;
use proxytune_models::weights::read_safetensors;
use tch::{Device, Kind, Tensor};

use crate::support::{dreambench, repo_root};

pub fn weights() -> PathBuf {
    let dir = std::env::var_os("PROXYTUNE_ASSETS")
        .expect("PROXYTUNE_ASSETS is not set: run the tests through `make test` (tools/dev test)");
    let path = PathBuf::from(dir).join(WEIGHTS_FILE);
    assert!(path.is_file(), "{} is missing: `tools/dev setup` fetches it", path.display());
    path
}

fn load_png(path: &std::path::Path) -> Tensor {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    rgb8_to_tensor(img.width(), img.height(), img.as_raw(), Device::Cpu).unwrap()
}

#[test]
fn efficientnet_lite0_matches_the_reference_implementation() {
    let feat = FeatI::load(&weights(), Device::Cpu).unwrap();
    let fixture =
        read_safetensors(&repo_root().join("models/tests/fixtures/efficientnet_lite0_parity.safetensors"))
            .unwrap();
    let input = &fixture["input"];
    let (features, logits) = tch::no_grad(|| {
        let f = feat.model().features(input);
        let l = feat.model().logits(input);
        (f, l)
    });
    let err_f = (&features - &fixture["features"]).abs().max().double_value(&[]);
    let err_l = (&logits - &fixture["logits"]).abs().max().double_value(&[]);
    eprintln!("EfficientNet-Lite0 parity: max |features - reference| = {err_f:.2e}, max |logits - reference| = {err_l:.2e}");
    // float32 on CPU, same libtorch; bound 1e-4 absolute on features and logits.
    assert!(err_f < 1e-4, "features differ from the reference by {err_f}");
    assert!(err_l < 1e-4, "logits differ from the reference by {err_l}");
}

/// FEAT-I's "real images" row on one folder of the vendored DreamBench photos (`""`: 128 px,
/// `"64"`: 64 px).
struct RealImagesRow {
    /// Per subject (subjects.tsv order): (name, same-subject mean, mean over the other subjects).
    subjects: Vec<(String, f64, f64)>,
    same_mean: f64,
    /// Over every ordered pair of photos of different subjects.
    cross_mean: f64,
    subject_wins: usize,
    nn_accuracy: f64,
}

fn real_images_row(feat: &FeatI, folder: &str) -> RealImagesRow {
    let root = dreambench();
    let subjects = read_subjects_tsv(&root.join("subjects.tsv")).unwrap();
    assert_eq!(subjects.len(), 30);
    let mut embeddings = Vec::new(); // per subject [n, 1280], unit rows
    for s in &subjects {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(folder).join(&s.subject))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        files.sort();
        assert_eq!(files.len(), s.n_images, "{}", s.subject);
        let batch = Tensor::stack(&files.iter().map(|f| load_png(f)).collect::<Vec<_>>(), 0);
        embeddings.push(feat.embed(&batch).to_kind(Kind::Double));
    }
    let same: Vec<f64> = embeddings.iter().map(|e| mean_distinct_pair_cosine(e).unwrap()).collect();
    let mut rows = Vec::new();
    let mut subject_wins = 0;
    for (si, e) in embeddings.iter().enumerate() {
        let others: Vec<f64> = (0..embeddings.len())
            .filter(|&j| j != si)
            .map(|j| e.matmul(&embeddings[j].transpose(0, 1)).mean(Kind::Double).double_value(&[]))
            .collect();
        let cross = others.iter().sum::<f64>() / others.len() as f64;
        if same[si] > cross {
            subject_wins += 1;
        }
        rows.push((subjects[si].subject.clone(), same[si], cross));
    }
    let all = Tensor::cat(&embeddings, 0); // [158, 1280]
    let labels: Vec<usize> =
        embeddings.iter().enumerate().flat_map(|(i, e)| vec![i; e.size()[0] as usize]).collect();
    assert_eq!(labels.len(), 158);
    let sims: Vec<Vec<f64>> = Vec::try_from(&all.matmul(&all.transpose(0, 1))).unwrap(); // cosines
    let n = labels.len();
    let (mut cross_sum, mut cross_n, mut nn_hits) = (0.0, 0usize, 0usize);
    for i in 0..n {
        let mut best = (f64::MIN, 0);
        for j in (0..n).filter(|&j| j != i) {
            let v = sims[i][j];
            if labels[i] != labels[j] {
                cross_sum += v;
                cross_n += 1;
            }
            if v > best.0 {
                best = (v, j);
            }
        }
        if labels[best.1] == labels[i] {
            nn_hits += 1;
        }
    }
    RealImagesRow {
        subjects: rows,
        same_mean: same.iter().sum::<f64>() / same.len() as f64,
        cross_mean: cross_sum / cross_n as f64,
        subject_wins,
        nn_accuracy: nn_hits as f64 / n as f64,
    }
}

/// The row equals an independent reference within 0.01 for every subject and both means, at 128
/// and 64 px: `models/tests/fixtures/feat_i_dreambench.json`, computed by
/// `tools/parity/feat_i_dreambench.py` with a third-party EfficientNet-Lite0 (the PyPI package
/// `efficientnet-lite-pytorch`), the original checkpoint and PIL's resize. (The reference's
/// 8-bit-resize variant moves the means by 0.011: the bound tells the two apart.)
#[test]
fn feat_i_real_images_row_equals_the_independent_reference_at_128_and_64_px() {
    let feat = FeatI::load(&weights(), Device::Cpu).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("models/tests/fixtures/feat_i_dreambench.json")).unwrap(),
    )
    .unwrap();
    for (folder, key) in [("", "128"), ("64", "64")] {
        let reference = &fixture["resolutions"][key];
        let row = real_images_row(&feat, folder);
        eprintln!(
            "FEAT-I real-images row at {key} px: same-subject {:.4} (reference {:.4}), cross-subject {:.4} \
             (reference {:.4}), 1-NN subject accuracy {:.3}, same > cross for {}/30 subjects",
            row.same_mean,
            reference["same_mean"].as_f64().unwrap(),
            row.cross_mean,
            reference["cross_mean"].as_f64().unwrap(),
            row.nn_accuracy,
            row.subject_wins
        );
        let mut worst = 0.0f64;
        for (name, same, cross) in &row.subjects {
            let r = &reference["subjects"][name];
            let (r_same, r_cross) = (r["same"].as_f64().unwrap(), r["cross"].as_f64().unwrap());
            worst = worst.max((same - r_same).abs()).max((cross - r_cross).abs());
            assert!((same - r_same).abs() < 0.01, "{key} px {name}: same {same} vs reference {r_same}");
            assert!((cross - r_cross).abs() < 0.01, "{key} px {name}: cross {cross} vs reference {r_cross}");
        }
        eprintln!("  largest per-subject difference from the reference: {worst:.2e}");
        for (ours, theirs) in [(row.same_mean, "same_mean"), (row.cross_mean, "cross_mean")] {
            let r = reference[theirs].as_f64().unwrap();
            assert!((ours - r).abs() < 0.01, "{key} px {theirs}: {ours} vs reference {r}");
        }
        assert_eq!(row.subject_wins, 30, "{key} px: same beats cross for every subject");
        assert_eq!(row.subject_wins as u64, reference["subject_wins"].as_u64().unwrap());
        let r_nn = reference["nn_accuracy"].as_f64().unwrap();
        assert!(
            (row.nn_accuracy - r_nn).abs() <= 1.0 / 158.0 + 1e-9,
            "{key} px 1-NN {} vs {r_nn}",
            row.nn_accuracy
        );
    }
}

#[test]
fn imagenet_labels_of_real_photos_are_right() {
    let feat = FeatI::load(&weights(), Device::Cpu).unwrap();
    // ImageNet-1k indices: 850 teddy bear, 849 teapot.
    for (file, class) in [("bear_plushie/00.png", 850), ("teapot/00.png", 849)] {
        let image = load_png(&dreambench().join(file)).unsqueeze(0);
        let logits = tch::no_grad(|| feat.model().logits(&feat.prepare(&image)));
        let top5: Vec<i64> = Vec::try_from(logits.topk(5, -1, true, true).1.view([-1])).unwrap();
        assert!(top5.contains(&class), "{file}: top-5 {top5:?} lacks class {class}");
    }
}

/// Returns the subject's own reference photos (cycled): a perfect-fidelity generator.
struct Echo(proxytune_actors::evaluation::dreambench::DreamBench);

impl proxytune_actors::evaluation::dreambench::Generator for Echo {
    fn role(&self) -> proxytune_schemas::ModelRole {
        proxytune_schemas::ModelRole::Supervisor
    }
    fn version(&self) -> String {
        "echo".into()
    }
    fn generate(
        &mut self,
        subject: &proxytune_actors::stages::intake::SubjectEntry,
        _: &str,
        seeds: &[u64],
    ) -> proxytune_actors::Result<Tensor> {
        let refs = self.0.references(subject, Device::Cpu)?;
        let n = refs.size()[0];
        let picks: Vec<i64> = seeds.iter().map(|s| (*s as i64) % n).collect();
        Ok(refs.index_select(0, &Tensor::from_slice(&picks)))
    }
}

/// Uniform noise images: a no-fidelity generator.
struct Noise(Vec<u64>);

impl proxytune_actors::evaluation::dreambench::Generator for Noise {
    fn role(&self) -> proxytune_schemas::ModelRole {
        proxytune_schemas::ModelRole::Student
    }
    fn version(&self) -> String {
        "noise".into()
    }
    fn generate(
        &mut self,
        _: &proxytune_actors::stages::intake::SubjectEntry,
        _: &str,
        seeds: &[u64],
    ) -> proxytune_actors::Result<Tensor> {
        self.0.extend_from_slice(seeds);
        let mut draws = Draws::new(seeds[0], Stream::SampleNoise, 0);
        Ok(draws.uniform(&[seeds.len() as i64, 3, 64, 64], 0.0, 1.0))
    }
}

#[test]
fn the_dreambench_protocol_scores_generators_with_shared_seeds() {
    use proxytune_actors::evaluation::dreambench::{evaluate_generator, DreamBench, ProtocolConfig};
    let bench = DreamBench::open(&dreambench()).unwrap();
    let feat = FeatI::load(&weights(), Device::Cpu).unwrap();
    let subjects: Vec<_> =
        bench.subjects.iter().filter(|s| ["dog2", "teapot"].contains(&s.subject.as_str())).cloned().collect();
    let cfg = ProtocolConfig { max_prompts: Some(5), ..Default::default() };
    let metrics: Vec<&dyn ImageEmbedder> = vec![&feat];
    let echo =
        evaluate_generator(&bench, &subjects, &mut Echo(bench.clone()), &metrics, None, &cfg, Device::Cpu)
            .unwrap();
    let mut noise_gen = Noise(Vec::new());
    let noise =
        evaluate_generator(&bench, &subjects, &mut noise_gen, &metrics, None, &cfg, Device::Cpu).unwrap();
    assert_eq!(echo.samples.len(), 2 * 5 * 4, "subjects x prompts x images");
    assert_eq!(noise.samples.len(), 40);
    let seeds = |r: &proxytune_actors::evaluation::dreambench::GeneratorReport| {
        r.samples.iter().map(|s| s.seed).collect::<Vec<_>>()
    };
    assert_eq!(seeds(&echo), seeds(&noise), "every model gets the same seeds");
    assert_eq!(seeds(&echo).iter().collect::<std::collections::HashSet<_>>().len(), 40, "distinct seeds");
    let e = echo.metrics["FEAT-I"].all.unwrap();
    let n = noise.metrics["FEAT-I"].all.unwrap();
    eprintln!("FEAT-I: echo generator {e:.3}, noise generator {n:.3}");
    assert!(e > n + 0.2, "echo {e} vs noise {n}");
    assert_eq!(echo.per_prompt["dog2"].len(), 5);
    assert!(echo.per_prompt["dog2"][0].prompt.contains("sks dog"));
    assert!(echo
        .samples
        .iter()
        .all(|s| s.score_feat_i.is_some() && image::load_from_memory(&s.image_png).is_ok()));
}
