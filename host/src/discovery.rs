//! Where Kubernetes objects come from. Every source produces the same [`Objects`].

pub mod files;
pub mod watch;

pub use files::{Diagnostic, Objects, Origin, load_paths};
