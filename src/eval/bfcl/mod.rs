//! BFCL (Berkeley Function Calling Leaderboard) AST evaluation, ported from the official checker
//! (`bfcl_eval/eval_checker/ast_eval/ast_checker.py` of `bfcl-eval==2026.3.23`).
//!
//! - `load.rs`: [`load_category`] / [`load_dir`] read the test files and their possible
//!   answers, [`read_outputs`] a file of model outputs.
//! - `prompt.rs`: [`eval_prompt`] builds the Tool-N1 evaluation prompt for a record.
//! - `decode.rs`: [`decode_output`] turns raw model text into calls (Tool-N1 JSON list in the
//!   first `<tool_call>` block, Qwen's one-object-per-block format, or BFCL's Python-call
//!   syntax).
//! - `check.rs`: [`check_record`] gives the verdict for one record (the checker port).
//! - `report.rs`: [`score`] checks many `(id, output)` pairs in memory; [`Report`] holds
//!   per-category accuracy and the Tool-N1 summary.
//! - [`lang`]: the Java / JavaScript type converters.
//!
//! Assumptions where the official pipeline is Python-specific:
//! - Values are [`PyValue`](crate::pycall::PyValue)s so that Python's type distinctions hold
//!   (int vs float, bool vs int, list vs tuple). JSON from a `<tool_call>` block maps integers to `int` and numbers with a
//!   fraction or exponent to `float`, as Python's `json.loads` does.
//! - Java / JavaScript (`simple_java`, `simple_javascript`): as in the official runner, the prompt
//!   tells the model that every parameter is a string holding Java/JavaScript source, and the
//!   checker requires a string for every parameter whose declared type is known, converts it with
//!   the ported `java_type_converter` / `js_type_converter` ([`lang`]), and then applies the
//!   Python rules to the converted value. A non-string value for such a parameter is
//!   `type_error:java` / `type_error:js`, as in the official checker.
//! - Where the Python code would crash (a ground-truth function missing from the function list,
//!   a schema without `properties`, an unknown type name), the record gets a failed verdict with
//!   kind `checker:bad_record` instead.
//! - BFCL's Python decoder also evaluates arithmetic (`2*3`) and lambdas inside arguments; this
//!   decoder rejects them (decode failure). Positional arguments are ignored, as in BFCL.

mod check;
mod decode;
pub mod lang;
mod load;
mod prompt;
mod report;

pub use check::{
    ast_check, check_record, expected_type, ground_truth_output, simple_function_checker,
    standardize_string, Fail, PyType, Verdict,
};
pub use decode::{decode_output, Call, DecodeError};
pub use load::{load_category, load_dir, read_outputs};
pub use prompt::{eval_prompt, prompt_functions, EvalPrompt};
pub use report::{score, Report, Summary, Tally};

use crate::data::Message;
use serde::Serialize;
use serde_json::Value;

/// The BFCL categories scored here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Category {
    SimplePython,
    SimpleJava,
    SimpleJavascript,
    Multiple,
    Parallel,
    ParallelMultiple,
    LiveSimple,
    LiveMultiple,
    LiveParallel,
    LiveParallelMultiple,
    Irrelevance,
    LiveIrrelevance,
    LiveRelevance,
}

impl Category {
    pub const ALL: [Category; 13] = [
        Category::SimplePython,
        Category::SimpleJava,
        Category::SimpleJavascript,
        Category::Multiple,
        Category::Parallel,
        Category::ParallelMultiple,
        Category::LiveSimple,
        Category::LiveMultiple,
        Category::LiveParallel,
        Category::LiveParallelMultiple,
        Category::Irrelevance,
        Category::LiveIrrelevance,
        Category::LiveRelevance,
    ];

    /// The eleven categories of the Tool-N1 table (python-only simple plus relevance checks).
    pub const TOOLN1: [Category; 11] = [
        Category::SimplePython,
        Category::Multiple,
        Category::Parallel,
        Category::ParallelMultiple,
        Category::LiveSimple,
        Category::LiveMultiple,
        Category::LiveParallel,
        Category::LiveParallelMultiple,
        Category::Irrelevance,
        Category::LiveIrrelevance,
        Category::LiveRelevance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::SimplePython => "simple_python",
            Category::SimpleJava => "simple_java",
            Category::SimpleJavascript => "simple_javascript",
            Category::Multiple => "multiple",
            Category::Parallel => "parallel",
            Category::ParallelMultiple => "parallel_multiple",
            Category::LiveSimple => "live_simple",
            Category::LiveMultiple => "live_multiple",
            Category::LiveParallel => "live_parallel",
            Category::LiveParallelMultiple => "live_parallel_multiple",
            Category::Irrelevance => "irrelevance",
            Category::LiveIrrelevance => "live_irrelevance",
            Category::LiveRelevance => "live_relevance",
        }
    }

    pub fn from_name(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The category of a record id (`simple_python_3`, `live_multiple_12-4-0`).
    pub fn from_id(id: &str) -> Option<Category> {
        let cut = id.rfind('_')?;
        Category::from_name(&id[..cut])
    }

    /// The data file name (`BFCL_v4_<name>.json`, same name under `possible_answer/`).
    pub fn file_name(self) -> String {
        format!("BFCL_v4_{}.json", self.name())
    }

    /// Scored by the AST checker against possible answers (not a relevance check).
    pub fn is_ast(self) -> bool {
        !matches!(
            self,
            Category::Irrelevance | Category::LiveIrrelevance | Category::LiveRelevance
        )
    }

    pub fn language(self) -> Language {
        match self {
            Category::SimpleJava => Language::Java,
            Category::SimpleJavascript => Language::JavaScript,
            _ => Language::Python,
        }
    }
}

/// The language a category's functions are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    Python,
    Java,
    JavaScript,
}

/// One BFCL test record with its possible answer (none for relevance categories).
#[derive(Clone, Debug)]
pub struct Record {
    pub id: String,
    pub category: Category,
    /// Turns; each turn a list of `{role, content}` messages (single-turn categories have one).
    pub question: Vec<Vec<Message>>,
    /// Function documents as in the file (`{name, description, parameters}`).
    pub functions: Vec<Value>,
    /// `ground_truth`: a list of `{func_name: {param: [allowed values...]}}`.
    pub ground_truth: Option<Vec<Value>>,
}
