//! OpenAssistant conversation trees -> chat JSONL (`{"messages": [...]}` per line), with the
//! library's reader (errors name file and line) and message type only.
//!
//! ```sh
//! cargo run --no-default-features --example flatten_oasst -- ../shared/datasets/oasst/en_100_tree.jsonl oasst_chat.jsonl
//! ```
//!
//! Each tree (`prompt` -> `replies` -> ..., `role` prompter/assistant) gives one conversation per
//! branch that ends in an assistant reply. Messages marked `"synthetic": true` (machine-written)
//! or `"deleted": true` are dropped with everything below them.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};
use temper::data::source::read_rows;
use temper::data::Message;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = &args[..] else {
        eprintln!("usage: flatten_oasst TREES.jsonl OUT.jsonl");
        return std::process::ExitCode::FAILURE;
    };
    match run(Path::new(input), Path::new(output)) {
        Ok((trees, convs)) => {
            eprintln!("{trees} trees -> {convs} conversations in {output}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn run(input: &Path, output: &Path) -> temper::Result<(usize, usize)> {
    let rows = read_rows(input, None)?;
    let mut out = Vec::new();
    for row in &rows {
        let obj = row.value.clone().map_err(|e| e.at(&row.file, row.line))?;
        let Some(Value::Object(root)) = obj.get("prompt") else {
            return Err(temper::Error::Data {
                path: input.to_path_buf(),
                line: row.line,
                reason: "missing object `prompt`".into(),
            });
        };
        flatten(root, &mut Vec::new(), &mut out);
    }
    let tmp = output.with_extension("jsonl.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| temper::Error::io(&tmp, e))?);
    for conv in &out {
        writeln!(f, "{}", json!({ "messages": conv })).map_err(|e| temper::Error::io(&tmp, e))?;
    }
    f.flush().map_err(|e| temper::Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, output).map_err(|e| temper::Error::io(output, e))?;
    Ok((rows.len(), out.len()))
}

/// Depth-first: `path` holds the messages above `node`; a conversation is written at each
/// assistant message that no longer branch continues.
fn flatten(node: &Map<String, Value>, path: &mut Vec<Message>, out: &mut Vec<Vec<Message>>) {
    let flag = |k: &str| node.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("synthetic") || flag("deleted") {
        return;
    }
    let role = match node.get("role").and_then(Value::as_str) {
        Some("prompter") => "user",
        Some("assistant") => "assistant",
        _ => return,
    };
    let Some(text) = node.get("text").and_then(Value::as_str) else { return };
    // Turns must alternate user / assistant, starting with the user.
    let expected = if path.len().is_multiple_of(2) { "user" } else { "assistant" };
    if role != expected || text.trim().is_empty() {
        return;
    }
    path.push(Message::new(role, text));
    let before = out.len();
    if let Some(Value::Array(replies)) = node.get("replies") {
        for r in replies {
            if let Value::Object(r) = r {
                flatten(r, path, out);
            }
        }
    }
    if role == "assistant" && out.len() == before {
        out.push(path.clone());
    }
    path.pop();
}
