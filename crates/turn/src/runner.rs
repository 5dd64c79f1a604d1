//! [`TurnRunner`]: one document, one sandbox, one recorded turn.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use upstream_image::{ImageStore, LocalImage, NoProgress};
use upstream_runbook::{render_with_options, Document, RenderOptions, StepReport};
use upstream_store::{
    default_context_name, BeginOptions, ContextStore, Digest, DocumentInfo, StoreError, Timestamp,
    TurnDetail, TurnGuard, TurnOutcome,
};
use upstream_vmm::{Runtime, Sandbox, SandboxSpec};

use crate::artifacts::{self, ArtifactLimits};
use crate::error::TurnError;
use crate::event::{PullState, StepOutcome, TurnEvent, TurnOutcomeKind};
use crate::guest::{self, ARTIFACTS_DIR, CONTEXT_DIR};
use crate::plan::{absolute_path, resolve_workdir, TurnPlan, DEFAULT_IMAGE};
use crate::step::{not_run_input, run_step, StepContext};
use crate::write::write_atomic;

/// Default limit of the full output of one step kept on the host for the store.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 256 << 20;

/// A turn document read from disk and parsed.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    /// Path of the document as the caller named it.
    pub path: PathBuf,
    /// The document's text.
    pub source: String,
    pub document: Document,
}

impl TurnRequest {
    /// Reads and parses the document at `path`.
    pub fn load(path: &Path) -> Result<TurnRequest, TurnError> {
        let source = std::fs::read_to_string(path).map_err(|source| TurnError::ReadDocument {
            path: path.to_owned(),
            source,
        })?;
        TurnRequest::from_source(path, source)
    }

    /// Parses `source`, the text of the document at `path`.
    pub fn from_source(path: &Path, source: String) -> Result<TurnRequest, TurnError> {
        let document = upstream_runbook::parse(&source).map_err(|source| TurnError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let request = TurnRequest {
            path: path.to_owned(),
            source,
            document,
        };
        TurnPlan::new(&request.path, &request.document)?;
        Ok(request)
    }
}

/// Where the document with its results goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentTarget {
    /// Back into the document itself.
    InPlace,
    /// Into another file; the document stays untouched.
    File(PathBuf),
    /// Nowhere: the result carries the rendered text, as `--check` and the API need.
    Discard,
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct TurnOptions {
    /// Context to record the turn in, overriding the front matter and the default (the
    /// document's folder).
    pub context: Option<String>,
    /// Start a context without earlier turns: when the chosen context already has turns,
    /// the turn goes to the first free name `NAME~2`, `NAME~3`, ...
    pub new_context: bool,
    /// How long to wait for another turn of the same context; `None` fails at once.
    pub wait: Option<Duration>,
    pub target: DocumentTarget,
    pub render: RenderOptions,
    /// Limit of a step's full output kept for the store, in bytes. Past it, only the
    /// bounded tail is stored.
    pub max_output_bytes: u64,
    pub artifact_limits: ArtifactLimits,
    /// Keep the turn in the context store. Without it the turn is discarded at its end,
    /// as `--check` needs: the next turn loads the context it would have loaded anyway.
    pub keep_turn: bool,
}

impl Default for TurnOptions {
    fn default() -> Self {
        TurnOptions {
            context: None,
            new_context: false,
            wait: None,
            target: DocumentTarget::InPlace,
            render: RenderOptions::default(),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            artifact_limits: ArtifactLimits::default(),
            keep_turn: true,
        }
    }
}

/// How a turn ended, with its record.
#[derive(Debug, Clone)]
pub struct TurnResult {
    pub outcome: TurnOutcomeKind,
    pub context: String,
    /// The stored turn with its steps and artifacts.
    pub turn: TurnDetail,
    /// Outcome of each step, in document order.
    pub reports: Vec<StepReport>,
    /// The document with results written in.
    pub rendered: String,
    /// File the rendered document was written to, if any.
    pub written_to: Option<PathBuf>,
    /// Problems that did not stop the turn, such as artifacts over a limit.
    pub warnings: Vec<String>,
}

/// Runs turn documents in sandboxes and records them in a context store.
pub struct TurnRunner {
    runtime: Arc<Runtime>,
    images: ImageStore,
    store: Arc<dyn ContextStore>,
}

/// What the steps of a turn produced so far.
struct Progress {
    reports: Vec<StepReport>,
    warnings: Vec<String>,
}

impl TurnRunner {
    pub fn new(runtime: Arc<Runtime>, images: ImageStore, store: Arc<dyn ContextStore>) -> Self {
        TurnRunner {
            runtime,
            images,
            store,
        }
    }

