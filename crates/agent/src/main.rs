//! The guest agent: PID 1 inside every upstream sandbox.
//!
//! The host boots the guest kernel with this binary as the only file of an
//! initramfs. As PID 1 it mounts the image's read-only root with the
//! sandbox's writable layer on top, moves into it, opens the channel to the
//! host and serves requests until the VM is destroyed. It is linked
//! statically so it runs whatever C library the image has, or none.

mod channel;
mod exec;
mod files;
mod init;
mod net;
mod reaper;
mod server;
mod users;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("net-relay") {
        return ExitCode::from(net::relay_main(&args[2..]) as u8);
    }
    let boot = if std::process::id() == 1 {
        match init::boot() {
            Ok(boot) => boot,
            Err(err) => fail(&format!("boot failed: {err}")),
        }
    } else {
        // Run as an ordinary process (development and tests): serve on a
        // channel given by path, in the current root.
        init::BootConfig::from_args()
    };

    let channel = match channel::open(&boot) {
        Ok(channel) => channel,
        Err(err) => fail(&format!("opening the host channel failed: {err}")),
    };
    reaper::start();
    let reopen = || channel::open(&boot);
    let redial: Option<&dyn Fn() -> std::io::Result<channel::Channel>> =
        boot.channel.dials().then_some(&reopen);
    match server::serve(channel, redial) {
        Ok(()) => {}
        Err(err) => eprintln!("upstream-agent: channel closed: {err}"),
    }
    if std::process::id() == 1 {
        init::power_off();
    }
    ExitCode::SUCCESS
}

/// Reports a fatal error on the console and ends the VM: as PID 1, exiting
/// panics the kernel, which `panic=-1 reboot=t` turns into a VMM exit.
fn fail(message: &str) -> ! {
    eprintln!("upstream-agent: {message}");
    if std::process::id() == 1 {
        init::power_off();
    }
    std::process::exit(1);
}
