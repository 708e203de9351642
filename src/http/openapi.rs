//! The OpenAPI 3.1 document of the HTTP/JSON API, generated from the same descriptors and
//! routes the server transcodes with (paths from the `google.api.http` rules, schemas from
//! the messages under their JSON names, descriptions from the proto comments), so it
//! cannot describe an API the server does not serve. `keyplane openapi` prints it;
//! `docs/openapi.json` is a copy that a test keeps current.
use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value, json};

use super::routes::{BodyMapping, Route, Routes, Segment};

const SCHEMAS: &str = "#/components/schemas/";

/// The document, as pretty JSON with a final newline.
pub fn document(routes: &Routes) -> anyhow::Result<Vec<u8>> {
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut pending = Vec::new();
    for route in routes.iter() {
        paths.entry(route.template.clone()).or_default().insert(
            route.method.as_str().to_ascii_lowercase(),
            operation(route, &mut pending),
        );
    }
    let mut schemas = Map::new();
    while let Some(message) = pending.pop() {
        if schemas.contains_key(message.full_name()) {
            continue;
        }
        let schema = message_schema(&message, &mut pending);
        schemas.insert(message.full_name().to_owned(), schema);
    }
    schemas.insert("Error".into(), error_schema());
    let schemas: BTreeMap<String, Value> = schemas.into_iter().collect();
    let document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "keyplane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "keyplane's HTTP/JSON API: every RPC of keyplane.v1 at the path of \
                its google.api.http rule, with proto3's canonical JSON mapping. The same port \
                serves gRPC and gRPC-Web. Generated from the protos: do not edit.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
            "parameters": {
                "tenant": {
                    "name": "x-tenant-id",
                    "in": "header",
                    "required": false,
                    "description": "The tenant to act for: required with a platform token, \
                        optional otherwise (it must then be the credential's own).",
                    "schema": {"type": "string", "format": "uuid"},
                },
                "requestId": {
                    "name": "x-request-id",
                    "in": "header",
                    "required": false,
                    "description": "A request id to log and audit the call under; echoed \
                        in the answer's x-request-id (the server gives one otherwise).",
                    "schema": {"type": "string", "maxLength": 128},
                },
            },
            "schemas": schemas,
        },
    });
    let mut bytes = serde_json::to_vec_pretty(&document)?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn operation(route: &Route, pending: &mut Vec<MessageDescriptor>) -> Value {
    let rpc = &route.rpc;
    let input = rpc.input();
    let mut parameters = Vec::new();
    let mut in_path = Vec::new();
    for segment in &route.segments {
        if let Segment::Field(path) = segment {
            in_path.push(path[0].clone());
            parameters.push(json!({
                "name": path.join("."),
                "in": "path",
                "required": true,
                "schema": {"type": "string"},
            }));
        }
    }
    let body_field = match &route.body {
        BodyMapping::Whole => None,
        BodyMapping::Field(name) => Some(name.as_str()),
        BodyMapping::None => Some(""),
    };
    // Every top-level field the path and the body leave is a query parameter.
    if let Some(body_field) = body_field {
        for field in input.fields() {
            if field.name() == body_field || in_path.iter().any(|p| p == field.name()) {
                continue;
            }
            if let Some(schema) = query_schema(&field) {
                let mut parameter = json!({
                    "name": field.json_name(),
                    "in": "query",
                    "required": false,
                    "schema": schema,
                });
                if let Some(text) =
                    comments(field.parent_file().file_descriptor_proto(), field.path())
                {
                    parameter["description"] = Value::String(text);
                }
                parameters.push(parameter);
            }
        }
    }
    parameters.push(json!({"$ref": "#/components/parameters/tenant"}));
    parameters.push(json!({"$ref": "#/components/parameters/requestId"}));

    let mut operation = json!({
        "operationId": format!("{}_{}", rpc.parent_service().name(), rpc.name()),
        "tags": [rpc.parent_service().name()],
        "summary": rpc.name(),
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": reference(&rpc.output(), pending)}},
            },
            "default": {
                "description": "An error: the HTTP status of its gRPC code, Google's error body.",
                "content": {"application/json": {"schema": {"$ref": format!("{SCHEMAS}Error")}}},
            },
        },
    });
    if let Some(text) = comments(rpc.parent_file().file_descriptor_proto(), rpc.path()) {
        operation["description"] = Value::String(text);
    }
    let body_schema = match &route.body {
        BodyMapping::None => None,
        BodyMapping::Whole => Some(reference(&input, pending)),
        BodyMapping::Field(name) => input
            .get_field_by_name(name)
            .map(|field| field_schema(&field, pending)),
    };
    if let Some(schema) = body_schema {
        operation["requestBody"] = json!({
            "required": route.body != BodyMapping::Whole,
            "content": {"application/json": {"schema": schema}},
        });
    }
    operation
}

