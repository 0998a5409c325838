//! Errors as values. Every message names the file, field, tensor or line at fault and what was
//! expected, so that a user can act on it without reading the source.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system error. The OS text is part of this message and is deliberately not also
    /// exposed as the error's `source()`: a reporter that prints the whole chain (anyhow's
    /// `{:#}`) would otherwise print it twice. The underlying error stays reachable as `err`.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A bad or missing configuration field (`file` may be a path or a section name).
    #[error("{file}: field `{field}`: {msg}")]
    Config {
        file: String,
        field: String,
        msg: String,
    },
    /// A missing, mis-shaped or unreadable tensor in a checkpoint.
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor {
        file: String,
        tensor: String,
        msg: String,
    },
    /// A bad record in a line-oriented input file (1-based line number).
    #[error("{file}:{line}: {msg}")]
    Line {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("no CUDA device: {0}")]
    NoCuda(String),
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// A shape or argument that does not fit an op.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An argument of a backend op outside the op's contract (`backend::check`): the op, the
    /// argument, what the contract expects and what was given.
    #[error("{op}: argument `{arg}`: expected {expected}, got {got}")]
    Arg {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: String,
    },
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

/// Shorthand for an `Error::Invalid` early return.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::Error::Invalid(format!($($arg)+)));
        }
    };
}

/// Print a note (e.g. why a test is skipped) straight to the process's stderr. Unlike
/// `println!`, this is not captured by the test harness, so the note shows in `cargo test`
/// output even when the test passes.
#[macro_export]
macro_rules! tooln1_skip {
    ($($arg:tt)+) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)+);
    }};
}
