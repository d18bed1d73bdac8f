//! The OpenAPI document (`controller/openapi.json`, served at `/openapi.json`) against the
//! code: it lists exactly the routes of `http::router()`, every `$ref` resolves, its schemas
//! have exactly the JSON fields of the records in `api/src/types.rs`, records serialized by
//! serde validate against them, and `openapi-spec-validator` accepts the whole document.
//!
//! The validator steps need Python with `openapi-spec-validator`; `scripts/deps.sh` installs
//! it. Without it they fail (never skip).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use keel_api::*;
use keel_controller::openapi::DOCUMENT;
use serde::Serialize;
use serde_json::{json, Value};

/// Every route of `keel_controller::http::router()`, as (METHOD, path).
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/openapi.json"),
    ("GET", "/v1/health"),
    ("GET", "/v1/servers"),
    ("POST", "/v1/servers"),
    ("POST", "/v1/servers/{id}/heartbeat"),
    ("GET", "/v1/nodes"),
    ("POST", "/v1/nodes"),
    ("POST", "/v1/nodes/{id}/heartbeat"),
    ("GET", "/v1/nodes/{id}/attachments"),
    ("GET", "/v1/volumes"),
    ("POST", "/v1/volumes"),
    ("GET", "/v1/volumes/{id}"),
    ("DELETE", "/v1/volumes/{id}"),
    ("POST", "/v1/volumes/{id}/resize"),
    ("POST", "/v1/volumes/{id}/attach"),
    ("POST", "/v1/volumes/{id}/detach"),
    ("POST", "/v1/volumes/{id}/mirror-failed"),
    ("POST", "/v1/volumes/{id}/mirror-synced"),
    ("POST", "/v1/volumes/{id}/primary-unreachable"),
    ("GET", "/v1/pki/crl"),
    ("PUT", "/v1/pki/crl"),
];

/// Routes that need no credentials.
const PUBLIC: &[&str] = &["/openapi.json", "/v1/health"];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Python interpreter the validator steps run (the one `scripts/deps.sh` installs into).
const PYTHON: &str = "python3";

fn doc() -> Value {
    serde_json::from_str(DOCUMENT).expect("controller/openapi.json is not valid JSON")
}

fn expected_routes() -> BTreeSet<(String, String)> {
    ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut out = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for key in item.keys() {
            if METHODS.contains(&key.as_str()) {
                assert!(
                    out.insert((key.to_uppercase(), path.clone())),
                    "{key} {path} listed twice"
                );
            } else {
                assert!(
                    matches!(key.as_str(), "parameters" | "summary" | "description"),
                    "unexpected key {key:?} in path item {path}"
                );
            }
        }
    }
    out
}

/// The routes `router()` in controller/src/http.rs declares, read from its source.
fn routes_in_http_rs() -> BTreeSet<(String, String)> {
    let src = include_str!("../src/http.rs");
    let start = src
        .find("pub fn router(")
        .expect("http.rs has `pub fn router(`");
    let body = &src[start..];
    let body = &body[..body.find("\n}\n").expect("end of router()")];
    for unsupported in [".nest(", ".route_service(", ".merge("] {
        assert!(
            !body.contains(unsupported),
            "router() uses {unsupported}: teach routes_in_http_rs() about it"
        );
    }
    let mut out = BTreeSet::new();
    let mut rest = body;
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(k, _)| k)
            .expect("unbalanced .route(");
        let args = &rest[..end];
        let q1 = args.find('"').expect("route path literal");
        let q2 = q1 + 1 + args[q1 + 1..].find('"').expect("end of route path literal");
        let path = &args[q1 + 1..q2];
        let handlers = &args[q2 + 1..];
        let mut found = 0;
        let bytes = handlers.as_bytes();
        let mut k = 0;
        while k < bytes.len() {
            if bytes[k].is_ascii_alphabetic() || bytes[k] == b'_' {
                let s = k;
                while k < bytes.len() && (bytes[k].is_ascii_alphanumeric() || bytes[k] == b'_') {
                    k += 1;
                }
                let ident = &handlers[s..k];
                if bytes.get(k) == Some(&b'(') && METHODS.contains(&ident) {
                    assert!(
                        out.insert((ident.to_uppercase(), path.to_string())),
                        "{ident} {path} routed twice"
                    );
                    found += 1;
                }
            } else {
                k += 1;
            }
        }
        assert!(found > 0, "no method found in .route({args})");
    }
    out
}

