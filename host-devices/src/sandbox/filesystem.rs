//! Landlock: after this, the backend may open only the files it was given (an image, a port's
//! file) and remove sockets only in their own directories. Descriptors opened before keep the
//! access they were opened with, so sockets, the tap, ptys and io_uring rings go on working.
//! Network access is not restricted here (the relay's abstract sockets and the console's TCP
//! ports need none of Landlock's file rights).

use super::SandboxError;
use landlock::{ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus};
use std::fmt;
use std::path::PathBuf;

/// The Landlock ABI whose file-system rights are asked for (Linux 6.2): newer kernels enforce
/// all of them, older ones what they know (best effort).
const LANDLOCK_ABI: ABI = ABI::V3;

/// How far the kernel enforced the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Every right asked for is enforced.
    Full,
    /// The kernel knows an older ABI: some rights are enforced.
    Partial,
    /// The kernel has no Landlock (not built in, or not enabled at boot).
    Unsupported,
    /// Not asked for (`--sandbox log`).
    Skipped,
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Enforcement::Full => "enforced",
            Enforcement::Partial => "partly enforced (older kernel ABI)",
            Enforcement::Unsupported => "not available on this kernel",
            Enforcement::Skipped => "not applied",
        })
    }
}

/// Restricts this thread (and every thread it starts afterwards) to reading and, unless
/// marked read-only, writing `files`, and removing files in `removable_in`.
pub fn restrict(files: &[(PathBuf, bool)], removable_in: &[PathBuf]) -> Result<Enforcement, SandboxError> {
    let path_fd =
        |path: &PathBuf| PathFd::new(path).map_err(|source| SandboxError::Path { path: path.clone(), source });
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(LANDLOCK_ABI))?.create()?;
    for (path, read_only) in files {
        let rights = if *read_only {
            AccessFs::ReadFile.into()
        } else {
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate
        };
        ruleset = ruleset.add_rule(PathBeneath::new(path_fd(path)?, rights & AccessFs::from_file(LANDLOCK_ABI)))?;
    }
    for dir in removable_in {
        ruleset = ruleset.add_rule(PathBeneath::new(path_fd(dir)?, AccessFs::RemoveFile))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::Unsupported,
    })
}