    /// Runs `request` as one turn and records it.
    ///
    /// Reports progress through `events`. When `cancel` fires, the running step is marked
    /// interrupted, the sandbox is destroyed and the turn is recorded as interrupted; the
    /// result then has outcome [`TurnOutcomeKind::Interrupted`]. With
    /// [`DocumentTarget::InPlace`] or [`DocumentTarget::File`] the document is rewritten
    /// atomically after every step, so a crash leaves it valid with the results so far.
    ///
    /// Fails before the turn starts on invalid settings or a busy context. Fails after it
    /// started when the image or the sandbox fails; the turn is then recorded as failed.
    pub async fn run(
        &self,
        request: &TurnRequest,
        options: &TurnOptions,
        events: &mut dyn FnMut(TurnEvent),
        cancel: &CancellationToken,
    ) -> Result<TurnResult, TurnError> {
        let plan = TurnPlan::new(&request.path, &request.document)?;
        let context = self.choose_context(request, &plan, options)?;
        let document_path = absolute_path(&request.path);
        let info = DocumentInfo {
            path: document_path.clone(),
            sha256: Digest::of(request.source.as_bytes()),
            image: Some(plan.image.clone()),
            image_digest: None,
        };
        let guard = self
            .store
            .begin_turn(&context, &info, &BeginOptions { wait: options.wait })?;
        for turn in guard.interrupted_turns() {
            tracing::info!(%turn, context, "marked a turn of a dead process interrupted");
        }
        events(TurnEvent::TurnStarted {
            turn: guard.id().to_string(),
            context: context.clone(),
            document: document_path.clone(),
            image: plan.image.clone(),
            steps: request.document.steps.len(),
        });

        let mut progress = Progress {
            reports: vec![StepReport::Pending; request.document.steps.len()],
            warnings: Vec::new(),
        };
        let run = Run {
            runner: self,
            request,
            options,
            plan: &plan,
            guard: &guard,
        };
        let outcome = run.image_and_sandbox(&mut progress, events, cancel).await;
        let kind = match &outcome {
            Ok(kind) => *kind,
            Err(_) => TurnOutcomeKind::Failed,
        };
        if kind == TurnOutcomeKind::Interrupted {
            record_pending_as_not_run(&*self.store, &guard, request, &progress);
        }
        let rendered = render_with_options(
            &request.source,
            &request.document,
            &progress.reports,
            &options.render,
        );
        let written = run.write_document(&rendered);
        let turn = if !options.keep_turn {
            let mut turn = self.turn_detail(&context, guard.id())?;
            turn.turn.state = store_outcome(kind).into();
            turn.turn.ended_at = Some(Timestamp::now());
            self.store.discard_turn(guard)?;
            turn
        } else {
            let id = guard.id().clone();
            self.store.finish_turn(guard, store_outcome(kind))?;
            self.turn_detail(&context, &id)?
        };
        let written_to = written?;
        outcome?;

        events(TurnEvent::TurnFinished {
            outcome: kind,
            turn: Box::new(turn.clone()),
            document: document_path,
            written_to: written_to.clone(),
        });
        Ok(TurnResult {
            outcome: kind,
            context,
            turn,
            reports: progress.reports,
            rendered,
            written_to,
            warnings: progress.warnings,
        })
    }

