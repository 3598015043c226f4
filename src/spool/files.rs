//! File primitives: atomic replacement (a new file renamed in, or an exchange with a
//! spare), creation that never follows a link, private directories and files, the job's log,
//! and reading a file nobody is writing.

use super::*;

/// Writes `dir/name` atomically: a temporary `.name.tmp.PID` is written (and fsynced when
/// `durable`), then renamed over the target. Readers see the old or the new content only.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], durable: bool) -> Result<()> {
    write_atomic_mode(dir, name, bytes, durable, 0o644)
}

/// [`write_atomic`] with the file's mode.
pub fn write_atomic_mode(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    durable: bool,
    mode: u32,
) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let dst = dir.join(name);
    let result = (|| -> io::Result<()> {
        // Never reuse what is at the temporary name: in a directory others can write to,
        // it could be theirs (a link, a FIFO, a file they keep open).
        remove_if_present(&tmp)?;
        let mut f = create_new_file(&tmp, mode)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, &dst)
    })();
    if let Err(e) = &result {
        let _ = fs::remove_file(&tmp);
        if is_out_of_space(e) {
            // Disk full: a new file cannot be made, but an existing one can be rewritten in
            // place without new blocks (state files are tiny). Not atomic for a reader, so
            // only the emergency path; the content's first line is the new one throughout.
            if let Ok(()) = overwrite_in_place(&dst, bytes) {
                return Ok(());
            }
        }
    }
    result.at(&dst)
}

/// Replaces `dir/name` with `bytes` by exchanging it with a spare kept in `spare_dir`
/// (as `NAME.spare`, written in place first): one `renameat2(RENAME_EXCHANGE)`, so readers
/// see the old or the new content, never a mix. Unlike [`write_atomic`] no inode is created
/// or freed once the spare exists; on a journal-less ext4 each freed inode slows every
/// creation in its block group for a minute or more, and a rename over the old file frees
/// one per rewrite. After the exchange the spare holds the previous content.
///
/// The spare is rewritten in place on the next replacement, so a reader that keeps the file
/// open across two replacements may read it half rewritten, emptied or newer (readers open
/// afresh: `cat`, [`Spool::read_status`]). `spare_dir` must be a directory nobody else can write; a spare
/// that is not a regular file of ours with one link is replaced, never written. One writer
/// at a time per file (the spare is shared): the daemon alone writes `info.json`, `queue`
/// and `nodes`, and `status` passes from the daemon to the supervisor at the hand-over and
/// back only once the supervisor is gone. Where the
/// filesystem cannot exchange (or `name` does not exist yet) the spare is renamed over
/// `name`, as [`write_atomic`] would.
pub fn write_exchanged(
    dir: &Path,
    name: &str,
    spare_dir: &Path,
    bytes: &[u8],
    durable: bool,
) -> Result<()> {
    let spare = spare_dir.join(format!("{name}.spare"));
    let dst = dir.join(name);
    // The spare's length when it is ours to rewrite: a regular file of ours, no other link.
    let reusable = |f: &File| {
        f.metadata()
            .ok()
            .filter(|m| m.is_file() && m.nlink() == 1 && m.uid() == nix::unistd::geteuid().as_raw())
    };
    let result = (|| -> io::Result<()> {
        // Opened, or made when missing, in one call (the first rewrite of each file makes
        // its spare); anything but a plain file of ours with one link is replaced.
        let (f, old_len) = match open_or_create_for_write(&spare) {
            Ok(f) => match reusable(&f) {
                Some(m) => (f, m.len()),
                None => (create_replacing(&spare)?, 0),
            },
            Err(e) if e.raw_os_error() != Some(libc::ELOOP) => return Err(e),
            // A link: a new one in its place.
            Err(_) => (create_replacing(&spare)?, 0),
        };
        // Emptying it first would free its block and allocate one again on every rewrite.
        rewrite_from_start(&f, bytes, old_len)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &spare,
            nix::fcntl::AT_FDCWD,
            &dst,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        ) {
            Ok(()) => Ok(()),
            // No file to exchange with yet, or a filesystem that cannot exchange (NFS, some
            // FUSE): the spare becomes the file.
            Err(
                nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS,
            ) => fs::rename(&spare, &dst),
            Err(e) => Err(e.into()),
        }
    })();
    match result {
        Ok(()) => Ok(()),
        // Disk full (the spare could not be made), or no place for a spare (a job directory
        // of an older spool without `.sky/`): the rename-based path, with its own emergency
        // fallback.
        Err(e) if is_out_of_space(&e) || e.kind() == io::ErrorKind::NotFound => {
            write_atomic(dir, name, bytes, durable)
        }
        Err(e) => Err(e).at(&dst),
    }
}

/// A new, empty file (mode 0644) at `path`, in place of whatever is there (a link, a FIFO,
/// a file with other links: never written through). Removes only when something is there.
pub(super) fn create_replacing(path: &Path) -> io::Result<File> {
    match create_new_file(path, 0o644) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            remove_if_present(path)?;
            create_new_file(path, 0o644)
        }
        r => r,
    }
}

