//! `upstream`: run commands and Markdown turns in hardware-isolated
//! microVMs.

/// Writes a line to stderr like `eprintln!`, but ignores a closed stderr, as in
/// `upstream ... 2>&1 | head -1`, where `eprintln!` would panic.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Writes to stderr without a newline, ignoring a closed stderr; see `note!`.
macro_rules! note_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

mod context;
mod doctor;
mod exec;
mod exit;
mod images;
mod keys;
mod run;
mod sandbox;
mod serve;
mod setup;
mod terminal;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use upstream_vmm::{DataDir, RuntimeOptions};

use crate::exit::Failure;

/// Run commands and Markdown turns in hardware-isolated microVMs.
#[derive(Parser)]
#[command(name = "upstream", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare the guest kernel, the guest agent and the default base image.
    Setup(setup::SetupArgs),
    /// Run one command in a new sandbox and destroy it afterwards.
    Exec(exec::ExecArgs),
    /// Report what this host offers and what is missing.
    Doctor,
    /// Manage images: pull, import, list, remove, prune.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Run Markdown turn documents and write each step's result under it.
    Run(run::RunArgs),
    /// Inspect and manage contexts: the recorded turns and artifacts.
    #[command(subcommand)]
    Context(context::ContextCommand),
    /// Serve the HTTP API for sandboxes, runs and contexts (default 127.0.0.1:7878).
    Serve(serve::ServeArgs),
    /// Manage the API keys of `upstream serve`: create, list, revoke.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Create, use, list and destroy sandboxes of a running `upstream serve`.
    Sandbox(sandbox::SandboxArgs),
    /// Report the vCPU-seconds, GiB-seconds and wall time of the server's sandboxes.
    Usage(usage::UsageArgs),
}

/// Options shared by every command that starts sandboxes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct VmOptions {
    /// VMM to use: qemu or firecracker (default: firecracker where its
    /// binary and hardware KVM are present, else qemu).
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Guest kernel (uncompressed vmlinux) instead of the one from setup.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Boot every sandbox instead of restoring it from a snapshot of its
    /// image (also set by UPSTREAM_SNAPSHOTS=off).
    #[arg(long)]
    pub no_snapshots: bool,
}

impl VmOptions {
    pub fn runtime_options(&self) -> RuntimeOptions {
        RuntimeOptions {
            backend: self.backend.clone(),
            kernel: self.kernel.clone(),
            agent: None,
            snapshots: self.no_snapshots.then_some(false),
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let data = DataDir::from_env();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the async runtime failed");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Setup(args) => setup::run(&data, args).await,
            Command::Exec(args) => exec::run(&data, args).await,
            Command::Doctor => doctor::run(&data).await,
            Command::Image(command) => images::run(&data, command).await,
            Command::Run(args) => run::run(&data, args).await,
            Command::Context(command) => context::run(&data, command).await,
            Command::Serve(args) => serve::run(&data, args).await,
            Command::Key(command) => keys::run(&data, command),
            Command::Sandbox(args) => sandbox::run(args).await,
            Command::Usage(args) => usage::run(&data, args),
        }
    });
    // Tasks still holding a sandbox are dropped here, which kills its VM. A
    // blocking read of our stdin may never end, so do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let exit = exit::of(&err);
            note!("upstream: {}", format_chain(&err));
            ExitCode::from(exit.code())
        }
    }
}

/// The error and its causes on one line each, the causes indented.
fn format_chain(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(&format!("\n  caused by: {cause}"));
        }
    }
    text
}

/// Logs go to stderr, filtered by `UPSTREAM_LOG` (default: warnings).
/// Colours only on a terminal, so a log redirected to a file stays plain text.
fn init_logging() {
    use std::io::IsTerminal;
    let (filter, invalid) = match std::env::var("UPSTREAM_LOG") {
        Err(_) => (tracing_subscriber::EnvFilter::new("warn"), None),
        Ok(value) => match tracing_subscriber::EnvFilter::try_new(&value) {
            Ok(filter) => (filter, None),
            Err(err) => (
                tracing_subscriber::EnvFilter::new("warn"),
                Some((value, err)),
            ),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some((value, err)) = invalid {
        tracing::warn!(
            "UPSTREAM_LOG={value} is invalid ({err}); logging warnings only. Use a level \
             such as info or debug, or a filter such as upstream_vmm=debug"
        );
    }
}

/// Converts a sandbox-core error into a failure with its exit code.
pub fn vm_failure(err: upstream_vmm::Error) -> anyhow::Error {
    let exit = exit::classify(&err);
    anyhow::Error::new(Failure::new(exit, err.to_string()))
}
