//! The corpus store over real on-disk Lance datasets.

use std::time::Duration;

use arrow_array::{Array, Float32Array, RecordBatch, StringArray};
use futures::TryStreamExt;
use proxytune_actors::corpus::{Corpus, CorpusTable, Scan, VersionRef};
use proxytune_actors::Error;
use proxytune_schemas::{Proxy, ReferenceImage, Table};

use crate::support::{proxies, proxy};

async fn collect(table: &CorpusTable<Proxy>, scan: &Scan) -> Vec<RecordBatch> {
    table.scan(scan).await.unwrap().try_collect().await.unwrap()
}

async fn all_rows(table: &CorpusTable<Proxy>) -> Vec<Proxy> {
    let mut rows = Vec::new();
    for batch in collect(table, &Scan::default()).await {
        rows.extend(Proxy::from_batch(&batch).unwrap());
    }
    rows
}

#[tokio::test]
async fn appends_are_idempotent_by_row_key() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path().join("c")).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    assert_eq!(table.version(), None);

    let first = table.append_rows(&proxies("j", 0..10)).await.unwrap();
    assert_eq!((first.written, first.skipped, first.version), (10, 0, Some(1)));

    // The same ten again plus five new ones: only the new ones are written.
    let second = table.append_rows(&proxies("j", 0..15)).await.unwrap();
    assert_eq!((second.written, second.skipped, second.version), (5, 10, Some(2)));

    // Nothing new: no new version either.
    let third = table.append_rows(&proxies("j", 3..8)).await.unwrap();
    assert_eq!((third.written, third.skipped, third.version), (0, 5, Some(2)));

    // Repeats inside one batch are written once; a changed score does not change the identity.
    let mut changed = proxy("j", "dog2", 20);
    changed.score_dino = Some(0.99);
    let batch = vec![proxy("j", "dog2", 20), changed, proxy("j", "dog2", 21)];
    let fourth = table.append_rows(&batch).await.unwrap();
    assert_eq!((fourth.written, fourth.skipped), (2, 1));

    // A fresh handle (a restarted process) knows the stored keys too.
    let mut reopened = Corpus::open(dir.path().join("c")).unwrap().table::<Proxy>().await.unwrap();
    let again = reopened.append_rows(&proxies("j", 0..22)).await.unwrap();
    assert_eq!((again.written, again.skipped), (5, 17));

    let rows = all_rows(&reopened).await;
    assert_eq!(rows.len(), 22);
    let mut seeds: Vec<u64> = rows.iter().map(|p| p.seed).collect();
    seeds.sort();
    assert_eq!(seeds, (0..22).collect::<Vec<_>>());
    let twenty = rows.iter().find(|p| p.seed == 20).unwrap();
    assert_eq!(twenty, &proxy("j", "dog2", 20), "the first of two rows with one key is kept");
}

#[tokio::test]
async fn a_second_writer_is_seen_before_appending() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut a = corpus.table::<Proxy>().await.unwrap();
    let mut b = corpus.table::<Proxy>().await.unwrap();
    a.append_rows(&proxies("j", 0..4)).await.unwrap();
    // b opened before the table existed and before a's commit; it must still not duplicate.
    let out = b.append_rows(&proxies("j", 2..6)).await.unwrap();
    assert_eq!((out.written, out.skipped), (2, 2));
    let out = a.append_rows(&proxies("j", 0..7)).await.unwrap();
    assert_eq!((out.written, out.skipped), (1, 6));
    assert_eq!(a.count_rows(None).await.unwrap(), 7);
}

