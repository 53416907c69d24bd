//! The host side of `wit/policy.wit` (contract 0.2.0, which carries 0.1.0), generated once
//! here.

wasmtime::component::bindgen!({
    world: "policy-world",
    path: "../wit",
    with: {
        "weir:policy/http.request": super::request::RequestHead,
    },
});

pub use self::weir::policy0_1_0::types;
