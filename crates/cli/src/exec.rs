//! `upstream exec`: one command in a fresh sandbox.

pub mod network;

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncReadExt;
use upstream_protocol::ExecRequest;
use upstream_vmm::{DataDir, ExecEvent, Limits, Runtime, Sandbox, SandboxSpec};

use crate::exit::{Exit, Failure};
use crate::{images, terminal, vm_failure, VmOptions};

#[derive(Args)]
pub struct ExecArgs {
    /// Image to run in (default: the base image built by `upstream setup`).
    #[arg(long, value_name = "IMAGE", default_value = images::DEFAULT_IMAGE)]
    image: String,
    /// Virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = Limits::default().vcpus)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = Limits::default().memory_mib)]
    memory: u32,
    /// Size of the sandbox's writable disk in MiB.
    #[arg(long, value_name = "MiB", default_value_t = Limits::default().disk_mib)]
    disk: u32,
    /// Kill the command after this long, such as 30s or 5m (default: none).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Set an environment variable for the command; repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command (default: the image's).
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    #[command(flatten)]
    network: network::NetworkArgs,
    #[command(flatten)]
    vm: VmOptions,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Parses a duration flag the way turn documents write durations (`500ms`, `90s`,
/// `1h30m`), so a value means the same on the command line and in front matter. Zero is
/// rejected: every duration flag is a limit or a wait.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = upstream_runbook::parse_duration(text).map_err(|err| err.to_string())?;
    if duration.is_zero() {
        return Err(format!(
            "duration `{text}` is zero; give a positive value such as 500ms or 30s"
        ));
    }
    Ok(duration)
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!(
            "invalid environment variable '{text}'; use KEY=VALUE"
        )),
    }
}

/// Converts an image's `KEY=VALUE` list into pairs.
pub fn env_pairs(env: &[String]) -> Vec<(String, String)> {
    env.iter()
        .filter_map(|entry| entry.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

pub async fn run(data: &DataDir, args: ExecArgs) -> anyhow::Result<u8> {
    // The same rule as `workdir` in front matter; the guest creates a missing folder.
    if let Some(dir) = args.workdir.as_deref().filter(|dir| !dir.starts_with('/')) {
        return Err(Failure::new(
            Exit::Usage,
            format!("--workdir {dir} is not an absolute path; give one that starts with /"),
        )
        .into());
    }
    let limits = Limits {
        vcpus: args.vcpus,
        memory_mib: args.memory,
        disk_mib: args.disk,
    };
    limits.validate().map_err(vm_failure)?;
    let network_policy = args
        .network
        .policy()
        .map_err(|err| Failure::new(Exit::Usage, err.to_string()))?;
    let runtime = Runtime::open(data.clone(), args.vm.runtime_options()).map_err(vm_failure)?;
    let image = images::resolve(data, &args.image).await?;
    let spec = SandboxSpec {
        root_disk: image.rootfs.clone(),
        env: env_pairs(&image.config.env),
        workdir: image
            .config
            .working_dir
            .clone()
            .filter(|dir| !dir.is_empty()),
        user: image.config.user.clone().filter(|user| !user.is_empty()),
        limits,
        boot_timeout: None,
        network: network_policy,
        publish: args.network.publish(),
        background: false,
    };

    // Ctrl-C or SIGTERM while booting or running: the sandbox is dropped on
    // the way out, which kills its VM and removes its files.
    let mut signals = Signals::new()?;
    let sandbox = tokio::select! {
        sandbox = Sandbox::create(&runtime, spec) => sandbox.map_err(vm_failure)?,
        exit = signals.recv() => return Err(Failure::new(exit, "interrupted while booting").into()),
    };
    network::print_published(&sandbox);

    let stdin_piped = !terminal::is_terminal(0);
    let request = ExecRequest {
        argv: args.command.clone(),
        env: args.env,
        cwd: args.workdir,
        user: None,
        timeout_ms: args.timeout.map(|t| t.as_millis() as u64),
        stdin: stdin_piped,
    };
    let result = stream_command(&sandbox, request, stdin_piped, &mut signals).await;
    sandbox.destroy().await;
    let status = result?;
    if status.timed_out {
        let timeout = args.timeout.unwrap_or_default();
        note!(
            "upstream: command timed out after {}",
            humantime::format_duration(timeout)
        );
        return Ok(Exit::Timeout.code());
    }
    Ok(status.shell_code().clamp(0, 255) as u8)
}

async fn stream_command(
    sandbox: &Sandbox,
    request: ExecRequest,
    stdin_piped: bool,
    signals: &mut Signals,
) -> anyhow::Result<upstream_protocol::ExitStatus> {
    let program = request.argv[0].clone();
    let mut handle = sandbox.exec(request).await.map_err(vm_failure)?;
    let stdin_writer = handle.stdin_writer();
    let stdin_task = stdin_piped.then(|| {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 || stdin_writer.write(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = stdin_writer.close().await;
        })
    });

    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let mut stdout_open = true;
    let outcome = loop {
        let event = tokio::select! {
            event = handle.next_event() => event,
            exit = signals.recv() => break Err(Failure::new(exit, "interrupted").into()),
        };
        match event {
            Ok(ExecEvent::Stdout(data)) => {
                // A closed stdout (as in `| head`) is not an error: the
                // rest of the output is discarded.
                if stdout_open && (stdout.write_all(&data).is_err() || stdout.flush().is_err()) {
                    stdout_open = false;
                }
            }
            Ok(ExecEvent::Stderr(data)) => {
                let _ = stderr.write_all(&data);
            }
            Ok(ExecEvent::Exit(status)) => break Ok(status),
            Err(err @ upstream_vmm::Error::Guest { .. }) => {
                break Err(vm_failure(err)).with_context(|| format!("running '{program}'"))
            }
            Err(err) => break Err(vm_failure(err)),
        }
    };
    if let Some(task) = stdin_task {
        task.abort();
    }
    outcome
}

/// SIGINT and SIGTERM as exit codes.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) -> Exit {
        tokio::select! {
            _ = self.interrupt.recv() => Exit::Interrupted,
            _ = self.terminate.recv() => Exit::Terminated,
        }
    }
}