#[tokio::test]
async fn scans_stream_filtered_projected_batches() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    for chunk in 0..3u64 {
        let mut rows = proxies("j", chunk * 100..chunk * 100 + 100);
        rows.extend((chunk * 100..chunk * 100 + 20).map(|s| proxy("j", "cat", s)));
        table.append_rows(&rows).await.unwrap();
    }
    assert_eq!(table.count_rows(None).await.unwrap(), 360);

    let scan = Scan {
        filter: Some("keep = true AND subject = 'dog2' AND score_dino >= 1.0".into()),
        columns: Some(vec!["key".into(), "score_dino".into()]),
        batch_size: Some(16),
        ..Default::default()
    };
    let batches = collect(&table, &scan).await;
    assert!(batches.len() > 4, "expected a stream of several batches, got {}", batches.len());
    let sizes: Vec<usize> = batches.iter().map(RecordBatch::num_rows).collect();
    assert!(sizes.iter().all(|&n| n <= 16), "batch sizes {sizes:?}");
    let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["key", "score_dino"]);
    let mut count = 0;
    for batch in &batches {
        let scores = batch.column(1).as_any().downcast_ref::<Float32Array>().unwrap();
        assert!((0..scores.len()).all(|i| scores.value(i) >= 1.0));
        count += batch.num_rows();
    }
    // Seeds 100..300 with seed % 3 != 0 (keep), subject dog2.
    let expected = (100..300u64).filter(|s| s % 3 != 0).count();
    assert_eq!(count, expected);
    assert_eq!(table.count_rows(scan.filter.as_deref()).await.unwrap(), expected);

    let err = table
        .scan(&Scan { filter: Some("no_such_column > 3".into()), ..Default::default() })
        .await
        .err()
        .expect("a filter on an unknown column fails")
        .to_string();
    assert!(err.contains("no_such_column"), "{err}");
}

#[tokio::test]
async fn versions_tags_and_time_travel() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    for v in 0..4u64 {
        table.append_rows(&proxies("j", v * 10..v * 10 + 10)).await.unwrap();
    }
    let versions: Vec<u64> = table.versions().await.unwrap().iter().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2, 3, 4]);

    table.tag("trained-run-1", 2).await.unwrap();
    assert_eq!(table.tags().await.unwrap().get("trained-run-1"), Some(&2));

    let v2 = table.checkout(&VersionRef::Number(2)).await.unwrap();
    assert_eq!(v2.count_rows(None).await.unwrap(), 20);
    let by_tag = table.checkout(&"trained-run-1".parse().unwrap()).await.unwrap();
    assert_eq!(all_rows(&by_tag).await, proxies("j", 0..20));
    // A pinned scan reads the old version without a checkout.
    let pinned = Scan { version: Some(VersionRef::Number(1)), ..Default::default() };
    let n: usize = collect(&table, &pinned).await.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(n, 10);

    // An old version is read-only.
    let mut old = table.checkout(&VersionRef::Number(1)).await.unwrap();
    assert!(old.append_rows(&proxies("j", 100..101)).await.is_err());

    let err = table.checkout(&VersionRef::Number(99)).await.unwrap_err().to_string();
    assert!(err.contains("no version `99`"), "{err}");
    let err = table.checkout(&VersionRef::Tag("nope".into())).await.unwrap_err().to_string();
    assert!(err.contains("`nope`"), "{err}");
}