    /// Picks the context: the option, else the front matter, else the document's folder,
    /// moved to a fresh name for `new_context`.
    fn choose_context(
        &self,
        request: &TurnRequest,
        plan: &TurnPlan,
        options: &TurnOptions,
    ) -> Result<String, TurnError> {
        let base = match options.context.clone().or_else(|| plan.context.clone()) {
            Some(name) => {
                upstream_store::validate_context_name(&name)?;
                name
            }
            None => default_context_name(&request.path)?,
        };
        if !options.new_context {
            return Ok(base);
        }
        let existing: Vec<String> = self
            .store
            .list_contexts()?
            .into_iter()
            .map(|summary| summary.name)
            .collect();
        if !existing.contains(&base) {
            return Ok(base);
        }
        // NOTE: two runs with --new-context at the same moment can pick the same name; the
        // context lock then serialises or rejects the second.
        let fresh = (2..)
            .map(|n| format!("{base}~{n}"))
            .find(|name| !existing.contains(name))
            .expect("an unbounded range has a free name");
        Ok(fresh)
    }

    fn turn_detail(
        &self,
        context: &str,
        id: &upstream_store::TurnId,
    ) -> Result<TurnDetail, TurnError> {
        self.store
            .context(context)?
            .turns
            .into_iter()
            .find(|turn| &turn.turn.id == id)
            .ok_or_else(|| TurnError::Store(StoreError::TurnNotFound(id.clone())))
    }
}

/// One turn in progress, holding its context.
struct Run<'a> {
    runner: &'a TurnRunner,
    request: &'a TurnRequest,
    options: &'a TurnOptions,
    plan: &'a TurnPlan,
    guard: &'a TurnGuard,
}

