//! `upstream run`: Markdown turns in sandboxes, results written back into the documents.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use upstream_runbook::results_differ_ignoring_timings;
use upstream_store::LocalStore;
use upstream_turn::{
    CancellationToken, DocumentTarget, PullState, StepOutcome, TurnError, TurnEvent, TurnOptions,
    TurnOutcomeKind, TurnRequest, TurnRunner,
};
use upstream_vmm::{DataDir, Runtime};

use crate::exec::parse_duration;
use crate::exit::{self, Exit, Failure};
use crate::terminal::{format_duration, is_terminal};
use crate::{images, vm_failure, VmOptions};

#[derive(Args)]
pub struct RunArgs {
    /// Turn documents to run, in order, as consecutive turns.
    #[arg(required = true, value_name = "DOCUMENT")]
    documents: Vec<PathBuf>,
    /// Write the document with results to PATH and leave the document untouched.
    #[arg(long, short = 'o', value_name = "PATH")]
    output: Option<PathBuf>,
    /// Run, write nothing (neither the document nor a turn in the context), and exit with
    /// code 4 if the results differ from those in the document in anything but timings.
    #[arg(long, conflicts_with = "output")]
    check: bool,
    /// Print events as JSON Lines (`{"type": ..., "data": ...}`) on stdout.
    #[arg(long)]
    json: bool,
    /// List the steps without running them.
    #[arg(long)]
    dry_run: bool,
    /// Record the turns in context NAME instead of the document's folder.
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// Start without earlier turns: when the context has turns, use the first free name
    /// NAME~2, NAME~3, ... instead.
    #[arg(long)]
    new_context: bool,
    /// Wait up to DURATION, such as 30s or 5m, while another run uses the context
    /// (default: fail at once).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    wait: Option<Duration>,
    #[command(flatten)]
    vm: VmOptions,
}