#[tokio::test]
async fn compaction_merges_fragments_keeps_row_order_and_tidying_then_frees_the_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    // Seeds out of order across commits: the order is the commits', not the seeds'.
    for v in [3u64, 0, 5, 1, 4, 2] {
        table.append_rows(&proxies("j", v * 5..v * 5 + 5)).await.unwrap();
    }
    assert_eq!(table.fragment_count(), 6);
    let before = all_rows(&table).await;
    let data_files = || std::fs::read_dir(corpus.table_path::<Proxy>().join("data")).unwrap().count();
    assert_eq!(data_files(), 6);
    let report = table.compact(1024).await.unwrap();
    assert_eq!((report.table, report.fragments_before, report.fragments_after), ("proxies", 6, 1));
    let compacted = report.version;
    assert!(compacted > 6, "a new version");
    assert_eq!(all_rows(&table).await, before, "every row, in the order committed");
    assert_eq!(table.checkout(&VersionRef::Number(2)).await.unwrap().count_rows(None).await.unwrap(), 10);
    // One fragment: nothing to do, no new version.
    assert_eq!(table.compact(1024).await.unwrap().version, compacted);
    assert_eq!(table.version(), Some(compacted));
    // The tidy removes the rewritten fragments' files with the versions that used them.
    let tidy = table.tidy("job-end").await.unwrap();
    assert_eq!((tidy.kept_version, tidy.versions_removed), (Some(compacted), compacted - 1));
    assert!(tidy.bytes_removed > 0);
    assert_eq!(data_files(), 1);
    assert_eq!(all_rows(&table).await, before);
    // Appending after compaction still deduplicates.
    let out = table.append_rows(&proxies("j", 25..35)).await.unwrap();
    assert_eq!((out.written, out.skipped), (5, 5));
    // The whole corpus: the written tables only.
    let reports = corpus.compact(1024).await.unwrap();
    let summary: Vec<_> = reports.iter().map(|r| (r.table, r.fragments_before, r.fragments_after)).collect();
    assert_eq!(summary, [("proxies", 2, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_scans_consistent_snapshots_while_a_writer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut writer = corpus.table::<Proxy>().await.unwrap();
    writer.append_rows(&proxies("j", 0..25)).await.unwrap();

    // The reader scans without pause and tells the version it saw; the writer appends the next
    // version once the reader has seen the current one, so every version is seen, whatever the
    // machine's speed, while appends run beside the scans.
    let (saw, seen_version) = tokio::sync::watch::channel(0u64);
    let reader_corpus = corpus.clone();
    let reader = tokio::spawn(async move {
        let mut table = reader_corpus.table::<Proxy>().await.unwrap();
        let mut seen = Vec::new();
        while seen.last() != Some(&(8, 200)) {
            table.refresh().await.unwrap();
            let version = table.version().unwrap();
            // Scan the whole snapshot: it must be exactly 25 rows per version.
            let rows: usize = table
                .scan(&Scan { columns: Some(vec!["key".into()]), ..Default::default() })
                .await
                .unwrap()
                .try_fold(0, |n, b| async move { Ok(n + b.num_rows()) })
                .await
                .unwrap();
            assert_eq!(rows as u64, 25 * version, "version {version} holds {rows} rows");
            if seen.last() != Some(&(version, rows)) {
                seen.push((version, rows));
                saw.send_replace(version);
            }
            tokio::task::yield_now().await;
        }
        seen
    });
    let mut seen_version = seen_version;
    for v in 1..8u64 {
        tokio::time::timeout(Duration::from_secs(120), seen_version.wait_for(|&seen| seen >= v))
            .await
            .expect("the reader saw the version")
            .unwrap();
        writer.append_rows(&proxies("j", v * 25..v * 25 + 25)).await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(120), reader).await.unwrap().unwrap();
    let expected: Vec<(u64, usize)> = (1..=8).map(|v| (v, 25 * v as usize)).collect();
    assert_eq!(seen, expected, "the reader saw every version, in order, each whole");
}

#[tokio::test]
async fn wrong_schema_is_rejected_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    table.append_rows(&proxies("j", 0..10)).await.unwrap();

    let good = Proxy::to_batch(&proxies("j", 10..12)).unwrap();
    let mut columns = good.columns().to_vec();
    let index = good.schema().index_of("prompt").unwrap();
    let mut fields: Vec<_> = good.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[index] = arrow_schema::Field::new("prompt", arrow_schema::DataType::Float32, false);
    columns[index] = std::sync::Arc::new(Float32Array::from(vec![1.0, 2.0]));
    let bad = RecordBatch::try_new(std::sync::Arc::new(arrow_schema::Schema::new(fields)), columns).unwrap();
    let err = table.append(&bad).await.unwrap_err();
    assert!(matches!(err, Error::Schema(_)), "{err:?}");
    assert!(err.to_string().contains("column `prompt` has type Float32, expected Utf8"), "{err}");

    let dropped = good.project(&[0, 1]).unwrap();
    let err = table.append(&dropped).await.unwrap_err().to_string();
    assert!(err.contains("is missing"), "{err}");

    let refs = ReferenceImage::to_batch(&[]).unwrap();
    assert!(table.append(&refs).await.is_err());

    let reopened = corpus.table::<Proxy>().await.unwrap();
    assert_eq!(reopened.version(), Some(1));
    assert_eq!(all_rows(&reopened).await, proxies("j", 0..10));
}

#[tokio::test]
async fn paths_that_are_not_corpora_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();

    // A plain file.
    let file = dir.path().join("file");
    std::fs::write(&file, "hello").unwrap();
    let err = Corpus::open_or_create(&file).unwrap_err().to_string();
    assert!(err.contains("not a proxytune corpus") && err.contains("file"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "hello");

    // A folder holding something else.
    let other = dir.path().join("photos");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("a.txt"), "keep me").unwrap();
    let err = Corpus::open_or_create(&other).unwrap_err().to_string();
    assert!(err.contains("photos") && err.contains("corpus.json"), "{err}");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
    assert!(Corpus::open(dir.path().join("missing")).is_err());

    // A table path that is not a Lance dataset.
    let corpus = Corpus::open_or_create(dir.path().join("c")).unwrap();
    std::fs::create_dir(corpus.table_path::<Proxy>()).unwrap();
    std::fs::write(corpus.table_path::<Proxy>().join("junk"), "x").unwrap();
    let err = corpus.table::<Proxy>().await.unwrap_err();
    assert!(matches!(err, Error::NotACorpus { .. }), "{err:?}");
    assert!(
        err.to_string().contains("proxies.lance") && err.to_string().contains("not a Lance dataset"),
        "{err}"
    );

    // A Lance dataset of another table under the proxies name.
    let corpus = Corpus::open_or_create(dir.path().join("d")).unwrap();
    let mut wrong = CorpusTable::<ReferenceImage>::open(corpus.table_path::<Proxy>()).await.unwrap();
    let refs = vec![ReferenceImage {
        job_id: "j".into(),
        subject: "s".into(),
        class_noun: "dog".into(),
        image_index: 0,
        source: "0.png".into(),
        image_png: crate::support::png(0, 8),
        width: 8,
        height: 8,
        created_at_us: 0,
    }];
    wrong.append_rows(&refs).await.unwrap();
    let err = corpus.table::<Proxy>().await.unwrap_err().to_string();
    assert!(err.contains("schema is not proxytune's `proxies` table"), "{err}");
    // The foreign dataset is still intact.
    assert_eq!(corpus.table::<ReferenceImage>().await.unwrap().count_rows(None).await.unwrap(), 0);
    assert_eq!(wrong.count_rows(None).await.unwrap(), 1);
    let keys: Vec<RecordBatch> = wrong.scan(&Scan::default()).await.unwrap().try_collect().await.unwrap();
    let key = keys[0].column_by_name("key").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(key.value(0), "job=j/subject=s/image=0");
}