#[test]
fn documents_exactly_the_routes_of_the_router() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    let expected = expected_routes();
    assert_eq!(expected.len(), ROUTES.len(), "ROUTES has duplicates");
    assert_eq!(
        routes_in_http_rs(),
        expected,
        "http.rs router() and this test's ROUTES differ: update ROUTES and controller/openapi.json"
    );
    let documented = documented_routes(&doc);
    let missing: Vec<_> = expected.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "controller/openapi.json differs from the router: undocumented {missing:?}, not routed {extra:?}"
    );
}

fn walk<'a>(v: &'a Value, at: &str, f: &mut impl FnMut(&str, &'a Value)) {
    f(at, v);
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                walk(
                    x,
                    &format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    f,
                );
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk(x, &format!("{at}/{i}"), f);
            }
        }
        _ => {}
    }
}

#[test]
fn every_ref_resolves_and_every_component_is_used() {
    let doc = doc();
    let mut refs = BTreeSet::new();
    let mut bad = Vec::new();
    walk(&doc, "", &mut |at, v| {
        let Some(r) = v.get("$ref") else { return };
        let Some(r) = r.as_str() else {
            bad.push(format!("{at}: $ref is not a string"));
            return;
        };
        let Some(pointer) = r.strip_prefix('#') else {
            bad.push(format!("{at}: $ref {r} is not local to the document"));
            return;
        };
        if doc.pointer(pointer).is_none() {
            bad.push(format!("{at}: $ref {r} does not resolve"));
        }
        refs.insert(r.to_string());
    });
    assert!(bad.is_empty(), "bad references:\n{}", bad.join("\n"));
    let mut unused = Vec::new();
    for kind in ["schemas", "responses", "parameters"] {
        for name in doc["components"][kind]
            .as_object()
            .expect("components")
            .keys()
        {
            let r = format!("#/components/{kind}/{name}");
            if !refs.contains(&r) {
                unused.push(r);
            }
        }
    }
    assert!(unused.is_empty(), "unused components: {unused:?}");
}

#[test]
fn security_schemes_and_public_routes() {
    let doc = doc();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["mutualTLS"]["type"], "mutualTLS");
    assert_eq!(schemes["bearerAuth"]["type"], "http");
    assert_eq!(schemes["bearerAuth"]["scheme"], "bearer");
    assert_eq!(
        doc["security"],
        json!([{ "mutualTLS": [] }, { "bearerAuth": [] }])
    );
    for (method, path) in ROUTES {
        let op = &doc["paths"][path][method.to_lowercase()];
        if PUBLIC.contains(path) {
            assert_eq!(
                op["security"],
                json!([]),
                "{method} {path} needs no credentials"
            );
        } else {
            assert!(
                op.get("security").is_none(),
                "{method} {path} must keep the global security"
            );
            for status in ["401", "403"] {
                assert!(
                    op["responses"].get(status).is_some(),
                    "{method} {path} lacks {status}"
                );
            }
        }
        assert!(
            op["responses"].get("200").is_some(),
            "{method} {path} lacks 200"
        );
    }
}

#[test]
fn error_responses_reference_the_error_schema() {
    let doc = doc();
    let allowed = ["400", "401", "403", "404", "409", "500", "503", "504"];
    for (method, path) in ROUTES {
        let responses = doc["paths"][path][method.to_lowercase()]["responses"]
            .as_object()
            .expect("responses");
        for (status, r) in responses {
            if status == "200" {
                continue;
            }
            assert!(
                allowed.contains(&status.as_str()),
                "{method} {path}: unexpected status {status}"
            );
            let r = match r.get("$ref").and_then(Value::as_str) {
                Some(p) => doc
                    .pointer(p.trim_start_matches('#'))
                    .expect("response $ref"),
                None => r,
            };
            assert_eq!(
                r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                "{method} {path} {status}"
            );
        }
    }
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["code", "message"]));
    // Heartbeats answer the CRL number the controller holds.
    for path in ["/v1/servers/{id}/heartbeat", "/v1/nodes/{id}/heartbeat"] {
        assert_eq!(
            doc["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
                ["$ref"],
            "#/components/schemas/HeartbeatAnswer"
        );
    }
}

