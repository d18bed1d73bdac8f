//! The OpenAPI document served at `/openapi.json`, kept next to the code in
//! `controller/openapi.json` and checked by the tests (schema validation, every route listed).

/// The document, verbatim.
pub const DOCUMENT: &str = include_str!("../openapi.json");