#[tokio::test]
async fn every_table_reopens_with_its_schema() {
    use proxytune_schemas::{ClassPriorImage, EvalSample, ModelRole, VqTokens};
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let png = crate::support::png(1, 8);
    corpus
        .table::<ReferenceImage>()
        .await
        .unwrap()
        .append_rows(&[ReferenceImage {
            job_id: "j".into(),
            subject: "s".into(),
            class_noun: "dog".into(),
            image_index: 0,
            source: "0.png".into(),
            image_png: png.clone(),
            width: 8,
            height: 8,
            created_at_us: 1,
        }])
        .await
        .unwrap();
    corpus
        .table::<ClassPriorImage>()
        .await
        .unwrap()
        .append_rows(&[ClassPriorImage {
            job_id: "j".into(),
            class_noun: "dog".into(),
            prompt: "a dog".into(),
            seed: 3,
            model_id: "base".into(),
            image_png: png.clone(),
            width: 8,
            height: 8,
            created_at_us: 1,
        }])
        .await
        .unwrap();
    let tokens = VqTokens {
        proxy_key: proxy("j", "s", 1).key().to_string(),
        job_id: "j".into(),
        subject: "dog2".into(),
        prompt: "a sks dog".into(),
        tokenizer_id: "vq@1".into(),
        grid_height: 2,
        grid_width: 2,
        tokens: vec![1, 2, 3, 4],
        created_at_us: 1,
    };
    corpus.table::<VqTokens>().await.unwrap().append_rows(std::slice::from_ref(&tokens)).await.unwrap();
    let sample = EvalSample {
        job_id: "j".into(),
        model_role: ModelRole::Supervisor,
        model_version: "v1".into(),
        subject: "s".into(),
        prompt_index: 0,
        prompt: "a sks dog".into(),
        sample_index: 0,
        seed: 0,
        image_png: png,
        width: 8,
        height: 8,
        score_dino: Some(0.5),
        score_clip_i: None,
        score_clip_t: None,
        score_feat_i: Some(0.25),
        created_at_us: 1,
    };
    corpus.table::<EvalSample>().await.unwrap().append_rows(std::slice::from_ref(&sample)).await.unwrap();

    // Reopen every table from disk and read the rows back.
    let vq = corpus.table::<VqTokens>().await.unwrap();
    let batches: Vec<RecordBatch> = vq.scan(&Scan::default()).await.unwrap().try_collect().await.unwrap();
    assert_eq!(VqTokens::from_batch(&batches[0]).unwrap(), vec![tokens]);
    let ev = corpus.table::<EvalSample>().await.unwrap();
    let batches: Vec<RecordBatch> = ev.scan(&Scan::default()).await.unwrap().try_collect().await.unwrap();
    assert_eq!(EvalSample::from_batch(&batches[0]).unwrap(), vec![sample]);
    assert_eq!(corpus.table::<ReferenceImage>().await.unwrap().count_rows(None).await.unwrap(), 1);
    assert_eq!(corpus.table::<ClassPriorImage>().await.unwrap().count_rows(None).await.unwrap(), 1);
}

