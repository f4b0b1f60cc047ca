//! Parquet tables (as the Hub's dataset converter writes them) -> JSON rows, one per table row.
//! Row numbers are 1-based and stand in for line numbers in errors. Snappy-compressed or
//! uncompressed files are read; other codecs are refused with the file named.

use std::path::PathBuf;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use crate::data::source::{RawRow, RowError, SkipReason};
use crate::{Error, Result};

pub fn read_parquet(file: &Arc<PathBuf>, limit: usize) -> Result<Vec<RawRow>> {
    let err = |line: usize, e: parquet::errors::ParquetError| Error::Data {
        path: file.to_path_buf(),
        line,
        reason: format!("cannot read Parquet: {e}"),
    };
    let f = std::fs::File::open(file.as_path()).map_err(|e| Error::io(file.as_path(), e))?;
    let reader = SerializedFileReader::new(f).map_err(|e| err(0, e))?;
    let mut rows = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(|e| err(0, e))?.enumerate() {
        if rows.len() >= limit {
            break;
        }
        let row = row.map_err(|e| err(i + 1, e))?;
        let value = match row.to_json_value() {
            Value::Object(map) => Ok(map),
            _ => Err(RowError::new(SkipReason::WrongType, "row is not a record")),
        };
        rows.push(RawRow { file: file.clone(), line: i + 1, value });
    }
    Ok(rows)
}