/// The schema of a field that can be a query parameter; `None` for one that cannot.
fn query_schema(field: &FieldDescriptor) -> Option<Value> {
    if field.is_map() {
        return None;
    }
    let scalar = match field.kind() {
        Kind::Message(message) => well_known(&message)?,
        kind => kind_schema(&kind, &mut Vec::new()),
    };
    Some(if field.is_list() {
        json!({"type": "array", "items": scalar})
    } else {
        scalar
    })
}

fn reference(message: &MessageDescriptor, pending: &mut Vec<MessageDescriptor>) -> Value {
    if let Some(schema) = well_known(message) {
        return schema;
    }
    pending.push(message.clone());
    json!({"$ref": format!("{SCHEMAS}{}", message.full_name())})
}

fn message_schema(message: &MessageDescriptor, pending: &mut Vec<MessageDescriptor>) -> Value {
    let mut properties = Map::new();
    for field in message.fields() {
        properties.insert(field.json_name().to_owned(), field_schema(&field, pending));
    }
    let mut schema = json!({"type": "object", "properties": properties});
    if let Some(text) = comments(
        message.parent_file().file_descriptor_proto(),
        message.path(),
    ) {
        schema["description"] = Value::String(text);
    }
    schema
}

fn field_schema(field: &FieldDescriptor, pending: &mut Vec<MessageDescriptor>) -> Value {
    let mut schema = if field.is_map() {
        let value = field
            .kind()
            .as_message()
            .and_then(|entry| entry.get_field_by_name("value"))
            .map_or_else(|| json!({}), |value| field_schema(&value, pending));
        json!({"type": "object", "additionalProperties": value})
    } else if field.is_list() {
        json!({"type": "array", "items": kind_schema(&field.kind(), pending)})
    } else {
        kind_schema(&field.kind(), pending)
    };
    if let Some(text) = comments(field.parent_file().file_descriptor_proto(), field.path())
        && let Value::Object(object) = &mut schema
        && !object.contains_key("$ref")
    {
        object.insert("description".into(), Value::String(text));
    }
    schema
}

fn kind_schema(kind: &Kind, pending: &mut Vec<MessageDescriptor>) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "minimum": 0}),
        // proto3 JSON writes 64-bit integers as strings (and reads either).
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({"type": "string", "format": "int64"}),
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Enum(e) => json!({
            "type": "string",
            "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>(),
        }),
        Kind::Message(message) => reference(message, pending),
    }
}

/// The JSON form of the well-known types keyplane uses, which are not objects.
fn well_known(message: &MessageDescriptor) -> Option<Value> {
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$", "examples": ["3600s"]})
        }
        "google.protobuf.FieldMask" => {
            json!({"type": "string", "description": "Field paths, comma-separated.", "examples": ["name,description"]})
        }
        "google.protobuf.Struct" => json!({"type": "object"}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.Empty" => json!({"type": "object"}),
        _ => return None,
    })
}

/// Google's JSON error body.
fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "Google's JSON error body (AIP-193).",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "description": "The HTTP status."},
                    "message": {"type": "string"},
                    "status": {"type": "string", "description": "The gRPC code's name, e.g. INVALID_ARGUMENT."},
                    "details": {
                        "type": "array",
                        "description": "google.rpc.ErrorInfo, google.rpc.BadRequest, ... each with its @type.",
                        "items": {
                            "type": "object",
                            "properties": {"@type": {"type": "string"}},
                            "required": ["@type"],
                        },
                    },
                },
                "required": ["code", "message", "status"],
            },
        },
        "required": ["error"],
    })
}

/// The leading comment of the element at `path` in `file`, one paragraph.
fn comments(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let location = file
        .source_code_info
        .as_ref()?
        .location
        .iter()
        .find(|l| l.path == path)?;
    let text = location
        .leading_comments
        .as_deref()?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    (!text.is_empty()).then_some(text)
}
