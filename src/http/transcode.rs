//! HTTP request → protobuf request message, and protobuf response → JSON, by proto3's
//! canonical JSON mapping (prost-reflect's). The request is assembled as one JSON object
//! (the body as the rule maps it, then query parameters, then path variables) and
//! deserialized once, so every field, wherever it came from, is checked by the same rules:
//! unknown fields and wrong types are refused.
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions,
};
use serde_json::{Map, Value};

use super::error::Rejection;
use super::routes::{BodyMapping, Bound, Route};

/// The request message of `route` from the parts of an HTTP request.
pub fn request(
    route: &Route,
    bound: Bound,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, Rejection> {
    let input = route.rpc.input();
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice::<Value>(body)
                .map_err(|e| Rejection::malformed(format!("the body is not JSON: {e}"), None))?,
        )
    };
    let mut root = match (&route.body, body) {
        (BodyMapping::None, Some(_)) => {
            return Err(Rejection::malformed(
                format!("{} {} takes no body", route.method, route.template),
                None,
            ));
        }
        (_, None) => Map::new(),
        (BodyMapping::Whole, Some(Value::Object(fields))) => fields,
        (BodyMapping::Whole, Some(_)) => {
            return Err(Rejection::malformed(
                "the body must be a JSON object".into(),
                None,
            ));
        }
        (BodyMapping::Field(name), Some(value)) => {
            let json_name = input
                .get_field_by_name(name)
                .map_or_else(|| name.clone(), |f| f.json_name().to_owned());
            Map::from_iter([(json_name, value)])
        }
    };

    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if route.body == BodyMapping::Whole {
            return Err(Rejection::malformed(
                format!(
                    "{} {} takes its fields in the body, not the query",
                    route.method, route.template
                ),
                Some(&key),
            ));
        }
        let (path, field) = resolve(&input, &key).ok_or_else(|| {
            Rejection::malformed(format!("unknown query parameter {key}"), Some(&key))
        })?;
        if let BodyMapping::Field(body) = &route.body
            && field_is_under(&input, &key, body)
        {
            return Err(Rejection::malformed(
                format!("{key} belongs in the body"),
                Some(&key),
            ));
        }
        let value = query_value(&field, &value).map_err(|why| {
            Rejection::malformed(format!("query parameter {key}: {why}"), Some(&key))
        })?;
        insert(&mut root, &path, value, field.is_list()).map_err(|why| {
            Rejection::malformed(format!("query parameter {key}: {why}"), Some(&key))
        })?;
    }

    // Last: the path names the resource, whatever the body says.
    for (field_path, value) in bound {
        let joined = field_path.join(".");
        let json_path = json_names(&input, &field_path)
            .ok_or_else(|| Rejection::malformed(format!("unknown path field {joined}"), None))?;
        insert_overwriting(&mut root, &json_path, Value::String(value))
            .map_err(|why| Rejection::malformed(why, Some(&joined)))?;
    }

    DynamicMessage::deserialize_with_options(
        input,
        Value::Object(root),
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| Rejection::malformed(format!("invalid request: {}", redact(&e.to_string())), None))
}

/// A deserializer's message without the strings it quotes (`invalid type: string "…"`):
/// the value may be a secret sent in the wrong field, and errors are logged.
fn redact(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(QUOTED) {
        out.push_str(&rest[..start]);
        out.push_str("a string");
        let after = &rest[start + QUOTED.len()..];
        // The closing quote: the first one not escaped.
        let mut escaped = false;
        let end = after.char_indices().find_map(|(i, c)| match (c, escaped) {
            ('\\', false) => {
                escaped = true;
                None
            }
            ('"', false) => Some(i + 1),
            _ => {
                escaped = false;
                None
            }
        });
        rest = end.map_or("", |end| &after[end..]);
    }
    out.push_str(rest);
    out
}

/// The JSON of a response message.
pub fn response(output: MessageDescriptor, message: &[u8]) -> Option<Vec<u8>> {
    let message = DynamicMessage::decode(output, message).ok()?;
    let mut serializer = serde_json::Serializer::new(Vec::new());
    message
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .ok()?;
    Some(serializer.into_inner())
}

/// The field a query key names (dotted, each part its JSON or proto name), and the path
/// to it in JSON names.
fn resolve(message: &MessageDescriptor, key: &str) -> Option<(Vec<String>, FieldDescriptor)> {
    let mut message = message.clone();
    let mut path = Vec::new();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = message
            .get_field_by_json_name(part)
            .or_else(|| message.get_field_by_name(part))?;
        path.push(field.json_name().to_owned());
        if parts.peek().is_none() {
            return Some((path, field));
        }
        if field.is_list() || field.is_map() {
            return None;
        }
        message = field.kind().as_message()?.clone();
    }
    None
}

/// Whether the query key's top-level field is the body field.
fn field_is_under(message: &MessageDescriptor, key: &str, body: &str) -> bool {
    let top = key.split('.').next().unwrap_or_default();
    message
        .get_field_by_json_name(top)
        .or_else(|| message.get_field_by_name(top))
        .is_some_and(|f| f.name() == body)
}

/// The JSON names of a path of proto field names.
fn json_names(message: &MessageDescriptor, path: &[String]) -> Option<Vec<String>> {
    let mut message = message.clone();
    let mut names = Vec::with_capacity(path.len());
    for (i, name) in path.iter().enumerate() {
        let field = message.get_field_by_name(name)?;
        names.push(field.json_name().to_owned());
        if i + 1 < path.len() {
            message = field.kind().as_message()?.clone();
        }
    }
    Some(names)
}

