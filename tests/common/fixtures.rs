//! SQL fixtures shared by several test files.

use std::path::Path;

pub fn hard_cases_sql() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hard_cases.sql"),
    )
    .unwrap()
}
