//! Running one step in the sandbox.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use upstream_protocol::ErrorKind;
use upstream_runbook::{RenderOptions, Step, StepReport};
use upstream_store::{StepInput, StepState};
use upstream_vmm::{ExecEvent, Sandbox};

use crate::capture::Capture;
use crate::error::TurnError;
use crate::event::{OutputData, OutputStream, StepOutcome, TurnEvent};
use crate::guest;

/// Everything a step needs besides its code.
pub(crate) struct StepContext<'a> {
    pub sandbox: &'a Sandbox,
    pub shell: &'a str,
    pub workdir: &'a str,
    pub env: &'a [(String, String)],
    pub render: &'a RenderOptions,
    pub max_output_bytes: u64,
}

/// A step that ran, or was stopped while running.
pub(crate) struct StepRun {
    pub outcome: StepOutcome,
    pub report: StepReport,
    pub input: StepInput,
    pub capture: Capture,
}

/// Uploads the step's code as a script and runs it, streaming its output as events.
pub(crate) async fn run_step(
    context: &StepContext<'_>,
    step: &Step,
    timeout: Duration,
    events: &mut dyn FnMut(TurnEvent),
    cancel: &CancellationToken,
) -> Result<StepRun, TurnError> {
    let script_path = guest::step_script_path(step.index);
    context
        .sandbox
        .agent()
        .write_file(&script_path, 0o644, step.code.as_bytes())
        .await?;
    let request = guest::step_request(
        context.shell,
        &script_path,
        context.env.to_vec(),
        context.workdir,
        crate::plan::timeout_ms(timeout),
    );

    let started = Instant::now();
    let mut handle = match context.sandbox.exec(request).await {
        Ok(handle) => handle,
        // The request starts only the step shell, so a missing program is the shell.
        Err(upstream_vmm::Error::Guest {
            kind: ErrorKind::NotFound,
            message,
        }) => {
            let hint = if context.shell == "sh" {
                String::new()
            } else {
                "; images without it need `shell: sh` in the front matter".to_owned()
            };
            return Err(TurnError::Sandbox(upstream_vmm::Error::Guest {
                kind: ErrorKind::NotFound,
                message: format!("step shell: {message}{hint}"),
            }));
        }
        Err(err) => return Err(err.into()),
    };
    let mut capture = Capture::new(context.render, context.max_output_bytes)?;
    let status = loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => break None,
            event = handle.next_event() => event?,
        };
        let (stream, data) = match event {
            ExecEvent::Stdout(data) => (OutputStream::Stdout, data),
            ExecEvent::Stderr(data) => (OutputStream::Stderr, data),
            ExecEvent::Exit(status) => break Some(status),
        };
        capture.push(&data)?;
        events(TurnEvent::StepOutput {
            step: step.index + 1,
            stream,
            data: OutputData(data),
        });
    };

    let (output, truncated_bytes) = capture.bounded();
    let (outcome, report, exit_code, duration) = match status {
        None => {
            let duration = started.elapsed();
            let report = StepReport::Ran {
                exit_code: 130,
                duration,
                output,
                timed_out: false,
                interrupted: true,
                truncated_bytes,
            };
            (StepOutcome::Interrupted, report, None, duration)
        }
        Some(status) => {
            let duration = Duration::from_micros(status.duration_us);
            let outcome = if status.timed_out {
                StepOutcome::TimedOut
            } else if status.shell_code() == 0 {
                StepOutcome::Succeeded
            } else {
                StepOutcome::Failed
            };
            let report = StepReport::Ran {
                exit_code: status.shell_code(),
                duration,
                output,
                timed_out: status.timed_out,
                interrupted: false,
                truncated_bytes,
            };
            (outcome, report, Some(status.shell_code()), duration)
        }
    };
    let input = StepInput {
        index: u32::try_from(step.index).unwrap_or(u32::MAX),
        label: Some(step.label.clone()),
        command: step.code.clone(),
        exit_code,
        duration,
        state: store_state(outcome),
        keep_full_output: !capture.spool_overflowed(),
    };
    Ok(StepRun {
        outcome,
        report,
        input,
        capture,
    })
}

/// Builds the store record of a step that did not run.
pub(crate) fn not_run_input(step: &Step) -> StepInput {
    StepInput {
        index: u32::try_from(step.index).unwrap_or(u32::MAX),
        label: Some(step.label.clone()),
        command: step.code.clone(),
        exit_code: None,
        duration: Duration::ZERO,
        state: StepState::Skipped,
        keep_full_output: false,
    }
}

/// Maps a step outcome to the store's states. The store has no interrupted step state: an
/// interrupted step is recorded as failed without an exit code, in a turn recorded as
/// interrupted.
fn store_state(outcome: StepOutcome) -> StepState {
    match outcome {
        StepOutcome::Succeeded => StepState::Succeeded,
        StepOutcome::Failed | StepOutcome::Interrupted => StepState::Failed,
        StepOutcome::TimedOut => StepState::TimedOut,
        StepOutcome::Skipped | StepOutcome::NotRun => StepState::Skipped,
    }
}
