//! The host side of `wit/policy.wit` (contract 0.2.0, which carries 0.1.0), generated once
//! here.

wasmtime::component::bindgen!({
    world: "policy-world",
    path: "../wit",
    with: {
        "weir:policy/http.request": crate::policy::bindings::RequestHead,
    },
});

pub use self::weir::policy0_1_0::types;

/// One request's head: what a 0.2.0 policy's `select-request` may read (`request.rs`).
pub type RequestHead = hyper::http::request::Parts;
