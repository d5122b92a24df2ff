//! The benchmarks' errors: every `pvkit bench` command ends with one of these (exit status 2)
//! or with its results.

use std::path::PathBuf;

/// Why a benchmark could not run, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Options that cannot be measured (out of range, contradictory, unknown names).
    #[error("{0}")]
    Options(String),
    /// A file or directory could not be made, read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process under measurement did not start or listen.
    #[error(transparent)]
    Process(#[from] pvkit_host_devices::process::ProcessError),
    /// pvkit's host frontend failed (the console benchmark).
    #[error(transparent)]
    Frontend(#[from] pvkit_vmm_glue::host_frontend::FrontendError),
    /// The VM failed (the guest and doorbell benchmarks).
    #[error(transparent)]
    Vm(#[from] pvkit_vmm_glue::vm::VmError),
    /// The software guest failed.
    #[error(transparent)]
    SoftwareGuest(#[from] pvkit_vmm_glue::software_guest::SoftwareGuestError),
    /// libblkio failed (the block load generator).
    #[error("libblkio {what}: {message}")]
    Blkio {
        /// The call.
        what: String,
        /// libblkio's message.
        message: String,
    },
    /// Guest memory could not be written or read.
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// A file that is not a pvkit bench report.
    #[error("{} is not a pvkit bench report: {source}", path.display())]
    NotAReport {
        /// The file.
        path: PathBuf,
        /// What the JSON parser found.
        source: serde_json::Error,
    },
    /// A report could not be encoded.
    #[error("encoding the report: {0}")]
    Encode(serde_json::Error),
    /// A report of another format version.
    #[error("{} has format {found}, this pvkit reads {expected}", path.display())]
    ReportFormat {
        /// The report.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// The format this pvkit reads.
        expected: u32,
    },
    /// A plot could not be drawn.
    #[error("plotting {}: {detail}", path.display())]
    Plot {
        /// The plot's path.
        path: PathBuf,
        /// plotters' description of the failure.
        detail: String,
    },
    /// The demo's backends could not be started (the guest and doorbell benchmarks use them).
    #[error(transparent)]
    Demo(#[from] crate::demo::DemoError),
    /// A measurement went wrong: a peer or generator misbehaved, a guest reported nothing, a
    /// request failed.
    #[error("{0}")]
    Measurement(String),
}

impl BenchError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}
