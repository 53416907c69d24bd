//! The weir policy SDK: implement [`Policy`], export it with [`export_policy!`], and build
//! with `cargo build --target wasm32-wasip2 --release`.
//!
//! A policy makes two decisions for each Service port: which endpoints are eligible for
//! internal and external traffic ([`Policy::update`], on the control plane, when anything
//! changes) and which eligible endpoint gets each new connection ([`Policy::select`], on
//! the data plane). The SDK owns the WIT bindings, the per-service bookkeeping (state per
//! service handle, the eligible sets per scope) and kube-proxy's rules ([`kube`]), so a
//! policy is only its decisions, and its logic is testable natively with [`Driver`].
//!
//! ```
//! use weir_sdk::{Connection, Decision, EndpointId, Policy, Service};
//!
//! /// Always the lowest eligible id: a toy, but a complete policy.
//! pub struct First;
//!
//! impl Policy for First {
//!     type State = ();
//!     fn configure(_config: &str) -> Result<Self, String> {
//!         Ok(First)
//!     }
//!     fn select(&self, _: &mut (), _: &Service, eligible: &[EndpointId], _: &Connection) -> Decision {
//!         Decision::Forward(eligible[0])
//!     }
//! }
//! weir_sdk::export_policy!(First);
//! ```

pub mod affinity;
pub mod config;
pub mod connections;
mod driver;
pub mod hash;
pub mod host;
pub mod ids;
pub mod kube;
mod request;
pub mod scoped;
pub mod sticky;
mod types;
pub mod weighted;

#[doc(hidden)]
pub mod export;

pub use driver::Driver;
pub use host::{log, now_nanos, random_below, random_u64};
pub use request::{Request, RequestEvent, RequestOutcome, RequestParts};
pub use types::*;

/// The WIT bindings of `weir:policy@0.2.0` (which carries 0.1.0), generated once here for
/// every policy.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy-world",
        path: "../../wit",
        generate_all,
        pub_export_macro: true,
        default_bindings_module: "weir_sdk::bindings",
    });
}

/// A routing policy. The host calls it through the SDK's [`Driver`]:
///
/// - [`configure`](Policy::configure) once per instance, with the policy's configuration;
/// - [`update`](Policy::update) when a service port's Service, endpoints or node change;
/// - [`select`](Policy::select) for each new connection whose scope has eligible endpoints,
///   and [`select_request`](Policy::select_request) for each request on an HTTP port;
/// - [`observe`](Policy::observe) for connection outcomes (and
///   [`observe_request`](Policy::observe_request) for requests'), if
///   [`capabilities`](Policy::capabilities) asks for them.
///
/// A panic anywhere is a trap: the host discards the instance and applies the service's
/// failure mode (kube-default's answer, or reject) to the call.
pub trait Policy: Sized + 'static {
    /// Per-service-port state, created with `Default` when a port first appears, kept
    /// across updates and dropped when the port goes away.
    type State: Default + 'static;

    /// Builds the policy from its configuration text ("" when none). An `Err` refuses the
    /// configuration with a message for the operator.
    fn configure(config: &str) -> Result<Self, String>;

    /// What the policy asks of the host. Default: nothing beyond `select`.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Decides the eligible endpoints for internal and external traffic. `endpoints` is
    /// the whole current list. Default: exactly kube-proxy's answer
    /// ([`kube::kube_proxy_eligibility`]); override to change eligibility, and keep using
    /// the [`kube`] helpers for the parts that should stay kube-proxy's.
    fn update(
        &self,
        state: &mut Self::State,
        service: &Service,
        node: &Node,
        endpoints: &[Endpoint],
    ) -> Eligibility {
        let _ = state;
        kube::kube_proxy_eligibility(service, node, endpoints)
    }

    /// Picks the endpoint for one new connection. `eligible` is the non-empty, sorted set
    /// for the connection's scope from the last `update`. Returning an id outside it is an
    /// invalid answer.
    fn select(
        &self,
        state: &mut Self::State,
        service: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
    ) -> Decision;

    /// Picks the endpoint for one request on an HTTP Service port (`appProtocol` `http`,
    /// `kubernetes.io/h2c` or `grpc`): every request of a keep-alive or HTTP/2 connection
    /// is decided on its own. `connection` is the client connection it came on. Default:
    /// [`select`](Policy::select), as if the request were a connection.
    fn select_request(
        &self,
        state: &mut Self::State,
        service: &Service,
        eligible: &[EndpointId],
        connection: &Connection,
        request: &dyn Request,
    ) -> Decision {
        let _ = request;
        self.select(state, service, eligible, connection)
    }

    /// A connection went to `endpoint` without this policy's `select` being asked (a
    /// wrapper such as [`sticky::Sticky`] answered for it). Policies that count
    /// connections count it here too. Default: nothing.
    fn forwarded(&self, state: &mut Self::State, endpoint: EndpointId) {
        let _ = (state, endpoint);
    }

    /// Learns from what happened to a forwarded connection. Default: ignores it.
    fn observe(&self, state: &mut Self::State, outcome: &Outcome) {
        let _ = (state, outcome);
    }

    /// Learns from what happened to a forwarded request. Default: [`observe`](Policy::observe)
    /// with the request's [connection outcome](RequestOutcome::as_connection_outcome), so
    /// a policy counting connections in flight counts requests in flight.
    fn observe_request(&self, state: &mut Self::State, outcome: &RequestOutcome) {
        self.observe(state, &outcome.as_connection_outcome());
    }
}

/// Exports a [`Policy`] as the component's `weir:policy/policy` and `weir:policy/requests`
/// implementations. Compiles
/// to nothing outside `wasm32`, so the crate can also be used natively (unit tests, rlib).
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::bindings::exports::weir::policy0_1_0::policy::Guest;
            use $crate::bindings::exports::weir::policy0_2_0::requests;
            use $crate::bindings::weir::policy0_1_0::types as wit;

            ::std::thread_local! {
                static DRIVER: ::core::cell::RefCell<::core::option::Option<$crate::Driver<$policy>>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            struct WeirPolicyExport;

            impl Guest for WeirPolicyExport {
                fn configure(config: ::std::string::String) -> ::core::result::Result<wit::Capabilities, ::std::string::String> {
                    $crate::export::configure(&DRIVER, &config)
                }
                fn update(
                    service: u32,
                    info: wit::Service,
                    node: wit::Node,
                    endpoints: ::std::vec::Vec<wit::Endpoint>,
                ) -> wit::Eligibility {
                    $crate::export::update(&DRIVER, service, info, node, endpoints)
                }
                fn remove(service: u32) {
                    $crate::export::remove(&DRIVER, service)
                }
                fn select(service: u32, connection: wit::Connection) -> wit::Decision {
                    $crate::export::select(&DRIVER, service, connection)
                }
                fn observe(service: u32, outcome: wit::Outcome) {
                    $crate::export::observe(&DRIVER, service, outcome)
                }
            }

            impl requests::Guest for WeirPolicyExport {
                fn select_request(
                    service: u32,
                    connection: wit::Connection,
                    request: &$crate::bindings::weir::policy0_2_0::http::Request,
                ) -> wit::Decision {
                    $crate::export::select_request(&DRIVER, service, connection, request)
                }
                fn observe_request(service: u32, outcome: requests::RequestOutcome) {
                    $crate::export::observe_request(&DRIVER, service, outcome)
                }
            }

            $crate::bindings::export!(WeirPolicyExport with_types_in $crate::bindings);
        };
    };
}
