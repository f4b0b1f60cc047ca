//! Every data format through `temper::data::prepare` (the training path), format detection,
//! column mapping (GSM8K), `.json` / `.parquet` files, recipes' `data:` sections, truncation.

use std::path::{Path, PathBuf};

use temper::data::recipe::data_config_from_str;
use temper::data::{prepare, DataConfig, DataFormat, Example, Prepared, TextTokenizer};
use temper::ops::loss::IGNORE_INDEX;

use crate::common::shared;

pub fn stories_tok() -> TextTokenizer {
    TextTokenizer::from_dir(&shared("models/stories260K")).expect("stories260K tokenizer")
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn prep(cfg: &DataConfig, tok: &TextTokenizer) -> Prepared {
    prepare(cfg, tok, Path::new("/"), 0).unwrap_or_else(|e| panic!("prepare: {e}"))
}

/// The trained tokens of an example, decoded.
pub fn trained_text(tok: &TextTokenizer, ex: &Example) -> String {
    let ids: Vec<u32> =
        ex.input_ids.iter().zip(&ex.labels).filter(|(_, &l)| l != IGNORE_INDEX).map(|(&i, _)| i).collect();
    tok.decode_with_special(&ids).unwrap()
}

#[test]
fn text_format_trains_every_token_and_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let f = write(tmp.path(), "t.jsonl", "{\"text\": \"Once upon a time\"}\n");
    let p = prep(&DataConfig::new(&f), &tok);
    assert_eq!(p.stats.format, "text");
    let ex = &p.train[0];
    let mut want = tok.encode("Once upon a time").unwrap();
    want.push(tok.eos_id().unwrap());
    assert_eq!(ex.input_ids, want);
    assert!(ex.labels.iter().zip(&ex.input_ids).all(|(&l, &i)| l == i as i64));
    assert_eq!(p.stats.trained_tokens, want.len() - 1);
}

#[test]
fn completion_format_trains_only_the_completion_and_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let f = write(tmp.path(), "c.jsonl", "{\"prompt\": \"Tom had a dog.\", \"completion\": \" The dog was big.\"}\n");
    let mut cfg = DataConfig::new(&f);
    let p = prep(&cfg, &tok);
    assert_eq!(p.stats.format, "completion");
    let ex = &p.train[0];
    let n_prompt = tok.encode("Tom had a dog.").unwrap().len();
    assert!(ex.labels[..n_prompt].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(
        ex.input_ids[..ex.input_ids.len() - 1],
        tok.encode("Tom had a dog. The dog was big.").unwrap()[..],
        "tokenised as one text"
    );
    assert_eq!(trained_text(&tok, ex).trim_start(), "The dog was big.</s>");
    cfg.train_on_inputs = true;
    let all = &prep(&cfg, &tok).train[0];
    assert!(all.labels.iter().all(|&l| l != IGNORE_INDEX));
    cfg.train_on_eos = false;
    let no_eos = &prep(&cfg, &tok).train[0];
    assert_eq!(*no_eos.labels.last().unwrap(), IGNORE_INDEX);
    assert_eq!(*no_eos.input_ids.last().unwrap(), tok.eos_id().unwrap(), "EOS stays in the input");
}

#[test]
fn alpaca_without_chat_template_uses_the_plain_template() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let f =
        write(tmp.path(), "a.jsonl", "{\"instruction\": \"Name a color.\", \"input\": \"\", \"output\": \"Red.\"}\n");
    let p = prep(&DataConfig::new(&f), &tok);
    assert_eq!(p.stats.format, "alpaca");
    let ex = &p.train[0];
    assert_eq!(trained_text(&tok, ex).trim_start(), "Red.</s>");
    let all = tok.decode_with_special(&ex.input_ids).unwrap();
    assert!(all.contains("### Instruction:\nName a color.\n\n### Response:\nRed."), "{all}");
}

#[test]
fn chat_and_sharegpt_rows_train_assistant_turns_only() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let chat = "{\"messages\": [{\"role\": \"system\", \"content\": \"Be kind.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, \
                {\"role\": \"assistant\", \"content\": \"Hello there.\"}, {\"role\": \"user\", \"content\": \"Bye\"}, \
                {\"role\": \"assistant\", \"content\": \"Good bye.\"}]}\n";
    let share = "{\"conversations\": [{\"from\": \"system\", \"value\": \"Be kind.\"}, {\"from\": \"human\", \"value\": \"Hi\"}, \
                 {\"from\": \"gpt\", \"value\": \"Hello there.\"}, {\"from\": \"human\", \"value\": \"Bye\"}, \
                 {\"from\": \"gpt\", \"value\": \"Good bye.\"}]}\n";
    let f = write(tmp.path(), "chat.jsonl", &format!("{chat}{share}"));
    let p = prep(&DataConfig::new(&f), &tok);
    assert_eq!(p.stats.format, "chat");
    assert_eq!(p.train.len(), 2);
    assert_eq!(p.train[0], p.train[1], "ShareGPT and messages rows give the same example");
    assert_eq!(trained_text(&tok, &p.train[0]), "Hello there.</s>Good bye.</s>");
}

