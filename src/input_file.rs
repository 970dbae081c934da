//! Files the operator points the exporter at: the config file, the web
//! config file and the TLS files it names, and the secret files.
//!
//! Each is read only when it is a regular file (after following symlinks, as
//! Kubernetes mounts secrets through them), and only up to a size limit, so a
//! FIFO cannot block start-up or a reload and a device such as `/dev/zero`
//! cannot fill memory. The check is made on the path before the file is
//! opened, because opening a FIFO already blocks: a regular file swapped for
//! a FIFO between the check and the open still blocks the read.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputFileError {
    /// The file is missing, unreadable, or reading it failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),

    /// The path names a directory, a FIFO, a device or a socket.
    #[error("it is {kind}, not a regular file")]
    NotRegular {
        /// What the path names instead, with its article ("a directory").
        kind: &'static str,
    },

    /// The file holds more than the limit for its kind.
    #[error("it is larger than {limit}")]
    TooLarge {
        /// The limit that was passed.
        limit: Size,
    },

    /// The file is not UTF-8 text.
    #[error("it is not UTF-8 text")]
    NotUtf8,
}

/// A size limit in bytes, printed in the largest whole binary unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: u64 = 1024;
        match self.0 {
            n if n >= KIB * KIB && n % (KIB * KIB) == 0 => write!(f, "{} MiB", n / (KIB * KIB)),
            n if n >= KIB && n % KIB == 0 => write!(f, "{} KiB", n / KIB),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// Reads the regular file at `path` as UTF-8 text of at most `limit` bytes.
pub fn read_to_string(path: &Path, limit: u64) -> Result<String, InputFileError> {
    String::from_utf8(read(path, limit)?).map_err(|_| InputFileError::NotUtf8)
}

/// Reads the regular file at `path`, of at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, InputFileError> {
    // `metadata` follows symlinks: a link to a regular file is accepted.
    let kind = std::fs::metadata(path)?.file_type();
    if !kind.is_file() {
        return Err(InputFileError::NotRegular {
            kind: describe(kind),
        });
    }

    // One byte past the limit tells a file of exactly `limit` bytes from a
    // larger one (or one that grew since the check).
    let mut bytes = Vec::new();
    File::open(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(InputFileError::TooLarge { limit: Size(limit) });
    }
    Ok(bytes)
}

fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a named pipe (FIFO)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_and_links_to_them_are_read() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "tok\n").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");

        assert_eq!(read_to_string(&file, 4).expect("file"), "tok\n");
        assert_eq!(read_to_string(&link, 4).expect("link"), "tok\n");
    }

    #[test]
    fn directories_fifos_and_devices_are_refused_without_reading() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());

        // Nothing writes to the FIFO: opening it would block this test.
        for (path, kind) in [
            (dir.path(), "a directory"),
            (fifo.as_path(), "a named pipe (FIFO)"),
            (Path::new("/dev/zero"), "a character device"),
        ] {
            let err = read(path, 1024).expect_err("not regular").to_string();
            assert_eq!(err, format!("it is {kind}, not a regular file"));
        }
    }

    #[test]
    fn files_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("config.yml");
        std::fs::write(&file, vec![b'#'; 2048]).expect("write");

        assert_eq!(read(&file, 2048).expect("at the limit").len(), 2048);
        let err = read(&file, 2047).expect_err("too large").to_string();
        assert_eq!(err, "it is larger than 2047 bytes");
        let err = read(&file, 1024).expect_err("too large").to_string();
        assert_eq!(err, "it is larger than 1 KiB");
        assert_eq!(Size(1024 * 1024).to_string(), "1 MiB");
    }

    #[test]
    fn missing_and_binary_files_say_why() {
        let dir = tempfile::tempdir().expect("dir");
        let binary = dir.path().join("key");
        std::fs::write(&binary, [0xff, 0xfe]).expect("write");

        let missing = read(&dir.path().join("nope"), 10).expect_err("missing");
        let binary = read_to_string(&binary, 10).expect_err("binary");

        assert!(
            matches!(&missing, InputFileError::Io(e) if e.kind() == std::io::ErrorKind::NotFound),
            "{missing}"
        );
        assert_eq!(binary.to_string(), "it is not UTF-8 text");
    }
}