pub async fn run(data: &DataDir, args: RunArgs) -> anyhow::Result<u8> {
    if args.output.is_some() && args.documents.len() > 1 {
        return Err(Failure::new(
            Exit::Usage,
            "--output takes one document; run the documents one at a time",
        )
        .into());
    }
    if let Some(output) = &args.output {
        check_output_folder(output)?;
    }
    let requests = args
        .documents
        .iter()
        .map(|path| TurnRequest::load(path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(turn_failure)?;
    for request in &requests {
        if request.document.steps.is_empty() {
            note!(
                "upstream: {} has no steps: only ```bash, ```sh and ```shell blocks run",
                request.path.display()
            );
        }
    }
    if args.dry_run {
        return Ok(dry_run(&requests));
    }

    let runtime = Runtime::open(data.clone(), args.vm.runtime_options()).map_err(vm_failure)?;
    let store = LocalStore::open(data.root())
        .with_context(|| format!("opening the context store in {}", data.root().display()))?;
    let runner = TurnRunner::new(
        Arc::new(runtime),
        images::open_store(data)?,
        Arc::new(store),
    );
    let cancel = CancellationToken::new();
    let signal = watch_signals(cancel.clone())?;

    let mut console = Console::new(args.json);
    for (position, request) in requests.iter().enumerate() {
        let options = turn_options(&args);
        console.begin_document(request);
        let result = runner
            .run(
                request,
                &options,
                &mut |event| console.event(&event),
                &cancel,
            )
            .await
            .map_err(turn_failure)?;
        match result.outcome {
            TurnOutcomeKind::Interrupted => {
                let exit = signal.lock().unwrap().unwrap_or(Exit::Interrupted);
                note!(
                    "upstream: interrupted; {} has the results so far",
                    request.path.display()
                );
                return Ok(exit.code());
            }
            _ if args.check => {
                if results_differ_ignoring_timings(&request.source, &result.rendered) {
                    note!(
                        "{}: results differ from the document; run it without --check to \
                         update them",
                        request.path.display()
                    );
                    return Ok(Exit::CheckFailed.code());
                }
            }
            TurnOutcomeKind::Failed => {
                for skipped in &requests[position + 1..] {
                    note!("Skipped {}: an earlier turn failed", skipped.path.display());
                }
                return Ok(Exit::StepFailed.code());
            }
            TurnOutcomeKind::Succeeded => {}
        }
    }
    Ok(0)
}

/// Fails with a usage error when `--output PATH` cannot be written because its folder is
/// missing, before a sandbox boots and the turn's results have nowhere to go.
fn check_output_folder(output: &Path) -> anyhow::Result<()> {
    let folder = match output.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    if folder.is_dir() {
        return Ok(());
    }
    Err(Failure::new(
        Exit::Usage,
        format!(
            "--output {}: folder {} does not exist; create it or write to an existing folder",
            output.display(),
            folder.display()
        ),
    )
    .into())
}

fn turn_options(args: &RunArgs) -> TurnOptions {
    let target = if args.check {
        DocumentTarget::Discard
    } else if let Some(path) = &args.output {
        DocumentTarget::File(path.clone())
    } else {
        DocumentTarget::InPlace
    };
    TurnOptions {
        context: args.context.clone(),
        new_context: args.new_context,
        wait: args.wait,
        target,
        keep_turn: !args.check,
        ..TurnOptions::default()
    }
}

fn dry_run(requests: &[TurnRequest]) -> u8 {
    for request in requests {
        if requests.len() > 1 {
            println!("{}:", request.path.display());
        }
        for line in request.document.dry_run_listing() {
            println!("{line}");
        }
    }
    0
}

/// Cancels `cancel` on the first SIGINT or SIGTERM and remembers which one came.
fn watch_signals(cancel: CancellationToken) -> anyhow::Result<Arc<Mutex<Option<Exit>>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let received = Arc::new(Mutex::new(None));
    let record = Arc::clone(&received);
    tokio::spawn(async move {
        let exit = tokio::select! {
            _ = interrupt.recv() => Exit::Interrupted,
            _ = terminate.recv() => Exit::Terminated,
        };
        *record.lock().unwrap() = Some(exit);
        cancel.cancel();
    });
    Ok(received)
}

/// Converts a turn error into a failure with its exit code.
fn turn_failure(error: TurnError) -> anyhow::Error {
    let exit = match &error {
        _ if error.is_usage_error() => Exit::Usage,
        TurnError::DefaultImageMissing(_) => Exit::NotReady,
        TurnError::Sandbox(error) => exit::classify(error),
        TurnError::Store(
            upstream_store::StoreError::ContextBusy { .. }
            | upstream_store::StoreError::ContextWaitTimedOut { .. },
        ) => Exit::ContextBusy,
        _ => Exit::SandboxFailed,
    };
    let message = error.to_string();
    anyhow::Error::new(error).context(Failure::new(exit, message))
}

/// Progress on stderr, and events as JSON Lines on stdout with `--json`.
struct Console {
    json: bool,
    live: bool,
    label_width: usize,
    step_started: Option<Instant>,
    stdout_open: bool,
}

impl Console {
    fn new(json: bool) -> Console {
        Console {
            json,
            live: is_terminal(2),
            label_width: 0,
            step_started: None,
            stdout_open: true,
        }
    }

    /// Aligns the step lines of one document.
    fn begin_document(&mut self, request: &TurnRequest) {
        self.label_width = request
            .document
            .steps
            .iter()
            .map(|step| step_prefix(step.index + 1, &step.label).chars().count())
            .max()
            .unwrap_or(0);
    }

    fn event(&mut self, event: &TurnEvent) {
        if self.json {
            self.print_json(event);
        }
        match event {
            TurnEvent::ImagePull { reference, state } => match state {
                PullState::Started if self.live => note_part!("Pulling {reference} ... "),
                PullState::Started => {}
                PullState::Done => self.finish_line(&format!("Pulling {reference} ... done")),
                PullState::Failed => self.finish_line(&format!("Pulling {reference} ... failed")),
            },
            TurnEvent::ContextLoaded { artifacts, turns } => {
                let from = match turns {
                    1 => "previous turn".to_owned(),
                    turns => format!("{turns} turns"),
                };
                let noun = if *artifacts == 1 {
                    "artifact"
                } else {
                    "artifacts"
                };
                note!("Context loaded: {artifacts} {noun} from {from}");
            }
            TurnEvent::StepStarted { step, label } => {
                self.step_started = Some(Instant::now());
                if self.live {
                    note_part!("{} running", self.dotted(*step, label));
                    let _ = std::io::stderr().flush();
                }
            }
            TurnEvent::StepFinished {
                step,
                label,
                state,
                exit_code,
                duration_ms,
            } => {
                let outcome = describe(*state, *exit_code, *duration_ms);
                let line = format!("{} {outcome}", self.dotted(*step, label));
                self.finish_line(&line);
            }
            TurnEvent::Warning { message } => note!("warning: {message}"),
            _ => {}
        }
    }

    /// Prints a final line, replacing a live one on a terminal.
    fn finish_line(&self, line: &str) {
        if self.live {
            note_part!("\r\x1b[2K");
        }
        note!("{line}");
    }

    /// Returns `Step N: label ....` padded to the document's longest step line.
    fn dotted(&self, step: usize, label: &str) -> String {
        let prefix = step_prefix(step, label);
        let dots = self.label_width.saturating_sub(prefix.chars().count()) + 2;
        format!("{prefix} {}", ".".repeat(dots))
    }

    fn print_json(&mut self, event: &TurnEvent) {
        if !self.stdout_open {
            return;
        }
        let line = serde_json::to_string(event).expect("events serialise");
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (as in `| head`) is not an error: later events are dropped.
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            self.stdout_open = false;
        }
    }
}

fn step_prefix(step: usize, label: &str) -> String {
    format!("Step {step}: {label}")
}

/// Describes a step outcome for the console: `done (3.1s)`, `failed (exit 2, 0.3s)`.
fn describe(state: StepOutcome, exit_code: Option<i32>, duration: Duration) -> String {
    let elapsed = format_duration(duration);
    match state {
        StepOutcome::Succeeded => format!("done ({elapsed})"),
        StepOutcome::Failed => match exit_code {
            Some(code) => format!("failed (exit {code}, {elapsed})"),
            None => format!("failed ({elapsed})"),
        },
        StepOutcome::TimedOut => format!("timed out ({elapsed})"),
        StepOutcome::Interrupted => format!("interrupted ({elapsed})"),
        StepOutcome::Skipped => "skipped".to_owned(),
        StepOutcome::NotRun => "not run".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_documented() {
        let second = Duration::from_millis(300);
        assert_eq!(
            describe(StepOutcome::Succeeded, Some(0), second),
            "done (0.3s)"
        );
        assert_eq!(
            describe(StepOutcome::Failed, Some(2), second),
            "failed (exit 2, 0.3s)"
        );
        assert_eq!(
            describe(StepOutcome::TimedOut, Some(137), second),
            "timed out (0.3s)"
        );
        assert_eq!(
            describe(StepOutcome::Skipped, None, Duration::ZERO),
            "skipped"
        );
    }

    #[test]
    fn step_lines_align() {
        let mut console = Console::new(false);
        console.label_width = "Step 1: pip install".len();
        assert_eq!(console.dotted(1, "pip install"), "Step 1: pip install ..");
        assert_eq!(console.dotted(2, "python"), "Step 2: python .......");
    }
}
