//! `upstream serve`: the HTTP API server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use upstream_server::{ManagerConfig, Server, ServerConfig, DEFAULT_LISTEN};
use upstream_vmm::DataDir;

use crate::VmOptions;

const MIB: u64 = 1 << 20;

#[derive(Args)]
pub struct ServeArgs {
    /// TCP address to listen on. The default is loopback only; an address that is not
    /// loopback requires API keys (`upstream key create`).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Also listen on a Unix socket at PATH, created with mode 0600.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Listen on the Unix socket only, with no TCP listener.
    #[arg(long, requires = "socket")]
    no_tcp: bool,
    /// Require an API key on every request, also on loopback.
    #[arg(long)]
    require_keys: bool,
    /// Maximum number of sandboxes on this server, booting ones included.
    #[arg(long, value_name = "N", default_value_t = ManagerConfig::default().max_sandboxes)]
    max_sandboxes: usize,
    /// Maximum number of sandboxes per API key, unless the key sets its own.
    #[arg(long, value_name = "N", default_value_t = ManagerConfig::default().max_sandboxes_per_key)]
    max_sandboxes_per_key: usize,
    /// Maximum size of a JSON request body, in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 16)]
    max_body: u64,
    /// Maximum size of a file upload, in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 4096)]
    max_upload: u64,
    /// Output kept per command, in MiB; older output is dropped past it.
    #[arg(long, value_name = "MiB", default_value_t = 16)]
    max_output: u64,
    /// Ready sandboxes the warm pool keeps per image and shape (0: no pool).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pool_size: usize,
    /// Empty a pool that handed out nothing for this long, such as 5m.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::exec::parse_duration)]
    pool_idle: std::time::Duration,
    #[command(flatten)]
    vm: VmOptions,
}

pub async fn run(data: &DataDir, args: ServeArgs) -> anyhow::Result<u8> {
    let config = ServerConfig {
        listen: (!args.no_tcp).then_some(args.listen),
        socket: args.socket,
        require_keys: args.require_keys,
        max_body_bytes: (args.max_body * MIB) as usize,
        max_upload_bytes: args.max_upload * MIB,
        manager: ManagerConfig {
            max_sandboxes: args.max_sandboxes,
            max_sandboxes_per_key: args.max_sandboxes_per_key,
            max_output_bytes: args.max_output * MIB,
            pool_size: args.pool_size,
            pool_idle_timeout: args.pool_idle,
            ..ManagerConfig::default()
        },
        runtime: args.vm.runtime_options(),
    };
    // The rest of the command line runs on one thread; the server gets a runtime with a
    // worker per core of its own.
    let data = data.clone();
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("upstream-serve".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("building the server's async runtime failed")
                .and_then(|runtime| runtime.block_on(serve(data, config)));
            let _ = sender.send(result);
        })
        .context("starting the server thread failed")?;
    receiver
        .await
        .context("the server thread ended without a result")??;
    Ok(0)
}

async fn serve(data: DataDir, config: ServerConfig) -> anyhow::Result<()> {
    let socket = config.socket.clone();
    let server = Server::bind(data, config).await?;
    for sandbox in server.recovered() {
        note!(
            "upstream: destroyed sandbox {} left by a server that did not shut down",
            sandbox.id
        );
    }
    let keys = if server.require_keys() {
        "API keys required"
    } else {
        "no API keys required"
    };
    if let Some(addr) = server.local_addr() {
        note!("upstream: listening on http://{addr} ({keys})");
    }
    if let Some(path) = socket {
        note!("upstream: listening on unix:{} ({keys})", path.display());
    }
    server.run(shutdown_signal()).await?;
    note!("upstream: stopped");
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("installing signal handlers failed; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    note!("upstream: shutting down: destroying every sandbox");
}