/// The JSON a query parameter's text stands for in `field`. Numbers stay strings, which
/// proto3 JSON accepts for every numeric type; booleans must be `true` or `false`;
/// messages only if their JSON form is a string or a scalar (well-known types).
fn query_value(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let boolean = || match text {
        "true" => Ok(Value::Bool(true)),
        "false" => Ok(Value::Bool(false)),
        _ => Err("must be true or false".to_owned()),
    };
    match field.kind() {
        Kind::Bool => boolean(),
        Kind::Message(message) => match message.full_name() {
            "google.protobuf.BoolValue" => boolean(),
            "google.protobuf.FieldMask"
            | "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue" => Ok(Value::String(text.to_owned())),
            _ => Err("is a message: it cannot be a query parameter".to_owned()),
        },
        _ => Ok(Value::String(text.to_owned())),
    }
}

/// The object at `parents` in `root`, created as needed.
fn object_at<'a>(
    root: &'a mut Map<String, Value>,
    parents: &[String],
) -> Result<&'a mut Map<String, Value>, String> {
    let mut object = root;
    for name in parents {
        object = match object
            .entry(name.clone())
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(inner) => inner,
            _ => return Err(format!("{name} is not an object")),
        };
    }
    Ok(object)
}

/// Sets a query parameter: a repeated field gathers its values, a singular one is given
/// once.
fn insert(
    root: &mut Map<String, Value>,
    path: &[String],
    value: Value,
    repeated: bool,
) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty field path".into());
    };
    let object = object_at(root, parents)?;
    match (object.get_mut(last), repeated) {
        (None, true) => {
            object.insert(last.clone(), Value::Array(vec![value]));
        }
        (None, false) => {
            object.insert(last.clone(), value);
        }
        (Some(Value::Array(values)), true) => values.push(value),
        (Some(_), _) => return Err("given more than once".into()),
    }
    Ok(())
}

/// Sets a path variable, over whatever the body or query said.
fn insert_overwriting(
    root: &mut Map<String, Value>,
    path: &[String],
    value: Value,
) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty field path".into());
    };
    object_at(root, parents)?.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::super::routes::{Matched, Routes};
    use super::*;

    fn transcode(method: Method, path: &str, body: &str) -> Result<Value, String> {
        let pool = super::super::descriptors::pool().unwrap();
        let routes = Routes::from_pool(&pool).unwrap();
        let (path, query) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        let Matched::Route(route, bound) = routes.find(&method, path) else {
            panic!("no route for {path}");
        };
        let message = request(route, bound, query, body.as_bytes())
            .map_err(|r| r.status.message().to_owned())?;
        Ok(serde_json::to_value(&message).unwrap())
    }

    #[test]
    fn path_query_and_body_fill_one_request() {
        let json = transcode(
            Method::PATCH,
            "/v1/workspaces/w1?updateMask=name,company&etag=e",
            r#"{"name": "n", "id": "ignored"}"#,
        )
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "workspace": {"id": "w1", "name": "n"},
                "updateMask": "name,company",
                "etag": "e"
            })
        );
        let json = transcode(
            Method::GET,
            "/v1/apiKeys?pageSize=5&workspace_id=w&pageToken=t",
            "",
        )
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"pageSize": 5, "workspaceId": "w", "pageToken": "t"})
        );
        let json = transcode(Method::DELETE, "/v1/scopes/s?force=true", "").unwrap();
        assert_eq!(json, serde_json::json!({"id": "s", "force": true}));
    }

    #[test]
    fn quoted_values_are_left_out_of_errors() {
        assert_eq!(
            redact(r#"invalid type: string "kp_s\"ecret", expected a list at x"#),
            "invalid type: a string, expected a list at x"
        );
        assert_eq!(redact("unknown field `a`"), "unknown field `a`");
        assert_eq!(redact(r#"string "open"#), "a string");
        let message = transcode(
            Method::POST,
            "/v1/apiKeys:verify",
            r#"{"requiredScopes": "kp_secret_value"}"#,
        )
        .unwrap_err();
        assert!(!message.contains("kp_secret_value"), "{message}");
    }

    #[test]
    fn malformed_input_is_refused() {
        let refused = |method, path, body| transcode(method, path, body).unwrap_err();
        assert!(refused(Method::POST, "/v1/workspaces", "{").contains("not JSON"));
        assert!(refused(Method::POST, "/v1/workspaces", r#"{"nope": 1}"#).contains("nope"));
        assert!(refused(Method::POST, "/v1/workspaces", r#"{"name": 1}"#).contains("invalid"));
        assert!(refused(Method::POST, "/v1/workspaces", "[]").contains("object"));
        assert!(refused(Method::GET, "/v1/apiKeys?nope=1", "").contains("nope"));
        assert!(refused(Method::GET, "/v1/apiKeys?pageSize=x", "").contains("invalid"));
        assert!(
            refused(Method::GET, "/v1/apiKeys?pageSize=1&pageSize=2", "")
                .contains("more than once")
        );
        assert!(refused(Method::DELETE, "/v1/scopes/s?force=yes", "").contains("true or false"));
        assert!(refused(Method::GET, "/v1/apiKeys/k", "{}").contains("no body"));
        assert!(refused(Method::POST, "/v1/workspaces?name=x", "{}").contains("body"));
        assert!(refused(Method::PATCH, "/v1/workspaces/w?workspace.name=x", "{}").contains("body"));
    }
}
