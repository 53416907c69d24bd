//! A policy built against `weir:policy@0.1.0` alone, without the SDK, as every policy was
//! before 0.2.0: all ready endpoints for both scopes, and round robin in `select`. weir
//! must keep loading it, and on HTTP ports ask its `select` for every request.

use std::cell::Cell;

wit_bindgen::generate!({
    world: "weir:policy/policy-world@0.1.0",
    path: "../../../../wit/deps/policy-0.1.0",
});

use exports::weir::policy::policy::Guest;
use weir::policy::types::{
    Capabilities, Connection, Decision, Eligibility, EmptyAction, Endpoint, EndpointSet, Node,
    Outcome, Service,
};

thread_local! {
    static NEXT: Cell<usize> = const { Cell::new(0) };
    static ELIGIBLE: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct RoundRobin;

impl Guest for RoundRobin {
    fn configure(_: String) -> Result<Capabilities, String> {
        Ok(Capabilities {
            observe_outcomes: false,
        })
    }

    fn update(_: u32, _: Service, _: Node, endpoints: Vec<Endpoint>) -> Eligibility {
        let ids: Vec<u32> = endpoints.iter().filter(|e| e.ready).map(|e| e.id).collect();
        ELIGIBLE.with(|e| *e.borrow_mut() = ids.clone());
        let set = || EndpointSet {
            endpoints: ids.clone(),
            when_empty: EmptyAction::Reject,
        };
        Eligibility {
            internal: set(),
            external: set(),
        }
    }

    fn remove(_: u32) {}

    fn select(_: u32, _: Connection) -> Decision {
        ELIGIBLE.with(|e| {
            let ids = e.borrow();
            let next = NEXT.with(|n| n.replace(n.get() + 1));
            Decision::Forward(ids[next % ids.len()])
        })
    }

    fn observe(_: u32, _: Outcome) {}
}

export!(RoundRobin);
