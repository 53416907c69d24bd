//! The request a 0.2.0 policy's `select-request` reads (`weir:policy/http`): the head of
//! the HTTP request being decided, lent to the instance for that one call. The guest gets
//! a borrowed handle; each getter copies out only the value it asks for.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::bindings::weir::policy0_2_0::http;
use super::imports::StoreState;

pub use super::bindings::RequestHead;

/// The handle every `select-request` call passes: the instance reads the request it is
/// lent for the call (`StoreState::request`), so no table entry is made per request.
pub(crate) fn handle() -> Resource<RequestHead> {
    Resource::new_borrow(0)
}

impl StoreState {
    /// The request lent to the current call. A borrowed handle cannot outlive the call
    /// it came with (the component model checks), so there always is one; if not, the
    /// getters answer as for an empty request.
    fn lent(&self) -> Option<&Arc<RequestHead>> {
        self.request.as_ref()
    }
}

impl http::Host for StoreState {}

impl http::HostRequest for StoreState {
    fn method(&mut self, _: Resource<RequestHead>) -> String {
        self.lent()
            .map_or("", |head| head.method.as_str())
            .to_string()
    }

    fn authority(&mut self, _: Resource<RequestHead>) -> Option<String> {
        let head = self.lent()?;
        match head.uri.authority() {
            Some(authority) => Some(authority.as_str().to_string()),
            None => (head.headers.get(hyper::header::HOST))
                .and_then(|host| host.to_str().ok())
                .map(str::to_string),
        }
    }

    fn path(&mut self, _: Resource<RequestHead>) -> String {
        (self.lent())
            .and_then(|head| head.uri.path_and_query())
            .map_or("/", |p| p.as_str())
            .to_string()
    }

    fn header(&mut self, _: Resource<RequestHead>, name: String) -> Option<Vec<u8>> {
        // `HeaderMap::get` with a `&str` compares without case; a name that is not a
        // valid header name finds nothing.
        (self.lent()?.headers.get(name.as_str())).map(|value| value.as_bytes().to_vec())
    }

    fn drop(&mut self, _: Resource<RequestHead>) -> wasmtime::Result<()> {
        // Only ever lent (borrowed): the host owns the request.
        Ok(())
    }
}