/// Removes `path` if something is there (never following a link).
pub(super) fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Opens an existing file for writing without following a link, creating, truncating or
/// blocking (on a FIFO).
pub(super) fn open_existing_for_write(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// Opens `path` for writing, creating it (0644) if missing; never follows a link and never
/// blocks on a FIFO.
pub(super) fn open_or_create_for_write(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .mode(0o644)
        .open(path)
}

/// Creates a new file (failing if anything is there, never following a link).
pub(super) fn create_new_file(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode)
        .open(path)
}

/// ENOSPC or EDQUOT.
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Rewrites an existing regular file in place (no links followed, no new inode).
pub(super) fn overwrite_in_place(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let f = open_existing_for_write(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    rewrite_from_start(&f, bytes, meta.len())
}

/// Writes `bytes` over a file of `old_len` bytes from its start, then cuts what is left of
/// the old content: no block is freed and allocated again for content of the same size.
pub(super) fn rewrite_from_start(f: &File, bytes: &[u8], old_len: u64) -> io::Result<()> {
    f.write_all_at(bytes, 0)?;
    if old_len > bytes.len() as u64 {
        f.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

/// Lets `uid` (and only `uid`, besides the directory's owner) create entries such as
/// `cancel` in a job directory: a POSIX ACL `user:<uid>:rwx` plus the sticky bit, so the
/// user can add files but cannot remove or replace the daemon's (`status`, `info.json`, ...).
/// Where the filesystem has no ACLs, falls back to mode 1777 (the daemon still refuses
/// anyone else's cancel).
pub fn grant_create(dir: &Path, uid: u32) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const UNDEFINED: u32 = u32::MAX;
    let mut acl: Vec<u8> = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (USER_OBJ, 7u16, UNDEFINED),
        (USER, 7, uid),
        (GROUP_OBJ, 5, UNDEFINED),
        (MASK, 7, UNDEFINED),
        (OTHER, 5, UNDEFINED),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let cpath =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| SpoolError::Corrupt {
            path: dir.to_path_buf(),
            message: "path contains NUL".into(),
        })?;
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    // With the ACL, chmod's group bits set its mask (rwx), so user:<uid> stays rwx.
    let mode = if rc == 0 { 0o1775 } else { 0o1777 };
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).at(dir)
}

/// Writes `dir/name` in place, replacing any earlier copy: only for directories nobody
/// else can see or write (staging), where the whole directory is published by one rename
/// later, so no temporary name and rename per file are needed.
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let mut f = create_replacing(&path).at(&path)?;
    f.write_all(bytes).at(&path)
}

/// A staging directory's mode and its private `.sky/` (both 0755; either may exist
/// already): made before the owner can write in the job directory, so they can never plant
/// a link in its place.
pub fn make_private_dir(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).at(dir)?;
    let private = dir.join(".sky");
    create_dir_if_missing(&private)?;
    fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).at(&private)
}

/// Makes directory `path` unless something is there already.
pub(super) fn create_dir_if_missing(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e).at(path),
        _ => Ok(()),
    }
}

/// A job's log `name` (`log`, `log.rank<N>`) in its directory `dir`, opened for appending
/// (by the daemon for an early launch, by the supervisor otherwise), made empty if it is not
/// there; one that is there is kept as it is (a prepared one is empty; see
/// [`Spool::prepare_staging`]). No link is followed.
pub fn open_log(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(&path)
        .at(&path)
}

/// Gives the job directory `dir` a new, empty `name` (its log) in place of the file there:
/// whoever holds the old one open writes to a file no job shows.
pub fn replace_log(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    remove_if_present(&path).at(&path)?;
    open_log(dir, name).map(drop)
}

/// Opens (creating, mode 0600, never truncating or following a link) one of the daemon's
/// own files in `.skyspool/`.
pub(super) fn open_private_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .at(path)
}

pub(super) fn flock_raw(f: &File, op: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid, owned descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens `path` without following links or blocking, checks it is a regular file of at
/// most [`MAX_YAML_BYTES`], and reads it unless a writer still holds it open
/// (`F_SETLEASE` refuses a read lease then): `Ok(None)` in that case.
pub fn read_file_unless_writing(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
        .at(path);
    }
    if meta.len() > MAX_YAML_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("larger than {MAX_YAML_BYTES} bytes"),
        ))
        .at(path);
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a valid descriptor we own; F_SETLEASE takes an int argument.
    let leased = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if leased != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(None); // someone has it open for writing
        }
        // EACCES (not owner, no CAP_LEASE) or a filesystem without leases: read anyway.
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    let read = (&file).take(MAX_YAML_BYTES + 1).read_to_end(&mut bytes);
    if leased == 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
    }
    read.at(path)?;
    if bytes.len() as u64 > MAX_YAML_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("larger than {MAX_YAML_BYTES} bytes"),
        ))
        .at(path);
    }
    Ok(Some(bytes))
}
