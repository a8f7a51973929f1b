//! A real peer reads our corpus: pylance (Python) opens what the Rust store wrote.

use std::process::Command;

use proxytune_actors::corpus::Corpus;
use proxytune_schemas::{Proxy, Table};

use crate::support::{proxies, python, repo_root};

#[tokio::test]
async fn pylance_reads_the_rust_written_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path()).unwrap();
    let mut table = corpus.table::<Proxy>().await.unwrap();
    table.append_rows(&proxies("j", 0..7)).await.unwrap();
    table.append_rows(&proxies("j", 5..12)).await.unwrap();

    let out = Command::new(python())
        .arg(repo_root().join("tools/check_corpus.py"))
        .arg(dir.path())
        .arg(Proxy::NAME)
        .output()
        .expect("run the project's python");
    assert!(out.status.success(), "pylance failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(report["rows"], 12);
    assert_eq!(report["version"], 2);
    let keys: Vec<String> = serde_json::from_value(report["keys"].clone()).unwrap();
    let expected: Vec<String> = proxies("j", 0..12).iter().map(|p| p.key().to_string()).collect();
    assert_eq!(keys, expected);
    let schema = report["schema"].as_object().unwrap();
    let names: Vec<&String> = schema.keys().collect();
    assert_eq!(names.len(), Proxy::schema().fields().len());
    assert_eq!(schema["image_png"], "large_binary");
    assert_eq!(schema["seed"], "uint64");
    assert_eq!(schema["generated_at"], "timestamp[us, tz=UTC]");
    assert_eq!(schema["keep"], "bool");
    assert_eq!(report["first_image"]["width"], 16);
    assert_eq!(report["first_image"]["mode"], "RGB");
    assert_eq!(report["first_row_width"], 16);
}
