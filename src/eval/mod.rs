//! Evaluation: BFCL's AST checker ([`bfcl`]), API-Bank level-1 call matching ([`apibank`]),
//! and greedy generation of the outputs they score ([`generate`]).

pub mod apibank;
pub mod bfcl;
pub mod generate;
