//! The mounted spool (`skyspool serve --mount DIR`): a FUSE view of the spool where
//! status, queue and nodes are generated from the daemon's state on read, logs stream, and
//! submissions are validated when the writer closes the file.
//! (PLACEHOLDER: being written.)

use crate::spool::Spool;
use crate::view::{Submitter, View};
use std::path::Path;
use std::sync::Arc;

/// A live mount; unmounted by [`FuseMount::unmount`] (or when dropped).
pub struct FuseMount {}

/// Mounts the view at `mountpoint` (which must exist), serving on background threads.
pub fn mount(
    _mountpoint: &Path,
    _spool: Spool,
    _view: Arc<View>,
    _submitter: Submitter,
) -> anyhow::Result<FuseMount> {
    anyhow::bail!("the FUSE view is not built yet")
}

impl FuseMount {
    /// Unmounts (lazily if something still holds it open) and stops the threads.
    pub fn unmount(self) {}
}

/// Clears a dead mount left by a daemon that was killed (ENOTCONN on access).
pub fn clean_stale_mount(_mountpoint: &Path) {}
