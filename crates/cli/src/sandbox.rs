//! `upstream sandbox`: sandboxes of a running `upstream serve`, through its HTTP API.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use upstream_client::{api, Client, ClientError, StreamEvent};

use crate::exec::parse_duration;
use crate::exit::{Exit, Failure};

/// Address and credentials of the server.
#[derive(Args)]
pub struct Connection {
    /// Base URL of the server.
    #[arg(
        long,
        global = true,
        env = "UPSTREAM_URL",
        default_value = "http://127.0.0.1:7878"
    )]
    url: String,
    /// Unix socket of the server; takes precedence over --url.
    #[arg(long, global = true, env = "UPSTREAM_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, global = true, env = "UPSTREAM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Create a sandbox and print its id on stdout.
    Create {
        /// Image reference (default: the server's, `base`).
        #[arg(long)]
        image: Option<String>,
        /// Virtual CPUs.
        #[arg(long, value_name = "N")]
        vcpus: Option<u32>,
        /// Guest memory in MiB.
        #[arg(long, value_name = "MiB")]
        memory: Option<u32>,
        /// Size of the writable disk in MiB.
        #[arg(long, value_name = "MiB")]
        disk: Option<u32>,
        /// Destroy the sandbox after this long, such as 30m (default: never).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Set an environment variable for every command; repeatable.
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_pair)]
        env: Vec<(String, String)>,
        /// Attach a metadata label; repeatable.
        #[arg(long = "metadata", short = 'm', value_name = "KEY=VALUE", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
    },
    /// Run a command in a sandbox, streaming its output; exits with the command's code.
    Exec {
        /// Sandbox id.
        id: String,
        /// Set an environment variable for the command; repeatable.
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_pair)]
        env: Vec<(String, String)>,
        /// Working directory of the command (default: the image's).
        #[arg(long, short = 'w', value_name = "DIR")]
        workdir: Option<String>,
        /// Kill the command after this long, such as 30s (default: none).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List sandboxes.
    Ls {
        /// Only sandboxes with this metadata label; repeatable.
        #[arg(long = "metadata", short = 'm', value_name = "KEY=VALUE", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        /// Print the list as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Destroy sandboxes.
    Rm {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("invalid value '{text}'; use KEY=VALUE")),
    }
}

pub async fn run(args: SandboxArgs) -> anyhow::Result<u8> {
    let client = connect(&args.connection)?;
    match args.command {
        SandboxCommand::Create {
            image,
            vcpus,
            memory,
            disk,
            timeout,
            env,
            metadata,
        } => {
            let request = api::CreateSandbox {
                image,
                vcpus,
                memory_mib: memory,
                disk_mib: disk,
                env: env.into_iter().collect(),
                timeout_secs: timeout.map(|timeout| timeout.as_secs().max(1)),
                metadata: metadata.into_iter().collect(),
            };
            let sandbox = client.create_sandbox(&request).await.map_err(failure)?;
            println!("{}", sandbox.id);
            Ok(0)
        }
        SandboxCommand::Exec {
            id,
            env,
            workdir,
            timeout,
            command,
        } => {
            let request = api::Exec {
                command,
                env: env.into_iter().collect(),
                cwd: workdir,
                timeout_ms: timeout.map(|timeout| timeout.as_millis() as u64),
                ..api::Exec::default()
            };
            exec(&client, &id, &request).await
        }
        SandboxCommand::Ls { metadata, json } => {
            let filter: BTreeMap<String, String> = metadata.into_iter().collect();
            let sandboxes = client.list_sandboxes(&filter).await.map_err(failure)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sandboxes)?);
                return Ok(0);
            }
            println!(
                "{:<16} {:<20} {:<10} {:>5} {:>7}  {:<25} METADATA",
                "ID", "IMAGE", "STATE", "VCPUS", "MEM_MIB", "EXPIRES"
            );
            for sandbox in sandboxes {
                let labels: Vec<String> = sandbox
                    .metadata
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                println!(
                    "{:<16} {:<20} {:<10} {:>5} {:>7}  {:<25} {}",
                    sandbox.id,
                    sandbox.image,
                    format!("{:?}", sandbox.state).to_lowercase(),
                    sandbox.vcpus,
                    sandbox.memory_mib,
                    sandbox.expires_at.as_deref().unwrap_or("-"),
                    labels.join(",")
                );
            }
            Ok(0)
        }
        SandboxCommand::Rm { ids } => {
            for id in ids {
                client.destroy_sandbox(&id).await.map_err(failure)?;
                note!("Destroyed {id}");
            }
            Ok(0)
        }
    }
}

fn connect(connection: &Connection) -> anyhow::Result<Client> {
    let client = match &connection.socket {
        Some(path) => Client::unix(path)?,
        None => Client::new(&connection.url)?,
    };
    Ok(match &connection.api_key {
        Some(key) => client.with_api_key(key.clone()),
        None => client,
    })
}

async fn exec(client: &Client, id: &str, request: &api::Exec) -> anyhow::Result<u8> {
    let mut stream = client.exec_stream(id, request).await.map_err(failure)?;
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    loop {
        let Some(event) = stream.next_event().await.map_err(failure)? else {
            return Err(
                Failure::new(Exit::SandboxFailed, "the stream ended without an exit").into(),
            );
        };
        match event {
            StreamEvent::Started { .. } => {}
            // A closed stdout (as in `| head`) is not an error; the rest is discarded.
            StreamEvent::Stdout { data, .. } => {
                let _ = stdout.write_all(&data).and_then(|()| stdout.flush());
            }
            StreamEvent::Stderr { data, .. } => {
                let _ = stderr.write_all(&data);
            }
            StreamEvent::Exit(exit) => {
                if exit.timed_out {
                    note!("upstream: command timed out");
                    return Ok(Exit::Timeout.code());
                }
                let code = match (exit.exit_code, exit.signal) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => 255,
                };
                return Ok(code.clamp(0, 255) as u8);
            }
            StreamEvent::Error(error) => {
                let exit = match error.code.as_str() {
                    "command_not_found" => Exit::CommandNotFound,
                    "command_not_executable" => Exit::CannotExecute,
                    _ => Exit::SandboxFailed,
                };
                return Err(Failure::new(exit, error.message).into());
            }
        }
    }
}

/// Maps a client error to a failure with a fitting exit code and a hint.
fn failure(err: ClientError) -> anyhow::Error {
    let exit = match err.status() {
        Some(400 | 404 | 409 | 413 | 422 | 429) => Exit::Usage,
        _ => Exit::SandboxFailed,
    };
    let message = match &err {
        ClientError::Http(_) => {
            format!("{err}; is `upstream serve` running? Set --url, --socket or UPSTREAM_URL")
        }
        _ => err.to_string(),
    };
    Failure::new(exit, message).into()
}