// ----- the records of api/src/types.rs -----

struct Field {
    name: String,
    ty: String,
    default: bool,
}

enum Record {
    /// Fields; `strict` when serde(deny_unknown_fields).
    Struct { fields: Vec<Field>, strict: bool },
    /// Variants; `untagged` when serde(untagged).
    Enum {
        variants: Vec<String>,
        untagged: bool,
    },
}

/// The structs and enums of api/src/types.rs with their serde attributes. Panics on serde
/// attributes it does not know, so that a new one gets this test updated.
fn api_records() -> BTreeMap<String, Record> {
    let src = include_str!("../../api/src/types.rs");
    let mut out = BTreeMap::new();
    let mut attrs: Vec<String> = Vec::new();
    let mut lines = src.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with("///") || line.starts_with("//") || line.is_empty() {
            continue;
        }
        if line.starts_with("#[") {
            attrs.push(line.to_string());
            continue;
        }
        let item_attrs = std::mem::take(&mut attrs);
        let serde_attrs: Vec<&str> = item_attrs
            .iter()
            .filter(|a| a.contains("serde("))
            .map(String::as_str)
            .collect();
        if (line.starts_with("pub struct ") || line.starts_with("pub enum "))
            && !line.ends_with(" {")
        {
            panic!("api/src/types.rs: {line:?} is not a braced struct or enum: update this test");
        }
        if let Some(rest) = line.strip_prefix("pub struct ") {
            let name = rest.trim_end_matches(" {").trim().to_string();
            let mut struct_default = false;
            let mut strict = false;
            for a in &serde_attrs {
                match *a {
                    "#[serde(default)]" => struct_default = true,
                    "#[serde(deny_unknown_fields)]" => strict = true,
                    // A request record read only from a JSON object (object_only! in types.rs).
                    "#[serde(remote = \"Self\")]" => {}
                    other => panic!("unknown serde attribute {other} on {name}: update this test"),
                }
            }
            let mut fields = Vec::new();
            let mut fattrs: Vec<String> = Vec::new();
            for l in lines.by_ref() {
                if l == "}" {
                    break;
                }
                if l.starts_with("//") || l.is_empty() {
                    continue;
                }
                if l.starts_with("#[") {
                    fattrs.push(l.to_string());
                    continue;
                }
                let f = l
                    .strip_prefix("pub ")
                    .unwrap_or_else(|| panic!("{name}: field {l:?} is not `pub name: Type,`"));
                let (fname, ty) = f.split_once(':').expect("field name: type");
                let mut default = struct_default;
                // Optional and left out when absent: its schema is the inner type's.
                let mut never_null = false;
                for a in fattrs.drain(..) {
                    match a.as_str() {
                        "#[serde(default)]" => default = true,
                        // A default from a function (e.g. legacy_block_size): not required.
                        other if other.starts_with("#[serde(default = \"") => default = true,
                        // Optional, and left out when absent (the schema allows both).
                        "#[serde(default, skip_serializing_if = \"Option::is_none\")]" => {
                            default = true;
                            never_null = true;
                        }
                        other if other.contains("serde") => {
                            panic!("unknown serde attribute {other} on {name}.{fname}: update this test")
                        }
                        _ => {}
                    }
                }
                let ty = ty.trim().trim_end_matches(',').trim();
                let ty = match ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
                    Some(inner) if never_null => inner,
                    _ => ty,
                };
                fields.push(Field {
                    name: fname.trim().to_string(),
                    ty: ty.to_string(),
                    default,
                });
            }
            out.insert(name, Record::Struct { fields, strict });
        } else if let Some(rest) = line.strip_prefix("pub enum ") {
            let name = rest.trim_end_matches(" {").trim().to_string();
            let mut untagged = false;
            for a in &serde_attrs {
                match *a {
                    "#[serde(untagged)]" => untagged = true,
                    "#[serde(rename_all = \"snake_case\")]" => {}
                    other => panic!("unknown serde attribute {other} on {name}: update this test"),
                }
            }
            assert!(
                untagged || serde_attrs.iter().any(|a| a.contains("snake_case")),
                "enum {name} is neither untagged nor snake_case: update this test"
            );
            let mut variants = Vec::new();
            for l in lines.by_ref() {
                if l == "}" {
                    break;
                }
                if l.starts_with("//") || l.starts_with("#[") || l.is_empty() {
                    continue;
                }
                let v: String = l
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                variants.push(if untagged {
                    l.trim_end_matches(',').to_string()
                } else {
                    snake(&v)
                });
            }
            out.insert(name, Record::Enum { variants, untagged });
        }
    }
    assert!(
        out.len() >= 20,
        "found only {} records in api/src/types.rs",
        out.len()
    );
    out
}

fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The schema name of a record.
fn schema_name(record: &str) -> &str {
    match record {
        "ErrorBody" => "Error",
        other => other,
    }
}

/// What a field's schema must look like for its Rust type.
fn check_field_schema(at: &str, ty: &str, s: &Value) {
    let (ty, nullable) = match ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
        Some(inner) => (inner, true),
        None => (ty, false),
    };
    let json_type = match ty {
        "u64" | "u32" | "u8" => Some("integer"),
        "String" => Some("string"),
        "bool" => Some("boolean"),
        _ => None,
    };
    match (
        json_type,
        ty.strip_prefix("Vec<").and_then(|t| t.strip_suffix('>')),
    ) {
        (Some(t), _) => {
            let want = if nullable {
                json!([t, "null"])
            } else {
                json!(t)
            };
            assert_eq!(s["type"], want, "{at}: type of {ty}");
            if t == "integer" {
                assert_eq!(
                    s["minimum"].as_u64().map(|m| m <= 1),
                    Some(true),
                    "{at}: unsigned minimum"
                );
            }
        }
        (None, Some("String")) => {
            assert!(!nullable, "{at}: Option<Vec> is not handled");
            assert_eq!(s["type"], "array", "{at}");
            assert_eq!(s["items"]["type"], "string", "{at}");
        }
        (None, Some(item)) => {
            assert!(!nullable, "{at}: Option<Vec> is not handled");
            assert_eq!(s["type"], "array", "{at}");
            assert_eq!(
                s["items"]["$ref"],
                format!("#/components/schemas/{}", schema_name(item)),
                "{at}"
            );
        }
        (None, None) => {
            assert!(!nullable, "{at}: Option<{ty}> is not handled");
            assert_eq!(
                s["$ref"],
                format!("#/components/schemas/{}", schema_name(ty)),
                "{at}"
            );
        }
    }
}

