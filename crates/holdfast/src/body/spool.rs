//! A request body read whole before its request goes upstream, the part past a
//! memory threshold in a file (FastCGI's request buffering: see
//! [`RequestBody::spool`](super::RequestBody::spool)).
//!
//! Owns: the spool file, an unlinked temporary file (`tempfile`: `O_TMPFILE` where
//! the file system has it), gone with the last handle to it, whatever way the
//! request ends; and reading it back as a body, from its start again for each
//! attempt. File I/O runs on tokio's blocking pool: a spooled body is large by
//! definition, and a disk under pressure must not stall a worker thread.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};

use super::BoxError;

/// Bytes gathered before each write to the file, and read back at a time.
pub(super) const CHUNK: usize = 64 * 1024;

/// The spool file could not be created, written or read (a full disk, a directory
/// gone): holdfast's own failure, answered with 500.
#[derive(Debug)]
pub struct SpoolError {
    pub dir: PathBuf,
    pub error: std::io::Error,
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spooling the request body in {}: {}",
            self.dir.display(),
            self.error
        )
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The file a body is written to as it arrives.
pub(super) struct SpoolWriter {
    file: Arc<File>,
    dir: PathBuf,
    pending: BytesMut,
    len: u64,
}

impl SpoolWriter {
    /// Creates the file in `dir` (`None`: the system's temporary directory),
    /// unlinked from the start.
    pub(super) async fn create(dir: Option<&Path>) -> Result<SpoolWriter, SpoolError> {
        let dir = dir.map_or_else(std::env::temp_dir, Path::to_owned);
        let owned = dir.clone();
        let file = blocking(move || tempfile::tempfile_in(owned))
            .await
            .map_err(|error| SpoolError {
                dir: dir.clone(),
                error,
            })?;
        Ok(SpoolWriter {
            file: Arc::new(file),
            dir,
            pending: BytesMut::with_capacity(CHUNK),
            len: 0,
        })
    }

    /// Bytes pushed so far.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    pub(super) async fn push(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.pending.extend_from_slice(data);
        self.len += data.len() as u64;
        if self.pending.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SpoolError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = self.pending.split().freeze();
        let file = self.file.clone();
        blocking(move || (&*file).write_all(&data))
            .await
            .map_err(|error| SpoolError {
                dir: self.dir.clone(),
                error,
            })
    }

    /// The body, all written, ready to be read from its start.
    pub(super) async fn finish(mut self) -> Result<Spooled, SpoolError> {
        self.flush().await?;
        Ok(Spooled {
            file: self.file,
            dir: self.dir,
            len: self.len,
            pos: 0,
            reading: None,
        })
    }
}

/// A body in a spool file, read from `pos` on.
pub struct Spooled {
    file: Arc<File>,
    dir: PathBuf,
    len: u64,
    pos: u64,
    reading: Option<tokio::task::JoinHandle<std::io::Result<Bytes>>>,
}

impl std::fmt::Debug for Spooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spooled")
            .field("len", &self.len)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl Spooled {
    /// The body's length in bytes.
    pub fn length(&self) -> u64 {
        self.len
    }

    /// Bytes not yet read.
    pub(super) fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// The same body from its start (the file is shared, not copied).
    pub fn rewound(&self) -> Spooled {
        Spooled {
            file: self.file.clone(),
            dir: self.dir.clone(),
            len: self.len,
            pos: 0,
            reading: None,
        }
    }

    pub fn is_end(&self) -> bool {
        self.pos >= self.len
    }

    /// The next piece of the body; `None` at its end.
    pub(super) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, BoxError>>> {
        if self.is_end() {
            return Poll::Ready(None);
        }
        let reading = self.reading.get_or_insert_with(|| {
            let file = self.file.clone();
            let (pos, want) = (self.pos, CHUNK.min((self.len - self.pos) as usize));
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; want];
                let mut got = 0;
                while got < want {
                    match file.read_at(&mut buf[got..], pos + got as u64)? {
                        0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        n => got += n,
                    }
                }
                Ok(Bytes::from(buf))
            })
        });
        let read = ready!(Pin::new(reading).poll(cx));
        self.reading = None;
        let error = match read {
            Ok(Ok(data)) => {
                self.pos += data.len() as u64;
                return Poll::Ready(Some(Ok(data)));
            }
            Ok(Err(e)) => e,
            Err(join) => std::io::Error::other(join),
        };
        Poll::Ready(Some(Err(Box::new(SpoolError {
            dir: self.dir.clone(),
            error,
        }))))
    }
}

/// Runs file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|join| Err(std::io::Error::other(join)))
}
