//! The content-addressed blob store: `blobs/sha256/<hex>`. A blob is written to a
//! temporary file while its digest is computed, fsynced, and renamed into place only when
//! the digest matches, so every file under `blobs/sha256/` is complete and verified.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::{ImageError, io_err, task_err};
use super::reference::sha256_hex;

/// Blobs under `<root>/blobs/sha256`, temporary files under the store's `tmp/`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// Blobs in `<root>/blobs/sha256`, partial downloads in `tmp` (same file system).
    pub fn new(root: &Path, tmp: &Path) -> Result<Self, ImageError> {
        let dir = root.join("blobs/sha256");
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(BlobStore {
            dir,
            tmp: tmp.to_path_buf(),
        })
    }

    /// Where the blob `digest` (`sha256:<hex>`) lives.
    pub fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = sha256_hex(digest).ok_or_else(|| ImageError::Unsupported {
            reference: digest.to_string(),
            what: "digest (only sha256 blobs are stored)".to_string(),
        })?;
        Ok(self.dir.join(hex))
    }

    /// Whether the blob is stored (and therefore verified).
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Stores `data` as blob `digest`, refusing it if the digest does not match.
    pub fn write_bytes(&self, digest: &str, data: &[u8]) -> Result<(), ImageError> {
        let dest = self.path(digest)?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.to_string(),
                actual,
            });
        }
        let tmp = self.temp_path(digest);
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ImageError::io("write", &tmp, e)
        })?;
        self.commit(&tmp, &dest)
    }

    /// Stores the bytes of `stream` as blob `digest`, which must be `size` bytes (the
    /// descriptor's size): a stream that sends more is cut there, one that sends fewer
    /// refused. `progress` sees the running total. Returns the blob's size.
    pub async fn write_stream<S, B>(
        &self,
        digest: &str,
        size: u64,
        stream: S,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ImageError>
    where
        S: Stream<Item = std::io::Result<B>>,
        B: AsRef<[u8]>,
    {
        let dest = self.path(digest)?;
        let tmp = self.temp_path(digest);
        let result = async {
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(io_err("create", &tmp))?;
            let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            let mut stream = std::pin::pin!(stream);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(io_err("download", &dest))?;
                let chunk = chunk.as_ref();
                total += chunk.len() as u64;
                if total > size {
                    return Err(ImageError::SizeMismatch {
                        what: format!("blob {digest}"),
                        declared: size,
                        actual: format!("more than {size}"),
                    });
                }
                hasher.update(chunk);
                out.write_all(chunk).await.map_err(io_err("write", &tmp))?;
                progress(total);
            }
            if total != size {
                return Err(ImageError::SizeMismatch {
                    what: format!("blob {digest}"),
                    declared: size,
                    actual: total.to_string(),
                });
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != digest {
                return Err(ImageError::DigestMismatch {
                    what: format!("blob {digest}"),
                    expected: digest.to_string(),
                    actual,
                });
            }
            out.flush().await.map_err(io_err("write", &tmp))?;
            out.get_ref()
                .sync_all()
                .await
                .map_err(io_err("fsync", &tmp))?;
            Ok(total)
        }
        .await;
        match result {
            Ok(total) => {
                let this = self.clone();
                let dest2 = dest.clone();
                tokio::task::spawn_blocking(move || this.commit(&tmp, &dest2))
                    .await
                    .map_err(task_err(format!("commit blob {digest}")))??;
                Ok(total)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Removes the blob `digest`; a missing blob is not an error.
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        let path = self.path(digest)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ImageError::io("remove", &path, e))
            }
            _ => Ok(()),
        }
    }

    /// The digests of every stored blob.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut digests = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err("read", &self.dir))? {
            let entry = entry.map_err(io_err("read", &self.dir))?;
            if let Some(name) = entry.file_name().to_str() {
                let digest = format!("sha256:{name}");
                if sha256_hex(&digest).is_some() {
                    digests.push(digest);
                }
            }
        }
        Ok(digests)
    }

    fn temp_path(&self, digest: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let hex = sha256_hex(digest).unwrap_or("blob");
        self.tmp
            .join(format!("blob-{hex}-{}-{n}", std::process::id()))
    }

    /// Renames a complete, fsynced temporary file into place and makes the rename durable.
    fn commit(&self, tmp: &Path, dest: &Path) -> Result<(), ImageError> {
        std::fs::rename(tmp, dest).map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            ImageError::io("rename into", dest, e)
        })?;
        fsync_dir(&self.dir)
    }
}

/// Makes renames and creations in `dir` durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    fn store(dir: &Path) -> BlobStore {
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).expect("mkdir tmp");
        BlobStore::new(dir, &tmp).expect("blob store")
    }

    #[tokio::test]
    async fn streams_are_verified_before_they_appear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = store(dir.path());
        let data = b"hello layer".to_vec();
        let digest = digest_of(&data);
        let chunks = futures::stream::iter(
            data.chunks(3)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        );
        let mut seen = 0;
        let size = blobs
            .write_stream(&digest, data.len() as u64, chunks, |n| seen = n)
            .await
            .expect("write");
        assert_eq!(size, data.len() as u64);
        assert_eq!(seen, size);
        assert_eq!(
            std::fs::read(blobs.path(&digest).expect("path")).expect("read"),
            data
        );
        assert_eq!(blobs.list().expect("list"), vec![digest.clone()]);

        // Wrong content under a digest never lands in the store, nor in tmp.
        let other = digest_of(b"other");
        let err = blobs
            .write_stream(
                &other,
                4,
                futures::stream::iter([Ok::<_, std::io::Error>(b"evil".to_vec())]),
                |_| {},
            )
            .await
            .expect_err("mismatch");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!blobs.contains(&other));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );

        // More bytes than the descriptor says: cut at the declared size, refused, and
        // the rest of the stream is never asked for (an endless stream ends the write).
        let mut sent = 0u64;
        let endless = futures::stream::repeat_with(|| {
            sent += 1;
            Ok::<_, std::io::Error>(vec![0u8; 1000])
        });
        let err = blobs
            .write_stream(&other, 2500, endless, |_| {})
            .await
            .expect_err("too long");
        assert!(
            matches!(&err, ImageError::SizeMismatch { declared: 2500, actual, .. } if actual == "more than 2500"),
            "{err}"
        );
        assert_eq!(sent, 3, "read up to the declared size, no further");
        // Fewer: refused too, before the digest is looked at.
        let err = blobs
            .write_stream(
                &digest,
                data.len() as u64 + 1,
                futures::stream::iter([Ok::<_, std::io::Error>(data.clone())]),
                |_| {},
            )
            .await
            .expect_err("too short");
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0,
            "no partial blob"
        );
    }

    #[test]
    fn bytes_are_verified_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = store(dir.path());
        let digest = digest_of(b"config");
        blobs
            .write_bytes(&digest_of(b"x"), b"config")
            .expect_err("mismatch");
        blobs.write_bytes(&digest, b"config").expect("write");
        assert!(blobs.contains(&digest));
        blobs.remove(&digest).expect("remove");
        assert!(!blobs.contains(&digest));
        blobs.remove(&digest).expect("removing twice is fine");
        assert!(blobs.path("sha512:00").is_err());
    }
}