#[test]
fn schemas_have_exactly_the_fields_of_the_api_records() {
    let doc = doc();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for (name, record) in api_records() {
        let sname = schema_name(&name);
        let s = schemas.get(sname).unwrap_or_else(|| {
            panic!("no schema {sname} for keel_api::{name} in controller/openapi.json")
        });
        match record {
            Record::Struct { fields, strict } => {
                assert_eq!(s["type"], "object", "{sname}");
                let props = s["properties"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{sname}: properties"));
                let want: BTreeSet<&str> = fields.iter().map(|f| f.name.as_str()).collect();
                let have: BTreeSet<&str> = props.keys().map(String::as_str).collect();
                assert_eq!(
                    have, want,
                    "{sname}: properties differ from keel_api::{name}'s fields"
                );
                if strict {
                    assert_eq!(
                        s.get("additionalProperties"),
                        Some(&json!(false)),
                        "{sname}: keel_api::{name} refuses unknown fields (deny_unknown_fields)"
                    );
                } else {
                    assert_ne!(
                        s.get("additionalProperties"),
                        Some(&json!(false)),
                        "{sname}: serde ignores unknown fields, and v1 records may gain fields"
                    );
                }
                let want_req: BTreeSet<&str> = fields
                    .iter()
                    .filter(|f| !f.default && !f.ty.starts_with("Option<"))
                    .map(|f| f.name.as_str())
                    .collect();
                let have_req: BTreeSet<&str> = s["required"]
                    .as_array()
                    .map(|r| {
                        r.iter()
                            .map(|x| x.as_str().expect("required name"))
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(
                    have_req, want_req,
                    "{sname}: required differs from keel_api::{name}"
                );
                for f in &fields {
                    check_field_schema(&format!("{sname}.{}", f.name), &f.ty, &props[&f.name]);
                }
            }
            Record::Enum {
                variants,
                untagged: false,
            } => {
                assert_eq!(s["type"], "string", "{sname}");
                assert_eq!(
                    s["enum"],
                    json!(variants),
                    "{sname}: values differ from keel_api::{name}"
                );
            }
            Record::Enum {
                variants,
                untagged: true,
            } => {
                assert_eq!(name, "SizeInput", "untagged enum {name}: update this test");
                assert_eq!(
                    variants,
                    ["Bytes(u64)", "Human(String)"],
                    "SizeInput changed"
                );
                let types: Vec<&Value> = s["oneOf"]
                    .as_array()
                    .expect("SizeInput oneOf")
                    .iter()
                    .map(|x| &x["type"])
                    .collect();
                assert_eq!(
                    types,
                    [&json!("integer"), &json!("string")],
                    "SizeInput oneOf"
                );
            }
        }
    }
}

// ----- the Python validators -----

fn require_python_module(module: &str, package: &str) {
    let out = Command::new(PYTHON)
        .args(["-c", &format!("import {module}")])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {PYTHON} ({e}): it and the Python package {package} are needed; run scripts/deps.sh")
        });
    assert!(
        out.status.success(),
        "the Python package {package} is not installed for {PYTHON}: run scripts/deps.sh\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run python");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if text.len() > 8000 {
        let mut cut = 8000;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[...]");
    }
    (out.status.success(), text)
}

#[test]
fn openapi_spec_validator_accepts_the_document() {
    require_python_module("openapi_spec_validator", "openapi-spec-validator");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, DOCUMENT).expect("write the document");
    let (ok, out) = run(Command::new(PYTHON)
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&file));
    assert!(
        ok,
        "openapi-spec-validator rejects controller/openapi.json:\n{out}"
    );

    // The validator does catch mistakes: a dangling $ref is refused.
    let mut broken = doc();
    broken["paths"]["/v1/health"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"] = json!({ "$ref": "#/components/schemas/NoSuchSchema" });
    let bad = dir.path().join("broken.json");
    std::fs::write(&bad, broken.to_string()).expect("write");
    let (ok, out) = run(Command::new(PYTHON)
        .args(["-m", "openapi_spec_validator"])
        .arg(&bad));
    assert!(
        !ok,
        "openapi-spec-validator accepted a dangling $ref:\n{out}"
    );
}

/// Validates instances against the document's component schemas with the OpenAPI 3.1
/// dialect (openapi-schema-validator, installed with openapi-spec-validator).
const CHECK_INSTANCES: &str = r##"
import json, sys
from openapi_schema_validator import OAS31Validator
doc = json.load(open(sys.argv[1]))
cases = json.load(open(sys.argv[2]))
failed = 0
for c in cases:
    schema = dict(doc)
    schema["$ref"] = "#/components/schemas/" + c["schema"]
    errors = [e.message for e in OAS31Validator(schema).iter_errors(c["instance"])]
    if bool(errors) == c["valid"]:
        failed += 1
        want = "valid" if c["valid"] else "invalid"
        print(f"{c['schema']}: expected {want}: {json.dumps(c['instance'])}: {errors}")
