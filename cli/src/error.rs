//! The CLI's single error type. Every failure reaches `main` as a [`CliError`]; `main` prints
//! its cause chain on one line and exits non-zero, so no user input can cause a panic.

use std::path::PathBuf;

/// Everything that can go wrong in a `maskdiff` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A configuration value is invalid; `field` is its dotted TOML path (e.g. `train.lr`).
    #[error("invalid config value `{field}`: {reason}")]
    Config { field: String, reason: String },
    /// The TOML file could not be parsed (unknown field, wrong type, ...).
    #[error("cannot parse config {path}: {message}")]
    ConfigParse { path: PathBuf, message: String },
    /// A file or directory operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Malformed JSON in a file we read (metrics, manifests).
    #[error("malformed {what} in {path}: {message}")]
    Format {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// Input that cannot be used with this model (prompt too long, wrong vocabulary, ...).
    #[error("{0}")]
    Input(String),
    /// The checkpoint does not fit the requested model or data.
    #[error("checkpoint {path} does not match: {reason}")]
    CheckpointMismatch { path: PathBuf, reason: String },
    /// The loss or gradient became NaN or infinite; nothing of that step was saved. `kept` says
    /// which checkpoint is in force, if any; the causes are listed, none asserted.
    #[error(
        "training diverged: {what} is {value} at step {step}, nothing of that step was saved; \
         {kept}; possible causes: a learning rate too high (optim.lr = {lr:e}), gradient \
         clipping off or loose (optim.clip_norm = {clip_norm}), too short a warm-up \
         (optim.warmup_steps = {warmup_steps}), or extreme data"
    )]
    Diverged {
        what: &'static str,
        step: u64,
        value: f64,
        kept: String,
        lr: f64,
        clip_norm: f64,
        warmup_steps: u64,
    },
    /// A plot could not be drawn.
    #[error("plot failed: {0}")]
    Plot(String),
    /// An error from the masking-schedule crate.
    #[error(transparent)]
    Schedule(#[from] maskdiff_schedule::ScheduleError),
    /// An error from the process crate.
    #[error(transparent)]
    Process(#[from] maskdiff_process::ProcessError),
    /// Reading or tokenising data.
    #[error("data: {0}")]
    Data(#[from] maskdiff_data::DataError),
    /// Building or running the network.
    #[error("network: {0}")]
    Network(#[from] maskdiff_network::NetworkError),
    /// The objective: noising, losses, the NELBO estimator.
    #[error("objective: {0}")]
    Objective(#[from] maskdiff_objective::ObjectiveError),
    /// Training or checkpointing.
    #[error("{0}")]
    Train(#[from] maskdiff_train::TrainError),
    /// Sampling.
    #[error("sampler: {0}")]
    Sampler(#[from] maskdiff_sampler::SamplerError),
}

impl CliError {
    /// A config error for the dotted field `field`.
    pub fn config(field: &str, reason: impl Into<String>) -> Self {
        CliError::Config {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
    /// An I/O error while doing `action` on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CliError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// The error and all its sources, joined with ": " on one line.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        let part = s.to_string();
        // `#[error(transparent)]` and "{0}" wrappers repeat their source's message.
        if !msg.ends_with(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        src = s.source();
    }
    msg.replace('\n', " ")
}

/// A clap usage error as one line: the message, the lines clap indents under it (e.g. the missing
/// arguments), its tips and the usage, with "see --help". A missing command (`maskdiff`,
/// `maskdiff plot`), for which clap would print the whole help, is one line too. `None` for
/// `--help` and `--version`, which clap prints itself.
pub fn usage_error_line(e: &clap::Error) -> Option<String> {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return None;
    }
    // `Display` of the rendered error is its plain text (no colour codes).
    let text = e.render().to_string();
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let usage = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Usage:"))
            .unwrap_or("maskdiff <COMMAND>")
            .trim();
        return Some(format!(
            "a command is required (usage: {usage}; see --help)"
        ));
    }
    let mut msg = String::new();
    let mut tips = Vec::new();
    let mut usage = None;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with("For more information") {
            continue;
        }
        if let Some(u) = t.strip_prefix("Usage:") {
            usage = Some(u.trim().to_string());
        } else if let Some(tip) = t.strip_prefix("tip:") {
            tips.push(tip.trim().to_string());
        } else if let Some(m) = t.strip_prefix("error:") {
            msg.push_str(m.trim());
        } else {
            if !msg.is_empty() {
                msg.push(' ');
            }
            msg.push_str(t);
        }
    }
    for tip in tips {
        msg.push_str(&format!("; tip: {tip}"));
    }
    if let Some(u) = usage {
        msg.push_str(&format!(" (usage: {u}; see --help)"));
    }
    Some(msg)
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;
