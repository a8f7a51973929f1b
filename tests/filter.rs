//! The Filter on real photos with a real scorer (FEAT-I): planted near-duplicates and planted
//! off-subject photos (other DreamBench subjects) are rejected with the right reason; with the
//! defaults everything is kept and scored.

use proxytune_actors::runtime::Metrics;
use proxytune_actors::stages::filter::{Filter, FilterConfig, ImageMetric};
use proxytune_actors::stages::intake::{load_subject_folder, IntakeRules};
use proxytune_models::scorers::feat_i::FeatI;
use proxytune_models::scorers::ImageEmbedder;
use proxytune_schemas::{Proxy, ReferenceImage, RejectReason};
use tch::Device;

use crate::support::dreambench;

fn photos(subject: &str) -> Vec<ReferenceImage> {
    load_subject_folder(&dreambench().join(subject), "j", "dog2", "dog", &IntakeRules::default(), 0).unwrap()
}

fn as_proxy(image: &ReferenceImage, seed: u64) -> Proxy {
    let mut p = crate::support::proxy("j", "dog2", seed);
    p.image_png = image.image_png.clone();
    (p.width, p.height) = (image.width, image.height);
    (p.keep, p.reject_reason, p.score_dino, p.score_clip_t, p.filtered_at_us) =
        (None, None, None, None, None);
    p
}

fn filter(config: FilterConfig, references: Vec<ReferenceImage>) -> Filter {
    let feat = FeatI::load(&crate::scorers::weights(), Device::Cpu).unwrap();
    let embedders: Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)> =
        vec![(ImageMetric::FeatI, Box::new(feat))];
    Filter::new(config, embedders, None, references, Device::Cpu, &Metrics::noop()).unwrap()
}

#[test]
fn planted_duplicates_and_off_subject_photos_are_rejected() {
    let dog2 = photos("dog2"); // 6 photos: 0-3 are references, 4-5 stand for good proxies
    let references = dog2[..4].to_vec();
    let mut stream = vec![as_proxy(&dog2[4], 0), as_proxy(&dog2[5], 1), as_proxy(&dog2[4], 2)]; // 2 duplicates 0
    let intruders = ["backpack", "teapot", "robot_toy", "colorful_sneaker"];
    for (i, subject) in intruders.iter().enumerate() {
        stream.push(as_proxy(&photos(subject)[0], 10 + i as u64));
    }

    // Paper-faithful defaults: nothing is rejected, everything is scored.
    let out = filter(FilterConfig::default(), references.clone()).judge(stream.clone(), 1).unwrap();
    assert!(out.iter().all(|p| p.keep == Some(true) && p.score_feat_i.is_some()));
    let on: Vec<f32> = out[..2].iter().map(|p| p.score_feat_i.unwrap()).collect();
    let off: Vec<f32> = out[3..].iter().map(|p| p.score_feat_i.unwrap()).collect();
    eprintln!(
        "FEAT-I fidelity: dog2 proxies {on:?}, other subjects {off:?}, duplicate cosine {:?}",
        out[2].dup_max_cosine
    );
    assert!(on.iter().cloned().fold(f32::MAX, f32::min) > off.iter().cloned().fold(f32::MIN, f32::max));

    let config =
        FilterConfig { min_fidelity: Some(0.45), max_duplicate_cosine: Some(0.97), ..Default::default() };
    let out = filter(config, references).judge(stream, 1).unwrap();
    let reasons: Vec<Option<RejectReason>> = out.iter().map(|p| p.reject_reason).collect();
    assert_eq!(reasons[..3], [None, None, Some(RejectReason::NearDuplicate)], "{reasons:?}");
    assert!(reasons[3..].iter().all(|r| *r == Some(RejectReason::LowFidelity)), "{reasons:?}");
}
