//! The host side of `wit/policy.wit`, generated once here.

wasmtime::component::bindgen!({
    world: "policy-world",
    path: "../wit",
});

pub use self::weir::policy::types;