/// The newest manifest of `table_dir` (Lance's v2 names count down from `u64::MAX`).
pub(crate) fn newest_manifest(table_dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(table_dir.join("_versions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "manifest"))
        .min_by_key(|p| p.file_stem().unwrap().to_str().unwrap().parse::<u64>().unwrap())
        .unwrap()
}

pub(crate) fn cut_short(path: &std::path::Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap();
}

#[tokio::test]
async fn a_table_whose_newest_manifest_is_cut_short_opens_at_its_newest_whole_version() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let table_dir = corpus.table_path::<Proxy>();
    {
        let mut table = corpus.table::<Proxy>().await.unwrap();
        for v in 0..3u64 {
            table.append_rows(&proxies("j", v * 10..v * 10 + 10)).await.unwrap();
        }
    }
    let newest = newest_manifest(&table_dir);
    cut_short(&newest);
    let mut table = corpus.table::<Proxy>().await.unwrap();
    assert_eq!(table.version(), Some(2), "the newest whole version");
    assert_eq!(all_rows(&table).await, proxies("j", 0..20));
    let aside: Vec<_> = std::fs::read_dir(table_dir.join("_damaged_manifests")).unwrap().collect();
    assert_eq!(aside.len(), 1, "the damaged manifest is kept aside");
    assert!(!newest.exists());
    // A resumed writer writes the lost commit's rows again, each once.
    let outcome = table.append_rows(&proxies("j", 0..30)).await.unwrap();
    assert_eq!((outcome.written, outcome.skipped), (10, 20));
    assert_eq!(all_rows(&table).await, proxies("j", 0..30));
    drop(table);

    // With every manifest damaged there is nothing to fall back to: refused, nothing moved.
    let manifests: Vec<_> =
        std::fs::read_dir(table_dir.join("_versions")).unwrap().map(|e| e.unwrap().path()).collect();
    for m in &manifests {
        cut_short(m);
    }
    let err = corpus.table::<Proxy>().await.unwrap_err().to_string();
    assert!(err.contains("every manifest is damaged") && err.contains("proxies.lance"), "{err}");
    assert!(manifests.iter().all(|m| m.exists()), "nothing was moved");
}

#[tokio::test]
async fn light_reads_leave_images_on_disk_and_limited_reads_stop_at_their_limit() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    table.append_rows(&proxies("j", 0..30)).await.unwrap();
    let full = all_rows(&table).await;
    assert!(full.iter().all(|p| !p.image_png.is_empty()));
    let light = table.read_rows_light(None).await.unwrap();
    let stripped: Vec<Proxy> = full.iter().map(|p| Proxy { image_png: Vec::new(), ..p.clone() }).collect();
    assert_eq!(light, stripped, "every other field as stored, the image empty");
    let some = table.read_rows_limited(Some("seed >= 5"), 7).await.unwrap();
    assert_eq!(some, full.iter().filter(|p| p.seed >= 5).take(7).cloned().collect::<Vec<_>>());
    let generated = table.timestamps("generated_at").await.unwrap();
    assert_eq!(generated, full.iter().map(|p| p.generated_at_us).collect::<Vec<_>>());
    assert!(table.timestamps("seed").await.unwrap_err().to_string().contains("not a timestamp column"));
}

