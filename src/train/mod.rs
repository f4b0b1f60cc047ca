//! Training and evaluation: the loss, evaluation (and, as training lands, the loop).

pub mod eval;
pub mod loss;
