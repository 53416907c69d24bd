//! The command-line tools beside the daemon: `weir explain` and `weir policy check`,
//! `test`, `new` and `wit`. Each answers from objects and modules on disk; none opens a socket.

pub mod check;
pub mod explain;
pub mod policy_test;
pub mod scaffold;
pub mod sdk;
