//! Paths and helper scripts inside the sandbox.
//!
//! Everything the executor keeps in the guest lives under `/run/upstream`; the shell state
//! that one step leaves for the next is in `/run/upstream/state`. The scripts below are
//! fixed strings: document text, patterns and paths reach them only as arguments or as
//! uploaded files, never spliced into a command line.

use upstream_protocol::{ErrorKind, ExecRequest};
use upstream_vmm::{ExecEvent, Sandbox};

use crate::error::TurnError;

/// Folder whose files become artifacts of the turn; `$UPSTREAM_ARTIFACTS` in every step.
pub const ARTIFACTS_DIR: &str = "/run/upstream/artifacts";

/// Read-only folder with `turns.json` and the earlier turns' artifacts under `artifacts/`;
/// `$UPSTREAM_CONTEXT` in every step.
pub const CONTEXT_DIR: &str = "/run/upstream/context";

/// Folder of the uploaded step scripts.
pub const STEPS_DIR: &str = "/run/upstream/steps";

/// Archive of the working directory, on its way in or out.
pub const WORKSPACE_ARCHIVE: &str = "/run/upstream/workspace.tar";

/// Environment variable names that start with this are set by upstream.
pub const RESERVED_ENV_PREFIX: &str = "UPSTREAM_";

/// Shell of the executor's own helper commands, which run as root.
const HELPER_SHELL: &str = "/bin/sh";

/// Bytes of a helper command's output kept for an error message or a listing.
const HELPER_OUTPUT_LIMIT: usize = 16 << 20;

/// Runs one step like one command of a long shell session.
///
/// Called as `SHELL -c STEP_WRAPPER upstream-step SCRIPT`. It restores the exported
/// variables and the working directory that the previous step saved, runs the step's
/// script in the same shell with `.`, and saves both again when the shell exits, whether
/// the script ended, failed or called `exit`. A step killed at its time limit saves
/// nothing, so the next step starts from the state before it.
pub const STEP_WRAPPER: &str = r#"__upstream_state=/run/upstream/state
if [ -r "$__upstream_state/env" ]; then . "$__upstream_state/env"; fi
if [ -r "$__upstream_state/cwd" ]; then
  IFS= read -r __upstream_cwd < "$__upstream_state/cwd"
  cd -- "$__upstream_cwd" 2>/dev/null ||
    printf 'upstream: %s no longer exists; starting in %s\n' "$__upstream_cwd" "$PWD" >&2
fi
__upstream_save() {
  export -p > "$__upstream_state/env" 2>/dev/null
  pwd > "$__upstream_state/cwd" 2>/dev/null
}
trap '__upstream_status=$?; __upstream_save; exit "$__upstream_status"' EXIT
__upstream_script=$1
shift
. "$__upstream_script"
"#;

/// Creates the executor's folders. Arguments: the working directory, then the user that
/// runs the steps (empty for root), who gets to write the state, artifacts and working
/// directory.
const SETUP_SCRIPT: &str = r#"set -e
mkdir -p /run/upstream/state /run/upstream/steps /run/upstream/artifacts \
  /run/upstream/context/artifacts "$1"
if [ -n "$2" ]; then
  chown "$2" /run/upstream/state /run/upstream/steps /run/upstream/artifacts "$1"
fi
"#;

/// Makes the context folder read-only: no write permission for anyone, and, where `mount`
/// works, a read-only bind mount, which also holds for root.
const SEAL_CONTEXT_SCRIPT: &str = r#"chmod -R a-w /run/upstream/context
if mount --bind /run/upstream/context /run/upstream/context 2>/dev/null; then
  mount -o remount,bind,ro /run/upstream/context
fi
exit 0
"#;

/// Lists regular files matching glob patterns, relative to the working directory, as
/// NUL-terminated paths. Arguments: the working directory, then the patterns. Under bash
/// `**` matches across folders; other shells match it like `*`. It runs under bash where
/// the image has it (see [`list_artifacts`]).
const GLOB_SCRIPT: &str = r#"cd -- "$1" || exit 0
shift
if [ -n "$BASH_VERSION" ]; then shopt -s globstar nullglob dotglob; fi
IFS=
for __pattern in "$@"; do
  for __path in $__pattern; do
    if [ -f "$__path" ] && [ ! -L "$__path" ]; then printf '%s\0' "$__path"; fi
  done
done
"#;

/// Archives the working directory (first argument) into [`WORKSPACE_ARCHIVE`].
const PACK_WORKSPACE_SCRIPT: &str = r#"tar -cf /run/upstream/workspace.tar -C "$1" ."#;

/// Unpacks [`WORKSPACE_ARCHIVE`] into the working directory (first argument) and removes
/// the archive.
const UNPACK_WORKSPACE_SCRIPT: &str = r#"set -e
tar -xpf /run/upstream/workspace.tar -C "$1"
rm -f /run/upstream/workspace.tar
"#;

/// Stops every process in the guest except the agent and this script, so that background
/// processes that steps left running cannot change files while they are collected.
/// `kill -1` skips PID 1 (the agent) and the caller.
const STOP_PROCESSES_SCRIPT: &str = "kill -KILL -1 2>/dev/null; exit 0";

/// Path of step `index`'s script in the guest.
pub fn step_script_path(index: usize) -> String {
    format!("{STEPS_DIR}/step-{}.sh", index + 1)
}

