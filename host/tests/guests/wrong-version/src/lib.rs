//! A component built against a future contract version, to test that weir refuses it
//! with a message naming what it exports and what is expected.

wit_bindgen::generate!({
    inline: r#"
        package weir:policy@0.9.0;

        interface policy {
            select: func(service: u32) -> u32;
        }

        world policy-world {
            export policy;
        }
    "#,
});

struct Future;

impl exports::weir::policy::policy::Guest for Future {
    fn select(service: u32) -> u32 {
        service
    }
}

export!(Future);