impl Run<'_> {
    fn store(&self) -> &dyn ContextStore {
        &*self.runner.store
    }

    async fn image_and_sandbox(
        &self,
        progress: &mut Progress,
        events: &mut dyn FnMut(TurnEvent),
        cancel: &CancellationToken,
    ) -> Result<TurnOutcomeKind, TurnError> {
        let Some(image) = self.resolve_image(events, cancel).await? else {
            return Ok(TurnOutcomeKind::Interrupted);
        };
        self.store().set_image_digest(self.guard, &image.digest)?;
        let spec = SandboxSpec {
            root_disk: image.rootfs.clone(),
            env: env_pairs(&image.config.env),
            workdir: None,
            user: image.config.user.clone().filter(|user| !user.is_empty()),
            limits: self.plan.limits,
            network: self.plan.network.clone(),
            publish: self.plan.publish.clone(),
            ..SandboxSpec::default()
        };
        let sandbox = tokio::select! {
            sandbox = Sandbox::create(&self.runner.runtime, spec) => sandbox?,
            () = cancel.cancelled() => return Ok(TurnOutcomeKind::Interrupted),
        };
        tracing::debug!(sandbox = sandbox.id(), turn = %self.guard.id(), "sandbox ready");
        for port in sandbox.published_ports() {
            tracing::info!(sandbox = sandbox.id(), guest_port = port.guest, host = %port.host, "port published");
        }
        let outcome = self
            .in_sandbox(&sandbox, &image, progress, events, cancel)
            .await;
        sandbox.destroy().await;
        outcome
    }

    /// Returns the local image, pulling it first when needed; `None` when cancelled.
    async fn resolve_image(
        &self,
        events: &mut dyn FnMut(TurnEvent),
        cancel: &CancellationToken,
    ) -> Result<Option<LocalImage>, TurnError> {
        let images = &self.runner.images;
        let reference = &self.plan.image;
        if let Some(image) = images.get(reference)? {
            images.touch(&image);
            return Ok(Some(image));
        }
        if reference == DEFAULT_IMAGE {
            return Err(TurnError::DefaultImageMissing(reference.clone()));
        }
        let pull_event = |state| TurnEvent::ImagePull {
            reference: reference.clone(),
            state,
        };
        events(pull_event(PullState::Started));
        let pulled = tokio::select! {
            pulled = images.pull(reference, &NoProgress) => pulled,
            () = cancel.cancelled() => return Ok(None),
        };
        match pulled {
            Ok(image) => {
                events(pull_event(PullState::Done));
                Ok(Some(image))
            }
            Err(error) => {
                events(pull_event(PullState::Failed));
                Err(error.into())
            }
        }
    }

    async fn in_sandbox(
        &self,
        sandbox: &Sandbox,
        image: &LocalImage,
        progress: &mut Progress,
        events: &mut dyn FnMut(TurnEvent),
        cancel: &CancellationToken,
    ) -> Result<TurnOutcomeKind, TurnError> {
        let workdir = resolve_workdir(self.plan, image.config.working_dir.as_deref());
        let user = image.config.user.clone().unwrap_or_default();
        let context = self.guard.context();
        guest::prepare(sandbox, &workdir, &user).await?;
        if self.plan.carry_workspace {
            artifacts::restore_workspace(self.store(), sandbox, context, &workdir).await?;
        }
        let loaded = artifacts::load_context(self.store(), sandbox, context).await?;
        if loaded.turns > 0 {
            events(TurnEvent::ContextLoaded {
                artifacts: loaded.artifacts,
                turns: loaded.turns,
            });
        }

        let env = self.step_env();
        let step_context = StepContext {
            sandbox,
            shell: &self.plan.shell,
            workdir: &workdir,
            env: &env,
            render: &self.options.render,
            max_output_bytes: self.options.max_output_bytes,
        };
        let outcome = self.steps(&step_context, progress, events, cancel).await?;
        if outcome == TurnOutcomeKind::Interrupted || cancel.is_cancelled() {
            return Ok(TurnOutcomeKind::Interrupted);
        }

        self.collect(sandbox, &workdir, progress, events).await?;
        Ok(outcome)
    }

    /// Runs the steps in order, recording each and rewriting the document after each.
    async fn steps(
        &self,
        context: &StepContext<'_>,
        progress: &mut Progress,
        events: &mut dyn FnMut(TurnEvent),
        cancel: &CancellationToken,
    ) -> Result<TurnOutcomeKind, TurnError> {
        let document = &self.request.document;
        let mut failed = false;
        for step in &document.steps {
            if cancel.is_cancelled() {
                return Ok(TurnOutcomeKind::Interrupted);
            }
            let (report, outcome) = if step.options.skip {
                (StepReport::Skipped, StepOutcome::Skipped)
            } else if failed {
                (StepReport::NotRun, StepOutcome::NotRun)
            } else {
                events(TurnEvent::StepStarted {
                    step: step.index + 1,
                    label: step.label.clone(),
                });
                let run =
                    run_step(context, step, document.timeout_of(step), events, cancel).await?;
                if run.capture.spool_overflowed() {
                    progress.warnings.push(format!(
                        "Step {} wrote {} bytes, more than the limit of {} kept for the store; \
                         only its end is stored",
                        step.index + 1,
                        run.capture.total(),
                        self.options.max_output_bytes
                    ));
                }
                let mut output = run.capture.into_reader()?;
                self.store()
                    .record_step(self.guard, &run.input, &mut output)?;
                progress.reports[step.index] = run.report;
                self.write_document_now(progress)?;
                self.finish_event(
                    step,
                    run.outcome,
                    run.input.exit_code,
                    run.input.duration,
                    events,
                );
                match run.outcome {
                    StepOutcome::Interrupted => return Ok(TurnOutcomeKind::Interrupted),
                    StepOutcome::Failed | StepOutcome::TimedOut => {
                        failed |= !step.options.continue_on_error;
                    }
                    _ => {}
                }
                continue;
            };
            self.store()
                .record_step(self.guard, &not_run_input(step), &mut std::io::empty())?;
            progress.reports[step.index] = report;
            self.finish_event(step, outcome, None, Duration::ZERO, events);
        }
        Ok(if failed {
            TurnOutcomeKind::Failed
        } else {
            TurnOutcomeKind::Succeeded
        })
    }

    fn finish_event(
        &self,
        step: &upstream_runbook::Step,
        state: StepOutcome,
        exit_code: Option<i32>,
        duration: Duration,
        events: &mut dyn FnMut(TurnEvent),
    ) {
        events(TurnEvent::StepFinished {
            step: step.index + 1,
            label: step.label.clone(),
            state,
            exit_code,
            duration_ms: duration,
        });
    }

    /// Stores the turn's artifacts and, with `carry: workspace`, its working directory.
    async fn collect(
        &self,
        sandbox: &Sandbox,
        workdir: &str,
        progress: &mut Progress,
        events: &mut dyn FnMut(TurnEvent),
    ) -> Result<(), TurnError> {
        guest::stop_background_processes(sandbox).await?;
        let mut warnings = Vec::new();
        artifacts::collect(
            self.store(),
            sandbox,
            self.guard,
            workdir,
            &self.plan.artifact_globs,
            &self.options.artifact_limits,
            &mut warnings,
        )
        .await?;
        if self.plan.carry_workspace {
            let limit = self.options.artifact_limits.max_workspace_bytes;
            if let Err(message) =
                artifacts::save_workspace(self.store(), sandbox, self.guard, workdir, limit).await
            {
                warnings.push(message);
            }
        }
        for message in warnings {
            events(TurnEvent::Warning {
                message: message.clone(),
            });
            progress.warnings.push(message);
        }
        Ok(())
    }

    /// Variables of every step: the front matter's, then upstream's own.
    fn step_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .plan
            .env
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        env.push(("UPSTREAM_ARTIFACTS".to_owned(), ARTIFACTS_DIR.to_owned()));
        env.push(("UPSTREAM_CONTEXT".to_owned(), CONTEXT_DIR.to_owned()));
        env.push(("UPSTREAM_TURN".to_owned(), self.guard.id().to_string()));
        env
    }

    fn write_document_now(&self, progress: &Progress) -> Result<(), TurnError> {
        let rendered = render_with_options(
            &self.request.source,
            &self.request.document,
            &progress.reports,
            &self.options.render,
        );
        self.write_document(&rendered).map(drop)
    }

    /// Writes `rendered` to the target; returns the path written, if any.
    fn write_document(&self, rendered: &str) -> Result<Option<PathBuf>, TurnError> {
        let path = match &self.options.target {
            DocumentTarget::Discard => return Ok(None),
            DocumentTarget::InPlace if rendered == self.request.source => return Ok(None),
            DocumentTarget::InPlace => self.request.path.clone(),
            DocumentTarget::File(path) => path.clone(),
        };
        write_atomic(&path, rendered).map_err(|source| TurnError::WriteDocument {
            path: path.clone(),
            source,
        })?;
        Ok(Some(path))
    }
}

/// Records the steps that an interruption kept from running, so the stored turn lists
/// every step. Failures are logged: the turn is being closed anyway.
fn record_pending_as_not_run(
    store: &dyn ContextStore,
    guard: &TurnGuard,
    request: &TurnRequest,
    progress: &Progress,
) {
    for (step, report) in request.document.steps.iter().zip(&progress.reports) {
        if *report != StepReport::Pending {
            continue;
        }
        if let Err(error) = store.record_step(guard, &not_run_input(step), &mut std::io::empty()) {
            tracing::warn!(%error, step = step.index + 1, "recording a step that did not run failed");
        }
    }
}

fn store_outcome(kind: TurnOutcomeKind) -> TurnOutcome {
    match kind {
        TurnOutcomeKind::Succeeded => TurnOutcome::Succeeded,
        TurnOutcomeKind::Failed => TurnOutcome::Failed,
        TurnOutcomeKind::Interrupted => TurnOutcome::Interrupted,
    }
}

/// Converts an image's `KEY=VALUE` list into pairs.
fn env_pairs(env: &[String]) -> Vec<(String, String)> {
    env.iter()
        .filter_map(|entry| entry.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}