/// Builds the request that runs one step's uploaded script under `shell`.
pub fn step_request(
    shell: &str,
    script_path: &str,
    env: Vec<(String, String)>,
    workdir: &str,
    timeout_ms: u64,
) -> ExecRequest {
    ExecRequest {
        argv: vec![
            shell.to_owned(),
            "-c".to_owned(),
            STEP_WRAPPER.to_owned(),
            "upstream-step".to_owned(),
            script_path.to_owned(),
        ],
        env,
        cwd: Some(workdir.to_owned()),
        user: None,
        timeout_ms: Some(timeout_ms),
        // Without stdin frames the agent gives the step /dev/null: a read ends at once.
        stdin: false,
    }
}

/// Output and exit code of a helper command.
pub struct HelperOutput {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs a helper script as root (or as the image's user with `as_image_user`), keeping at
/// most [`HELPER_OUTPUT_LIMIT`] bytes of each stream.
async fn run_helper(
    sandbox: &Sandbox,
    script: &str,
    args: &[&str],
    as_image_user: bool,
) -> Result<HelperOutput, TurnError> {
    run_helper_in(HELPER_SHELL, sandbox, script, args, as_image_user).await
}

/// Runs `script` under `shell`, as [`run_helper`] does under `/bin/sh`.
async fn run_helper_in(
    shell: &str,
    sandbox: &Sandbox,
    script: &str,
    args: &[&str],
    as_image_user: bool,
) -> Result<HelperOutput, TurnError> {
    let mut argv = vec![
        shell.to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "upstream-helper".to_owned(),
    ];
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    let request = ExecRequest {
        argv,
        user: (!as_image_user).then(|| "0".to_owned()),
        ..ExecRequest::default()
    };
    let mut handle = sandbox.exec(request).await?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        match handle.next_event().await? {
            ExecEvent::Stdout(data) => push_bounded(&mut stdout, &data),
            ExecEvent::Stderr(data) => push_bounded(&mut stderr, &data),
            ExecEvent::Exit(status) => {
                return Ok(HelperOutput {
                    code: status.shell_code(),
                    stdout,
                    stderr,
                })
            }
        }
    }
}

fn push_bounded(buffer: &mut Vec<u8>, data: &[u8]) {
    let room = HELPER_OUTPUT_LIMIT.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

/// Runs a helper script and fails with its standard error when it exits non-zero.
async fn run_checked(
    sandbox: &Sandbox,
    action: &'static str,
    script: &str,
    args: &[&str],
) -> Result<HelperOutput, TurnError> {
    let output = run_helper(sandbox, script, args, false).await?;
    if output.code != 0 {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(TurnError::GuestSetup {
            action,
            detail: format!("exit {}: {}", output.code, stderr.trim()),
        });
    }
    Ok(output)
}

/// Creates the executor's folders and the working directory, owned by `user` if set.
pub async fn prepare(sandbox: &Sandbox, workdir: &str, user: &str) -> Result<(), TurnError> {
    run_checked(
        sandbox,
        "creating its folders",
        SETUP_SCRIPT,
        &[workdir, user],
    )
    .await
    .map(drop)
}

/// Makes [`CONTEXT_DIR`] read-only.
pub async fn seal_context(sandbox: &Sandbox) -> Result<(), TurnError> {
    run_checked(
        sandbox,
        "making the context read-only",
        SEAL_CONTEXT_SCRIPT,
        &[],
    )
    .await
    .map(drop)
}

/// Returns the regular files under `workdir` that match `patterns`, as the guest's shell
/// expands them. The paths come from the guest and are not checked here.
pub async fn expand_globs(
    sandbox: &Sandbox,
    workdir: &str,
    patterns: &[String],
) -> Result<Vec<String>, TurnError> {
    let mut args = vec![workdir];
    args.extend(patterns.iter().map(String::as_str));
    // Globs run as the steps' user, so they see what the steps could see, and under
    // bash where the image has it, because /bin/sh is often dash, where `**` is `*`.
    let output = match run_helper_in("bash", sandbox, GLOB_SCRIPT, &args, true).await {
        Err(TurnError::Sandbox(upstream_vmm::Error::Guest {
            kind: ErrorKind::NotFound,
            ..
        })) => run_helper(sandbox, GLOB_SCRIPT, &args, true).await?,
        other => other?,
    };
    Ok(output
        .stdout
        .split(|&byte| byte == 0)
        .filter(|path| !path.is_empty())
        .map(|path| String::from_utf8_lossy(path).into_owned())
        .collect())
}

/// Archives the working directory into [`WORKSPACE_ARCHIVE`].
pub async fn pack_workspace(sandbox: &Sandbox, workdir: &str) -> Result<(), TurnError> {
    run_checked(
        sandbox,
        "archiving the working directory",
        PACK_WORKSPACE_SCRIPT,
        &[workdir],
    )
    .await
    .map(drop)
}

/// Unpacks an uploaded [`WORKSPACE_ARCHIVE`] into the working directory.
pub async fn unpack_workspace(sandbox: &Sandbox, workdir: &str) -> Result<(), TurnError> {
    run_checked(
        sandbox,
        "restoring the working directory",
        UNPACK_WORKSPACE_SCRIPT,
        &[workdir],
    )
    .await
    .map(drop)
}

/// Stops the processes that steps left running in the background.
pub async fn stop_background_processes(sandbox: &Sandbox) -> Result<(), TurnError> {
    run_checked(
        sandbox,
        "stopping background processes",
        STOP_PROCESSES_SCRIPT,
        &[],
    )
    .await
    .map(drop)
}