print(f"{len(cases) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
"##;

fn case<T: Serialize>(schema: &str, v: &T) -> Value {
    json!({ "schema": schema, "instance": serde_json::to_value(v).expect("serialize"), "valid": true })
}

fn raw(schema: &str, instance: Value, valid: bool) -> Value {
    json!({ "schema": schema, "instance": instance, "valid": valid })
}

fn sample_cases() -> Vec<Value> {
    let counters = ServerCounters {
        reads: 1,
        writes: 2,
        bytes_read: 4096,
        bytes_written: 8192,
        errors: 0,
    };
    let volume = VolumeInfo {
        id: "8f3a0c1d2e4b5a69".into(),
        name: Some("data1".into()),
        size: 10 << 30,
        replicas: 1,
        block_size: 512,
        state: VolumeState::Attached,
        epoch: 3,
        copies: vec![CopyInfo {
            server: "s1".into(),
            address: "127.0.0.1:7000".into(),
            role: "primary".into(),
            rebuild_percent: None,
            state: "ok".into(),
            fault: None,
        }],
        attachments: vec![AttachmentInfo {
            node: "n1".into(),
            instance: "vm1".into(),
            mode: "read_write".into(),
            socket: "/run/keel/vm1-8f3a0c1d2e4b5a69.sock".into(),
            epoch: 3,
            connected: true,
            ready: true,
            attached_at_unix: 1_700_000_000,
        }],
        created_at_unix: 1_700_000_000,
    };
    let mut cases = vec![
        case(
            "HealthInfo",
            &HealthInfo {
                status: "ok".into(),
                revision: 7,
            },
        ),
        case(
            "ServerRegistration",
            &ServerRegistration {
                id: "s1".into(),
                address: "127.0.0.1:7000".into(),
                zone: "a".into(),
                capacity_bytes: 1 << 40,
            },
        ),
        case(
            "ServerHeartbeat",
            &ServerHeartbeat {
                used_bytes: 1 << 30,
                copies: vec![CopyReport {
                    volume: "8f3a0c1d2e4b5a69".into(),
                    size: 1 << 30,
                    epoch: 1,
                    role: "primary".into(),
                    access_crc32c: Some(0x1c2d_3e4f),
                    fault: None,
                }],
                counters: counters.clone(),
                rebuilds: vec![keel_api::RebuildReport {
                    volume: "8f3a0c1d2e4b5a69".into(),
                    mirror: "127.0.0.1:7001".into(),
                    copied: 1 << 20,
                    total: 1 << 30,
                }],
            },
        ),
        case(
            "ServerInfo",
            &ServerInfo {
                id: "s1".into(),
                address: "127.0.0.1:7000".into(),
                zone: String::new(),
                capacity_bytes: 1 << 40,
                allocated_bytes: 1 << 30,
                used_bytes: 1 << 30,
                copies: 1,
                health: Health::Down,
                last_seen_ms_ago: u64::MAX,
                counters,
            },
        ),
        case(
            "NodeRegistration",
            &NodeRegistration {
                id: "n1".into(),
                socket_dir: "/run/keel".into(),
            },
        ),
        case(
            "NodeHeartbeat",
            &NodeHeartbeat {
                attachments: vec![AttachmentReport {
                    volume: "8f3a0c1d2e4b5a69".into(),
                    instance: "vm1".into(),
                    connected: false,
                    listening: true,
                }],
                version: Some(12),
            },
        ),
        case(
            "NodeInfo",
            &NodeInfo {
                id: "n1".into(),
                socket_dir: "/run/keel".into(),
                health: Health::Up,
                last_seen_ms_ago: 12,
                attachments: 1,
            },
        ),
        case(
            "CreateVolume",
            &CreateVolume {
                size: SizeInput::Human("10GiB".into()),
                replicas: Some(1),
                name: Some("data1".into()),
                block_size: Some(4096),
            },
        ),
        case(
            "CreateVolume",
            &CreateVolume {
                size: SizeInput::Bytes(1 << 30),
                replicas: None,
                name: None,
                block_size: None,
            },
        ),
        case(
            "ResizeVolume",
            &ResizeVolume {
                size: SizeInput::Human("20 GiB".into()),
            },
        ),
        case(
            "AttachVolume",
            &AttachVolume {
                node: "n1".into(),
                instance: "vm1".into(),
                read_only: false,
                force: true,
            },
        ),
        case(
            "DetachVolume",
            &DetachVolume {
                node: "n1".into(),
                instance: "vm1".into(),
                force: false,
            },
        ),
        case("VolumeInfo", &volume),
        case(
            "VolumeInfo",
            &VolumeInfo {
                name: None,
                state: VolumeState::Creating,
                copies: vec![],
                attachments: vec![],
                ..volume.clone()
            },
        ),
        case(
            "NodeAttachments",
            &NodeAttachments {
                version: 9,
                attachments: vec![NodeAttachment {
                    volume: "8f3a0c1d2e4b5a69".into(),
                    instance: "vm1".into(),
                    socket: "/run/keel/vm1-8f3a0c1d2e4b5a69.sock".into(),
                    read_only: false,
                    epoch: 3,
                    size: 10 << 30,
                    server: "127.0.0.1:7000".into(),
                    block_size: 512,
                }],
            },
        ),
        case(
            "Error",
            &ErrorBody {
                code: "not_found".into(),
                message: "volume x not found".into(),
            },
        ),
        case(
            "DeleteResult",
            &DeleteResult {
                id: "8f3a0c1d2e4b5a69".into(),
                complete: false,
            },
        ),
        case(
            "PrimaryUnreachable",
            &keel_api::PrimaryUnreachable {
                server: "127.0.0.1:7000".into(),
                epoch: 4,
                unanswered_ms: 1000,
            },
        ),
        case(
            "PrimaryReport",
            &keel_api::PrimaryReport {
                outcome: "promoted".into(),
                epoch: 5,
                primary: Some("127.0.0.1:7001".into()),
            },
        ),
        case(
            "PrimaryReport",
            &keel_api::PrimaryReport {
                outcome: "no_in_sync_mirror".into(),
                epoch: 4,
                primary: None,
            },
        ),
        raw(
            "PrimaryReport",
            json!({ "outcome": "maybe", "epoch": 1, "primary": null }),
            false,
        ),
        raw(
            "PrimaryUnreachable",
            json!({ "server": "127.0.0.1:1" }),
            false,
        ),
        case(
            "HeartbeatAnswer",
            &HeartbeatAnswer {
                crl_number: Some(3),
            },
        ),
        case("HeartbeatAnswer", &HeartbeatAnswer { crl_number: None }),
        case(
            "CrlInfo",
            &CrlInfo {
                number: 2,
                revoked: vec!["3f2a".into(), "0a1b2c".into()],
                this_update: 1_700_000_000,
                pem: "-----BEGIN X509 CRL-----\n...\n-----END X509 CRL-----\n".into(),
            },
        ),
        raw(
            "CrlInfo",
            json!({ "number": 1, "revoked": ["XYZ"], "this_update": 0, "pem": "" }),
            false,
        ),
        // An older controller's heartbeat answer, `{}`, is still a valid answer.
        raw("HeartbeatAnswer", json!({}), true),
        // Requests as people write them: defaults left out.
        raw("CreateVolume", json!({ "size": "1GiB" }), true),
        raw(
            "CreateVolume",
            json!({ "size": 512, "block_size": 4096 }),
            true,
        ),
        raw(
            "CreateVolume",
            json!({ "size": 512, "block_size": 512 }),
            true,
        ),
        raw(
            "AttachVolume",
            json!({ "node": "n1", "instance": "vm1" }),
            true,
        ),
        raw(
            "ServerRegistration",
            json!({ "id": "s1", "address": "127.0.0.1:7000", "capacity_bytes": 1 }),
            true,
        ),
        raw(
            "ServerHeartbeat",
            json!({ "used_bytes": 0, "copies": [] }),
            true,
        ),
        // And what the schemas must refuse, so the check above is not vacuous.
        raw("CreateVolume", json!({ "size": true }), false),
        raw("CreateVolume", json!({ "replicas": 1 }), false),
        raw(
            "CreateVolume",
            json!({ "size": 512, "block_size": 1024 }),
            false,
        ),
        raw(
            "CreateVolume",
            json!({ "size": 512, "block_size": "4k" }),
            false,
        ),
        raw("CreateVolume", json!({ "size": 1000 }), false),
        raw("CreateVolume", json!({ "size": "ten gigs" }), false),
        raw("AttachVolume", json!({ "node": "n1" }), false),
        raw("VolumeInfo", json!({ "id": "8f3a0c1d2e4b5a69" }), false),
        raw(
            "NodeInfo",
            json!({ "id": "n1", "socket_dir": "/x", "health": "sideways", "last_seen_ms_ago": 0, "attachments": 0 }),
            false,
        ),
        raw("HeartbeatAnswer", json!({ "crl_number": -1 }), false),
        raw("Error", json!({ "code": "not_found" }), false),
        // Request bodies are objects; the operator requests refuse unknown fields.
        raw("CreateVolume", json!(["1GiB"]), false),
        raw("CreateVolume", json!({ "size": 1024, "replica": 1 }), false),
        raw(
            "AttachVolume",
            json!({ "node": "n1", "instance": "vm1", "forced": true }),
            false,
        ),
    ];
    // The volume name rule: the document's pattern accepts exactly the names the server does.
    let long = "n".repeat(65);
    for n in [
        "data1",
        "race-2",
        "volume-1",
        "x",
        "beef.",
        "cafe_",
        "deadbeef",
        "DEADBEEF",
        "0",
        "8453725b2d48d218",
        "vol-8453725b2d48d218",
        "VOL-x",
        "vol-data",
        "a b",
        "",
        long.as_str(),
    ] {
        let valid = keel_controller::model::volume_name_problem(n).is_none();
        cases.push(raw(
            "CreateVolume",
            json!({ "size": 1024, "name": n }),
            valid,
        ));
    }
    for state in [VolumeState::Available, VolumeState::Deleting] {
        cases.push(case(
            "VolumeInfo",
            &VolumeInfo {
                state,
                ..volume.clone()
            },
        ));
    }
    cases
}

#[test]
fn serialized_records_validate_against_their_schemas() {
    require_python_module("openapi_schema_validator", "openapi-spec-validator");
    let dir = tempfile::tempdir().expect("tempdir");
    let doc_file = dir.path().join("openapi.json");
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&doc_file, DOCUMENT).expect("write");
    std::fs::write(&cases_file, Value::Array(sample_cases()).to_string()).expect("write");
    let (ok, out) = run(Command::new(PYTHON)
        .args(["-c", CHECK_INSTANCES])
        .arg(&doc_file)
        .arg(&cases_file));
    assert!(ok, "records and schemas disagree:\n{out}");
}

