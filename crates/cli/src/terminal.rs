//! Status lines on stderr: live progress on a terminal, plain lines
//! otherwise.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty takes no pointers.
    unsafe { libc::isatty(fd) == 1 }
}

/// One status line such as `Pulling python:3.12 ... done`. On a terminal it
/// is redrawn with progress; elsewhere only the final line is printed.
pub struct StatusLine {
    label: String,
    live: bool,
    started: Instant,
    last_draw: Mutex<Option<Instant>>,
}

impl StatusLine {
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            live: is_terminal(2),
            started: Instant::now(),
            last_draw: Mutex::new(None),
        }
    }

    /// Redraws the line with `detail`, at most ten times a second, and only
    /// after the work has taken a moment so quick steps do not flicker.
    pub fn update(&self, detail: &str) {
        if !self.live || self.started.elapsed() < Duration::from_millis(200) {
            return;
        }
        let mut last = self.last_draw.lock().unwrap();
        if last.is_some_and(|at| at.elapsed() < Duration::from_millis(100)) {
            return;
        }
        *last = Some(Instant::now());
        note_part!("\r\x1b[2K{} ... {detail}", self.label);
        let _ = std::io::stderr().flush();
    }

    /// Prints the final line: `LABEL ... OUTCOME`.
    pub fn finish(&self, outcome: &str) {
        if self.live {
            note_part!("\r\x1b[2K");
        }
        note!("{} ... {outcome}", self.label);
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Formats a byte count with a binary unit.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a duration the way step lines show it: `0.4s`, `3.1s`, `2m05s`.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(10 << 20), "10.0 MiB");
    }

    #[test]
    fn durations_switch_to_minutes() {
        assert_eq!(format_duration(Duration::from_millis(1400)), "1.4s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
    }
}