#[test]
fn gsm8k_trains_as_completion_through_a_recipe_column_mapping() {
    let tok = stories_tok();
    let gsm8k = shared("datasets/gsm8k/train.jsonl");
    let yaml = format!(
        "base_model: ../shared/models/stories260K\n\
         data:\n  train: {}\n  format: completion\n  columns:\n    prompt: question\n    completion: answer\n  separator: \"\\n\"\n  seq_len: 1024\n  max_rows: 40\n\
         train:\n  epochs: 1\n",
        gsm8k.display()
    );
    let cfg = data_config_from_str(&yaml, Path::new("recipe.yaml")).unwrap();
    let p = prep(&cfg, &tok);
    assert_eq!(p.stats.rows, 40);
    let first = std::fs::read_to_string(&gsm8k).unwrap();
    let row: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(trained_text(&tok, &p.train[0]).trim_start(), format!("{}</s>", row["answer"].as_str().unwrap()));
    let all = tok.decode_with_special(&p.train[0].input_ids).unwrap();
    assert!(all.contains("April and May?\nNatalia sold 48/2"), "{all}");
    assert!(p.stats.trained_tokens > 0 && p.stats.trained_tokens < p.stats.tokens);
    // Auto-detection sees the mapped names too.
    let mut auto = cfg.clone();
    auto.format = DataFormat::Auto;
    assert_eq!(prep(&auto, &tok).stats.format, "completion");
}

#[test]
fn recipe_errors_name_the_key_path_and_line() {
    let yaml = "model: x\ndata:\n  train: a.jsonl\n  pakcing: true\n";
    let e = data_config_from_str(yaml, Path::new("r.yaml")).unwrap_err().to_string();
    assert!(e.contains("r.yaml") && e.contains("pakcing") && e.contains("line 4"), "{e}");
    let e = data_config_from_str("data:\n  train: a.jsonl\n  seq_len: many\n", Path::new("r.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.seq_len") && e.contains("line 3"), "{e}");
    let e = data_config_from_str("model: x\n", Path::new("r.yaml")).unwrap_err().to_string();
    assert!(e.contains("`data`"), "{e}");
}

#[test]
fn json_array_files_and_several_files_are_read_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let a = write(tmp.path(), "a.json", "[\n  {\"text\": \"one\"},\n  {\"text\": \"two\"}\n]\n");
    let b = write(tmp.path(), "b.jsonl", "{\"text\": \"three\"}\n");
    let mut cfg = DataConfig::new(&a);
    cfg.train_files = vec![b];
    let p = prep(&cfg, &tok);
    assert_eq!(p.stats.rows, 3);
    assert_eq!(p.stats.files.len(), 2);
    let bad = write(tmp.path(), "bad.json", "[\n  {\"text\": \"one\"},\n  {\"prompt\": 1}\n]\n");
    let e = prepare(&DataConfig::new(&bad), &tok, Path::new("/"), 0).unwrap_err().to_string();
    assert!(e.contains("bad.json:3") && e.contains("text"), "{e}");
}

fn write_parquet(path: &Path, questions: &[&str], answers: &[&str]) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = parquet::schema::parser::parse_message_type(
        "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
    )
    .unwrap();
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), Arc::new(schema), Arc::new(props)).unwrap();
    let mut rg = w.next_row_group().unwrap();
    for col in [questions, answers] {
        let mut c = rg.next_column().unwrap().unwrap();
        let vals: Vec<ByteArray> = col.iter().map(|s| ByteArray::from(*s)).collect();
        c.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
        c.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_rows_load_like_jsonl_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let pq = tmp.path().join("train-00000-of-00001.parquet");
    write_parquet(&pq, &["What is 1+1?", "What is 2+2?"], &["2", "4"]);
    let jl = write(
        tmp.path(),
        "same.jsonl",
        "{\"question\": \"What is 1+1?\", \"answer\": \"2\"}\n{\"question\": \"What is 2+2?\", \"answer\": \"4\"}\n",
    );
    let mut cfg = DataConfig::new(&pq);
    cfg.columns = [("prompt", "question"), ("completion", "answer")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let from_parquet = prep(&cfg, &tok);
    cfg.train = jl;
    assert_eq!(from_parquet.train, prep(&cfg, &tok).train);
    assert_eq!(from_parquet.stats.format, "completion");
}

#[test]
fn long_rows_are_truncated_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = stories_tok();
    let long = "The cat sat on the mat. ".repeat(40);
    let f = write(tmp.path(), "t.jsonl", &format!("{{\"text\": \"{long}\"}}\n{{\"text\": \"short\"}}\n"));
    let mut cfg = DataConfig::new(&f);
    cfg.seq_len = 32;
    let p = prep(&cfg, &tok);
    assert_eq!(p.stats.truncated_rows, 1);
    assert_eq!(p.train[0].input_ids.len(), 32);
    assert!(p.stats.report().contains("1 truncated"));
}