#[tokio::test]
async fn tidying_keeps_the_newest_and_the_tagged_versions_and_removes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    for v in 0..5u64 {
        table.append_rows(&proxies("j", v * 10..v * 10 + 10)).await.unwrap();
    }
    table.tag("trained-run-1", 2).await.unwrap();
    let manifests = |d: &std::path::Path| {
        std::fs::read_dir(d.join("_versions"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "manifest"))
            .count()
    };
    assert_eq!(manifests(&corpus.table_path::<Proxy>()), 5);
    let report = table.tidy("job-end").await.unwrap();
    assert_eq!((report.kept_version, report.versions_removed), (Some(5), 3));
    let versions: Vec<u64> = table.versions().await.unwrap().iter().map(|v| v.version).collect();
    assert_eq!(versions, [2, 5], "the tagged and the newest");
    assert_eq!(manifests(&corpus.table_path::<Proxy>()), 2);
    assert_eq!(table.tags().await.unwrap().get("job-end"), Some(&5));
    assert_eq!(all_rows(&table).await, proxies("j", 0..50));
    let v2 = table.checkout(&VersionRef::Tag("trained-run-1".into())).await.unwrap();
    assert_eq!(all_rows(&v2).await, proxies("j", 0..20), "a tagged version reads as before");
    // Again: nothing left to remove, the tag stays where it was; appends go on.
    assert_eq!(table.tidy("job-end").await.unwrap().versions_removed, 0);
    table.append_rows(&proxies("j", 50..60)).await.unwrap();
    assert_eq!(table.version(), Some(6));
    // The whole corpus: every table, the unwritten ones reported as such.
    let reports = corpus.tidy("job-end").await.unwrap();
    assert_eq!(reports.len(), 7);
    let proxies_report = reports.iter().find(|r| r.table == "proxies").unwrap();
    // `job-end` names version 5 already (a tag is never moved), so 2, 5 and the newest stay.
    assert_eq!((proxies_report.kept_version, proxies_report.versions_removed), (Some(6), 0));
    assert!(reports.iter().filter(|r| r.table != "proxies").all(|r| r.kept_version.is_none()));
}
