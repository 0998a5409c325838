//! Evaluation: BFCL's AST checker ([`bfcl`]) and API-Bank level-1 call matching ([`apibank`]).

pub mod apibank;
pub mod bfcl;
