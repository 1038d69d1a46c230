//! The serial console log: its tail, and a follow stream that ends when
//! the VM stops.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_api::VmState;

use super::{Lifecycle, LifecycleError, VmPaths};

/// The last `lines` lines of `path` (all of it when `None`); empty when the
/// file does not exist yet.
pub fn tail_bytes(path: &Path, lines: Option<usize>) -> std::io::Result<(Vec<u8>, u64)> {
    let mut data = Vec::new();
    match std::fs::File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((data, 0)),
        Err(e) => return Err(e),
    }
    let len = data.len() as u64;
    if let Some(n) = lines {
        let body_len = data.len() - usize::from(data.ends_with(b"\n"));
        let cut = if n == 0 {
            data.len()
        } else {
            data[..body_len]
                .iter()
                .enumerate()
                .rev()
                .filter(|(_, b)| **b == b'\n')
                .nth(n - 1)
                .map_or(0, |(i, _)| i + 1)
        };
        data.drain(..cut);
    }
    Ok((data, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_counts_lines_from_the_end() {
        let d = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .unwrap();
        let p = d.path().join("console.log");
        assert_eq!(tail_bytes(&p, Some(2)).unwrap(), (vec![], 0));
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(tail_bytes(&p, Some(2)).unwrap().0, b"b\nc\n");
        assert_eq!(tail_bytes(&p, Some(10)).unwrap().0, b"a\nb\nc\n");
        assert_eq!(tail_bytes(&p, Some(0)).unwrap().0, b"");
        assert_eq!(tail_bytes(&p, None).unwrap(), (b"a\nb\nc\n".to_vec(), 6));
        std::fs::write(&p, "a\nb").unwrap();
        assert_eq!(tail_bytes(&p, Some(1)).unwrap().0, b"b");
    }
}

/// A follower of one VM's console: yields new bytes until the VM is no
/// longer starting or running and the file has no more.
#[derive(Debug)]
pub struct ConsoleFollow {
    lifecycle: Arc<Lifecycle>,
    id: uuid::Uuid,
    path: PathBuf,
    offset: u64,
}

impl ConsoleFollow {
    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Option<std::io::Result<Vec<u8>>> {
        loop {
            let mut buf = Vec::new();
            match std::fs::File::open(&self.path) {
                Ok(mut f) => {
                    let res = f
                        .seek(SeekFrom::Start(self.offset))
                        .and_then(|_| f.read_to_end(&mut buf));
                    if let Err(e) = res {
                        return Some(Err(e));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Some(Err(e)),
            }
            if !buf.is_empty() {
                self.offset += buf.len() as u64;
                return Some(Ok(buf));
            }
            let live = self
                .lifecycle
                .store()
                .get(self.id)
                .map(|r| matches!(r.state, VmState::Running | VmState::Starting))
                .unwrap_or(false);
            if !live {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Lifecycle {
    /// The console's tail, and a follower starting after it if `follow`.
    pub fn console(
        self: &Arc<Self>,
        key: &str,
        lines: Option<usize>,
        follow: bool,
    ) -> Result<(Vec<u8>, Option<ConsoleFollow>), LifecycleError> {
        let row = self.lookup(key)?;
        let path = VmPaths::new(&self.config, row.id).console_log;
        let (tail, offset) = tail_bytes(&path, lines).map_err(|source| LifecycleError::Io {
            op: "read console log",
            path: path.clone(),
            source,
        })?;
        let follower = follow.then(|| ConsoleFollow {
            lifecycle: self.clone(),
            id: row.id,
            path,
            offset,
        });
        Ok((tail, follower))
    }
}