/// The server reads request bodies as the document says: objects only (serde would otherwise
/// read a struct from an array of its fields), unknown fields refused in operator requests and
/// ignored in the daemons' reports.
#[test]
fn request_bodies_must_be_objects() {
    let err = serde_json::from_str::<CreateVolume>(r#"["1GiB", 1, "x"]"#)
        .expect_err("an array is not a create")
        .to_string();
    assert!(err.contains("expected a JSON object"), "{err}");
    let err = serde_json::from_str::<CreateVolume>(r#"{"size": "1GiB", "replica": 1}"#)
        .expect_err("unknown field")
        .to_string();
    assert!(err.contains("unknown field `replica`"), "{err}");
    assert!(serde_json::from_str::<CreateVolume>(r#""1GiB""#).is_err());
    assert!(serde_json::from_str::<AttachVolume>(r#"["n1", "vm1"]"#).is_err());
    assert!(serde_json::from_str::<MirrorFailed>(r#"["127.0.0.1:1", 1]"#).is_err());
    let ok: CreateVolume =
        serde_json::from_str(r#"{"size": "1GiB", "name": "data1"}"#).expect("object");
    assert_eq!(ok.name.as_deref(), Some("data1"));
    let hb: ServerHeartbeat =
        serde_json::from_str(r#"{"used_bytes": 0, "copies": [], "future": 1}"#)
            .expect("daemons' reports may gain fields");
    assert_eq!(hb.used_bytes, 0);
    let round = serde_json::to_value(&ok).expect("serialize");
    assert_eq!(round["name"], "data1");
}
