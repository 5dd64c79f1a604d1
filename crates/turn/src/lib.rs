//! The turn executor of upstream: runs the steps of a Markdown turn document in one sandbox,
//! writes their results back into the document and records the turn in the context store.
//!
//! ```no_run
//! # async fn example(runner: upstream_turn::TurnRunner) -> Result<(), upstream_turn::TurnError> {
//! use tokio_util::sync::CancellationToken;
//! use upstream_turn::{TurnOptions, TurnRequest};
//!
//! let request = TurnRequest::load("research.md".as_ref())?;
//! let cancel = CancellationToken::new();
//! let result = runner
//!     .run(&request, &TurnOptions::default(), &mut |event| println!("{event:?}"), &cancel)
//!     .await?;
//! println!("turn {} {:?}", result.turn.turn.id, result.outcome);
//! # Ok(())
//! # }
//! ```
//!
//! # How a turn runs
//!
//! 1. The context is chosen ([`TurnOptions::context`], else the front matter's `context`,
//!    else the document's folder) and locked through [`upstream_store::ContextStore::begin_turn`],
//!    so turns of one context run one at a time.
//! 2. The image is taken from the image store, or pulled, and one sandbox boots from it.
//! 3. The context's `turns.json` and the artifacts of earlier turns are uploaded under
//!    `$UPSTREAM_CONTEXT` (`/run/upstream/context`) and made read-only. With
//!    `carry: workspace`, the previous turn's working directory is unpacked first.
//! 4. Each step's code is uploaded as a script and run by the front matter's `shell`
//!    (default `bash`), with stdin at end of file. A small wrapper restores the exported
//!    variables and working directory that the previous step left, so the steps behave like
//!    one shell session; files persist because the sandbox does. stdout and stderr are
//!    merged in arrival order. The document is rewritten atomically after every step.
//! 5. A failing or timed-out step stops the turn unless it has `continue-on-error`; later
//!    steps are marked not run. `skip` steps are marked skipped.
//! 6. Background processes are stopped, then files under `$UPSTREAM_ARTIFACTS`
//!    (`/run/upstream/artifacts`) and files matching the front matter's `artifacts` globs
//!    (relative to the working directory) are stored as artifacts, also after a failed
//!    step. With `carry: workspace`, the working directory is archived too.
//! 7. The turn is finished in the store and the sandbox destroyed.
//!
//! The working directory is the front matter's `workdir`, else the image's, else `/work`.
//!
//! # Known limitations
//!
//! - The shell must be POSIX-compatible (bash, dash, zsh, busybox sh), because the wrapper
//!   is a POSIX shell script. Helper commands use `/bin/sh`, `tar`, `chmod` and `chown` from
//!   the image.
//! - Only exported variables carry over between steps, not shell variables, functions,
//!   aliases or options. A step killed at its time limit saves nothing, so a later step
//!   (after `continue-on-error`) starts from the state before it.
//! - Store calls block the async task that runs the turn; they are short except for
//!   storing large outputs and artifacts.
//! - A document edited while its turn runs is overwritten with the version read at start.

mod artifacts;
mod capture;
mod error;
mod event;
mod guest;
mod io;
mod plan;
mod runner;
mod step;
mod write;

pub use artifacts::ArtifactLimits;
pub use error::TurnError;
pub use event::{OutputData, OutputStream, PullState, StepOutcome, TurnEvent, TurnOutcomeKind};
pub use guest::{ARTIFACTS_DIR, CONTEXT_DIR};
pub use plan::{DEFAULT_IMAGE, DEFAULT_WORKDIR};
pub use runner::{
    DocumentTarget, TurnOptions, TurnRequest, TurnResult, TurnRunner, DEFAULT_MAX_OUTPUT_BYTES,
};
pub use tokio_util::sync::CancellationToken;
