//! Exit codes of the `upstream` command.
//!
//! `upstream exec` passes the command's own exit code through (0 to 255, with
//! 128 + N for a command killed by signal N), so upstream's own failures use
//! codes a command rarely returns, the way `docker run` and `timeout` do.

/// An exit code with its meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `upstream run`: a step failed.
    StepFailed,
    /// `upstream run --check`: running the document changes its results.
    CheckFailed,
    /// `upstream run`: another run holds the document's context.
    ContextBusy,
    /// Invalid usage or an invalid argument value.
    Usage,
    /// The host is not ready: no kernel, agent, backend or base image; run
    /// `upstream setup` or see `upstream doctor`.
    NotReady,
    /// The command's timeout expired and the sandbox killed it.
    Timeout,
    /// The sandbox itself failed: boot failure, VM crash, agent lost, or an
    /// internal error of upstream.
    SandboxFailed,
    /// The command exists but cannot be executed.
    CannotExecute,
    /// The command was not found in the image.
    CommandNotFound,
    /// Interrupted by Ctrl-C (SIGINT).
    Interrupted,
    /// Terminated by SIGTERM.
    Terminated,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Self::StepFailed => 1,
            Self::CheckFailed => 4,
            Self::ContextBusy => 5,
            Self::Usage => 2,
            Self::NotReady => 3,
            Self::Timeout => 124,
            Self::SandboxFailed => 125,
            Self::CannotExecute => 126,
            Self::CommandNotFound => 127,
            Self::Interrupted => 130,
            Self::Terminated => 143,
        }
    }
}

/// An error that ends the command with a specific exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
        }
    }
}

/// Maps a sandbox-core error to the exit code that describes it.
pub fn classify(err: &upstream_vmm::Error) -> Exit {
    use upstream_protocol::ErrorKind;
    use upstream_vmm::Error as E;
    match err {
        E::KernelMissing(_)
        | E::KernelInvalid(_)
        | E::AgentMissing(_)
        | E::BackendUnavailable { .. } => Exit::NotReady,
        // A VMM binary that is not there, such as a wrong UPSTREAM_QEMU.
        E::VmmSpawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Exit::NotReady
        }
        E::UnknownBackend(_) | E::OutOfRange { .. } | E::InvalidEnv { .. } => Exit::Usage,
        E::Guest {
            kind: ErrorKind::NotFound,
            ..
        } => Exit::CommandNotFound,
        E::Guest {
            kind: ErrorKind::PermissionDenied,
            ..
        } => Exit::CannotExecute,
        E::Guest {
            kind: ErrorKind::InvalidRequest,
            ..
        } => Exit::Usage,
        _ => Exit::SandboxFailed,
    }
}

/// Returns the exit code of an image error. A bad reference, archive or image is the
/// caller's value (2), and a broken Docker config is the host's set-up (3).
pub fn classify_image(err: &upstream_image::ImageError) -> Exit {
    use upstream_image::ImageError as E;
    match err {
        E::InvalidReference { .. }
        | E::NotFound { .. }
        | E::NotLocal { .. }
        | E::NoMatchingPlatform { .. }
        | E::InvalidImage { .. }
        | E::HostileLayer { .. }
        | E::UnpackLimit { .. } => Exit::Usage,
        E::DockerConfig { .. } => Exit::NotReady,
        _ => Exit::SandboxFailed,
    }
}

/// Returns the exit code of an error: the one a [`Failure`] carries, else that of the
/// first sandbox, image or server error in its chain, else 125.
pub fn of(err: &anyhow::Error) -> Exit {
    if let Some(failure) = err.downcast_ref::<Failure>() {
        return failure.exit;
    }
    for cause in err.chain() {
        if let Some(err) = cause.downcast_ref::<upstream_vmm::Error>() {
            return classify(err);
        }
        if let Some(err) = cause.downcast_ref::<upstream_image::ImageError>() {
            return classify_image(err);
        }
        if let Some(upstream_server::ServerError::NoKeys) = cause.downcast_ref() {
            return Exit::NotReady;
        }
    }
    Exit::SandboxFailed
}
