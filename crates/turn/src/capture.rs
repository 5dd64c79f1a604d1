//! Collecting a step's output: a bounded copy for the document and the store, and the
//! whole output spooled to a host temp file.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use upstream_runbook::RenderOptions;

use crate::error::{temp_file_error, TurnError};

/// Extra bytes kept beyond each bound, so that kept output is always longer than the
/// document's head plus tail whenever bytes were left out. The document then cuts inside
/// the gap and shows its `[...]` line there.
const MARGIN: usize = 4096;

/// Bytes of the end of the output kept in memory at least: the store keeps the last
/// 64 KiB of a step's output in its record by default.
const MIN_TAIL: usize = 64 * 1024;

/// The output of one step, stdout and stderr in arrival order.
pub(crate) struct Capture {
    head: Vec<u8>,
    head_limit: usize,
    tail: VecDeque<u8>,
    tail_limit: usize,
    total: u64,
    spool: Option<File>,
    spooled: u64,
    spool_limit: u64,
    spool_overflowed: bool,
}

impl Capture {
    pub fn new(render: &RenderOptions, spool_limit: u64) -> Result<Capture, TurnError> {
        Ok(Capture {
            head: Vec::new(),
            head_limit: render.head_bytes + MARGIN,
            tail: VecDeque::new(),
            tail_limit: (render.tail_bytes + MARGIN).max(MIN_TAIL),
            total: 0,
            spool: Some(tempfile::tempfile().map_err(temp_file_error("create"))?),
            spooled: 0,
            spool_limit,
            spool_overflowed: false,
        })
    }

    pub fn push(&mut self, data: &[u8]) -> Result<(), TurnError> {
        self.total += data.len() as u64;
        self.spool_write(data)?;

        let room = self.head_limit.saturating_sub(self.head.len());
        let (to_head, rest) = data.split_at(data.len().min(room));
        self.head.extend_from_slice(to_head);
        if rest.len() >= self.tail_limit {
            self.tail.clear();
            self.tail.extend(&rest[rest.len() - self.tail_limit..]);
        } else {
            let excess = (self.tail.len() + rest.len()).saturating_sub(self.tail_limit);
            self.tail.drain(..excess);
            self.tail.extend(rest);
        }
        Ok(())
    }

    fn spool_write(&mut self, data: &[u8]) -> Result<(), TurnError> {
        let Some(spool) = self.spool.as_mut() else {
            return Ok(());
        };
        if self.spooled + data.len() as u64 > self.spool_limit {
            // The full copy is given up as a whole rather than cut, so that what the store
            // keeps is always either all of the output or its bounded tail.
            self.spool = None;
            self.spool_overflowed = true;
            return Ok(());
        }
        spool
            .write_all(data)
            .map_err(temp_file_error("write output to"))?;
        self.spooled += data.len() as u64;
        Ok(())
    }

    /// Total bytes the step wrote.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether the output outgrew the spool limit, so only its tail can be stored.
    pub fn spool_overflowed(&self) -> bool {
        self.spool_overflowed
    }

    /// Returns the kept output, head then tail, and the bytes left out between them.
    pub fn bounded(&self) -> (Vec<u8>, u64) {
        let mut kept = self.head.clone();
        kept.extend(self.tail.iter());
        let left_out = self.total - kept.len() as u64;
        (kept, left_out)
    }

    /// Returns a reader of the output for the store: the whole spooled output, or its kept
    /// tail when the spool overflowed.
    pub fn into_reader(self) -> Result<Box<dyn Read>, TurnError> {
        match self.spool {
            Some(mut spool) => {
                spool
                    .seek(SeekFrom::Start(0))
                    .map_err(temp_file_error("rewind"))?;
                Ok(Box::new(spool))
            }
            None => {
                let tail: Vec<u8> = self.tail.into_iter().collect();
                Ok(Box::new(io::Cursor::new(tail)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> RenderOptions {
        RenderOptions {
            head_bytes: 10,
            tail_bytes: 10,
        }
    }

    #[test]
    fn short_output_is_kept_whole() {
        let mut capture = Capture::new(&small(), 1 << 20).unwrap();
        capture.push(b"hello ").unwrap();
        capture.push(b"world\n").unwrap();
        assert_eq!(capture.bounded(), (b"hello world\n".to_vec(), 0));
        let mut stored = Vec::new();
        capture
            .into_reader()
            .unwrap()
            .read_to_end(&mut stored)
            .unwrap();
        assert_eq!(stored, b"hello world\n");
    }

    #[test]
    fn long_output_keeps_head_and_tail() {
        let mut capture = Capture::new(&small(), 1 << 30).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(999) {
            capture.push(chunk).unwrap();
        }
        let (kept, left_out) = capture.bounded();
        assert_eq!(kept.len() as u64 + left_out, data.len() as u64);
        assert_eq!(&kept[..10 + MARGIN], &data[..10 + MARGIN]);
        assert_eq!(&kept[10 + MARGIN..], &data[data.len() - MIN_TAIL..]);
        assert!(kept.len() > 20, "kept output must exceed head plus tail");
        let mut stored = Vec::new();
        capture
            .into_reader()
            .unwrap()
            .read_to_end(&mut stored)
            .unwrap();
        assert_eq!(stored, data);
    }

    #[test]
    fn overflowing_spool_stores_tail() {
        let mut capture = Capture::new(&small(), 100).unwrap();
        capture.push(&[b'a'; 80]).unwrap();
        capture.push(&[b'b'; 80]).unwrap();
        assert!(capture.spool_overflowed());
        let mut stored = Vec::new();
        capture
            .into_reader()
            .unwrap()
            .read_to_end(&mut stored)
            .unwrap();
        assert_eq!(stored.len(), 160 - (10 + MARGIN).min(160));
    }
}
