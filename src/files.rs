//! Files the relay creates (UNIX socket files, the `--hist-log` file): what may be done to them
//! by path, and which directories others must not be able to write.
//!
//! Invariants:
//! - After a socket is bound, nothing follows its path: the mode comes from the umask at bind,
//!   and the inode is checked and chowned through an `O_PATH|O_NOFOLLOW` fd of what the name
//!   holds. An entry swapped in between (a symlink, someone else's file) is refused, never
//!   changed.
//! - A file the relay appends to is opened with `O_NOFOLLOW`, refused unless it is a regular
//!   file owned by the relay's own uid with one link (a hard link planted to another file of
//!   root's would pass the owner check), and never opened so that a FIFO could block start-up.
//! - A directory on the way to such a file that someone other than root and the relay's uid can
//!   rename entries in (group- or world-writable without the sticky bit, or owned by another
//!   user) is warned about at start: from there, its final component can be swapped.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat};
use nix::unistd::{Gid, Uid, fchownat};

/// What a name held when the relay opened it without following it.
#[derive(Debug)]
pub struct Inode {
    /// An `O_PATH` fd: it names the inode, it cannot read or write it.
    fd: OwnedFd,
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
}

/// Opens the entry `path` names, not following a symlink there, and checks that it is a socket
/// owned by this process's uid (what `bind` just created). Err(InvalidData) names what it found
/// instead: the entry was swapped after bind.
pub fn own_socket(path: &Path) -> io::Result<Inode> {
    let fd = openat(AT_FDCWD, path, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(io::Error::from)?;
    let st = fstat(&fd).map_err(io::Error::from)?;
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    let own = Uid::effective().as_raw();
    if kind != SFlag::S_IFSOCK || st.st_uid != own {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the entry was replaced after bind (now {} owned by uid {}); refusing to touch it",
                kind_name(kind),
                st.st_uid
            ),
        ));
    }
    Ok(Inode { fd, dev: st.st_dev, ino: st.st_ino, mode: st.st_mode & 0o7777 })
}

impl Inode {
    /// Sets the group of this inode (the one checked, whatever the name holds by now).
    pub fn chgrp(&self, gid: u32) -> io::Result<()> {
        fchownat(&self.fd, "", None, Some(Gid::from_raw(gid)), AtFlags::AT_EMPTY_PATH).map_err(io::Error::from)
    }
}

fn kind_name(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFIFO => "a FIFO",
        _ => "a device",
    }
}

/// Opens `path` for appending (creating it), refusing a symlink at the final component, anything
/// but a regular file, and a file owned by another uid. The errors say which, for the caller to
/// put behind the flag's name.
pub fn open_append_own(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        // O_NONBLOCK: a FIFO planted there fails (ENXIO) instead of blocking start-up; it means
        // nothing to a regular file.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(e.kind(), "it is a symbolic link; refusing to write through it"),
            _ => e,
        })?;
    let m = file.metadata()?;
    if !m.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "it is not a regular file"));
    }
    let own = Uid::effective().as_raw();
    if m.uid() != own {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("it is owned by uid {}, not by this relay's uid {own}; refusing to write into it", m.uid()),
        ));
    }
    if m.nlink() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("it has {} hard links, so it may be another file too; refusing to write into it", m.nlink()),
        ));
    }
    Ok(file)
}

/// The directories on the way to `file` (its parent first) in which someone other than root and
/// this process's uid can rename or replace entries, each with why.
pub fn dirs_others_can_write(file: &Path) -> Vec<(PathBuf, String)> {
    let own = Uid::effective().as_raw();
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut found = Vec::new();
    for dir in abs.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(dir) else { continue };
        let sticky = m.mode() & 0o1000 != 0;
        let why = if m.uid() != 0 && m.uid() != own {
            Some(format!("owned by uid {}", m.uid()))
        } else if m.mode() & 0o002 != 0 && !sticky {
            Some("world-writable without the sticky bit".to_string())
        } else if m.mode() & 0o020 != 0 && !sticky && m.gid() != 0 {
            Some(format!("writable by group {} without the sticky bit", m.gid()))
        } else {
            None
        };
        if let Some(why) = why {
            found.push((dir.to_path_buf(), why));
        }
    }
    found
}

/// Logs one warning per directory `dirs_others_can_write` finds on the way to `file`, which
/// `flag` names.
pub fn warn_if_others_can_write(flag: &str, file: &Path) {
    for (dir, why) in dirs_others_can_write(file) {
        tracing::warn!(
            flag,
            dir = %dir.display(),
            why = %why,
            "directory writable by others: they can swap the file the relay creates there; \
             use a directory only root and the relay's user can write"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(mode: u32) -> tempfile::TempDir {
        let d = tempfile::Builder::new().prefix("kvmi-relay-files-").tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    #[test]
    fn a_world_writable_directory_is_found_a_sticky_or_private_one_is_not() {
        let open = dir(0o777);
        let found = dirs_others_can_write(&open.path().join("f"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, open.path());
        for mode in [0o1777, 0o755, 0o700] {
            let d = dir(mode);
            assert!(dirs_others_can_write(&d.path().join("f")).is_empty(), "{mode:o}");
        }
    }

    #[test]
    fn a_symlink_a_hard_link_a_fifo_and_a_directory_are_refused_for_appending() {
        let d = dir(0o700);
        let target = d.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, d.path().join("link")).unwrap();
        let e = open_append_own(&d.path().join("link")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        nix::unistd::mkfifo(&d.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        assert!(open_append_own(&d.path().join("fifo")).is_err());
        assert!(open_append_own(d.path()).is_err());
        std::fs::hard_link(&target, d.path().join("hard")).unwrap();
        let e = open_append_own(&d.path().join("hard")).unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
        assert!(open_append_own(&d.path().join("new")).is_ok());
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
    }
}
