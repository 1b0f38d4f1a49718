//! Progress bars for clone on a terminal (indicatif): overall bytes, one line per table part in
//! flight, indexes. Log lines go through the same `MultiProgress` (see `LogWriter`), so bars and
//! logs never tear each other. Off a terminal (CI, files) there are no bars: clone logs a
//! progress line every 10 seconds instead.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::state::PartInFlight;

/// The bars' owner while a clone draws them; log lines are printed above them.
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Whether progress bars are drawn (stderr is a terminal and PGTIDE_NO_PROGRESS is unset).
pub fn enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("PGTIDE_NO_PROGRESS").is_none()
}

/// The clone's bars.
pub struct CloneBars {
    multi: MultiProgress,
    bytes: ProgressBar,
    indexes: ProgressBar,
    parts: HashMap<String, ProgressBar>,
}

impl CloneBars {
    /// Draws the bars when stderr is a terminal; None otherwise.
    pub fn start(total_bytes: u64, indexes_total: u64) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let multi = BARS
            .get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)))
            .clone();
        let bytes = multi.add(ProgressBar::new(total_bytes.max(1)));
        bytes.set_style(
            ProgressStyle::with_template(
                "copy    [{bar:40}] {bytes}/~{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let indexes = multi.add(ProgressBar::new(indexes_total));
        indexes.set_style(
            ProgressStyle::with_template("indexes [{bar:40}] {pos}/{len}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Some(CloneBars {
            multi,
            bytes,
            indexes,
            parts: HashMap::new(),
        })
    }

    /// Moves the bars to the latest figures; one spinner line per part in flight.
    pub fn update(&mut self, bytes: u64, indexes_done: u64, in_flight: &[PartInFlight]) {
        self.bytes
            .set_position(bytes.min(self.bytes.length().unwrap_or(u64::MAX)));
        self.indexes.set_position(indexes_done);
        let label = |p: &PartInFlight| {
            if p.nparts > 1 {
                format!("{}.{} part {}/{}", p.schema, p.table, p.part + 1, p.nparts)
            } else {
                format!("{}.{}", p.schema, p.table)
            }
        };
        let names: Vec<String> = in_flight.iter().map(label).collect();
        self.parts.retain(|name, bar| {
            let keep = names.contains(name);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for name in names {
            self.parts.entry(name.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {msg} ({elapsed})")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.enable_steady_tick(Duration::from_millis(250));
                bar
            });
        }
        for p in in_flight {
            if let Some(bar) = self.parts.get(&label(p)) {
                bar.set_message(format!(
                    "{}: {} of ~{}",
                    label(p),
                    crate::units::human_bytes(p.bytes),
                    crate::units::human_bytes(p.expected_bytes)
                ));
            }
        }
    }

    pub fn finish(self) {
        for bar in self.parts.values() {
            bar.finish_and_clear();
        }
        self.bytes.finish_and_clear();
        self.indexes.finish_and_clear();
    }
}

/// A tracing writer that prints each log line above the bars when they are drawn.
pub struct LogWriter {
    line: Vec<u8>,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.line);
        match BARS.get() {
            Some(multi) => multi.suspend(|| std::io::stderr().write_all(&line)),
            None => std::io::stderr().write_all(&line),
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// For `tracing_subscriber::fmt().with_writer(progress::log_writer)`.
pub fn log_writer() -> LogWriter {
    LogWriter { line: Vec::new() }
}
