//! Unusable rows are reported with file and line and stop the run, or, with
//! `skip_invalid_rows`, are skipped and counted per reason (tests/data/bad_rows.jsonl).

use std::path::{Path, PathBuf};

use temper::data::{prepare, DataConfig, DataFormat};

use crate::data_formats::stories_tok;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad_rows.jsonl")
}

fn cfg(path: &Path) -> DataConfig {
    let mut c = DataConfig::new(path);
    c.format = DataFormat::Chat;
    c.seq_len = 256;
    c
}

#[test]
fn each_bad_row_is_reported_with_file_line_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let bytes = std::fs::read(corpus()).unwrap();
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let expected = [
        (2, "not valid JSON"),
        (3, "missing field `messages`"),
        (4, "empty assistant turn"),
        (5, "`messages` must be an array of messages, found a string"),
        (6, "`messages[0].content` must be a string, found a number"),
        (7, "unknown role `bot`"),
        (8, "no trained token after truncation to seq_len 256"),
        (9, "not valid UTF-8"),
    ];
    for (line, reason) in expected {
        // The good first row, then the bad one: the error names line 2 of that file.
        let f = tmp.path().join(format!("row{line}.jsonl"));
        std::fs::write(&f, [lines[0], b"\n", lines[line - 1], b"\n"].concat()).unwrap();
        let e = prepare(&cfg(&f), &tok, Path::new("/"), 0).unwrap_err().to_string();
        assert!(e.contains(&format!("row{line}.jsonl:2")) && e.contains(reason), "line {line}: {e}");
    }
    let e = prepare(&cfg(&corpus()), &tok, Path::new("/"), 0).unwrap_err().to_string();
    assert!(e.contains("bad_rows.jsonl:2: not valid JSON"), "{e}");
}

#[test]
fn skip_invalid_rows_counts_skipped_rows_per_reason() {
    let tok = stories_tok();
    let mut c = cfg(&corpus());
    c.skip_invalid_rows = true;
    let p = prepare(&c, &tok, Path::new("/"), 0).unwrap();
    assert_eq!(p.stats.rows, 2);
    let skipped: Vec<(&str, usize)> = p.stats.skipped.iter().map(|(k, &v)| (k.as_str(), v)).collect();
    assert_eq!(
        skipped,
        [
            ("empty_field", 1),
            ("invalid_json", 1),
            ("missing_field", 1),
            ("no_trained_tokens", 1),
            ("not_utf8", 1),
            ("unknown_role", 1),
            ("wrong_type", 2)
        ]
    );
    let report = p.stats.report();
    assert!(report.contains("skipped 2 rows: wrong_type"), "{report}");
    let json = serde_json::to_value(&p.stats).unwrap();
    assert_eq!(json["skipped"]["invalid_json"], 1);
}

#[test]
fn huge_text_row_is_truncated_not_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let f = tmp.path().join("huge.jsonl");
    std::fs::write(&f, format!("{{\"text\": \"{}\"}}\n", "a cat ".repeat(50_000))).unwrap();
    let mut c = DataConfig::new(&f);
    c.seq_len = 128;
    let p = prepare(&c, &tok, Path::new("/"), 0).unwrap();
    assert_eq!((p.stats.rows, p.stats.truncated_rows, p.train[0].input_ids.len()), (1, 1, 128));
}
