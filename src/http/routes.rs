//! The HTTP routes, read from the `google.api.http` options of the compiled descriptors:
//! one per binding (a rule and its `additional_bindings`), with nothing written per RPC,
//! so an RPC annotated in the protos is served over HTTP by the next build.
use http::Method;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

/// The package whose services are served over HTTP.
const PACKAGE: &str = "keyplane.v1";

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{field.path}`: one path segment bound to a (possibly nested) request field,
    /// by proto field names.
    Field(Vec<String>),
}

/// Where the request body goes (the rule's `body`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyMapping {
    /// No body: every field not in the path is a query parameter.
    None,
    /// `*`: the body is the request message; nothing is left for the query.
    Whole,
    /// The body is this top-level field; other fields are query parameters.
    Field(String),
}

/// One HTTP binding of an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    /// The template as written in the proto, e.g. `/v1/apiKeys/{id}:rotate`.
    pub template: String,
    pub segments: Vec<Segment>,
    /// A custom method's verb (`rotate` in `…/{id}:rotate`).
    pub verb: Option<String>,
    pub body: BodyMapping,
    pub rpc: MethodDescriptor,
    /// The gRPC path the request is transcoded to, `/keyplane.v1.Service/Method`.
    pub grpc_uri: http::Uri,
}

/// A path variable as it matched: the field path and the decoded segment.
pub type Bound = Vec<(Vec<String>, String)>;

impl Route {
    /// The variables of `path` if it matches this route's template.
    fn bind(&self, path: &str) -> Option<Bound> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let mut bound = Vec::new();
        let mut parts = path.split('/');
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(literal) if literal == part => {}
                Segment::Literal(_) => return None,
                // A variable is one non-empty segment, percent-decoded.
                Segment::Field(field) => {
                    let value = percent_encoding::percent_decode_str(part)
                        .decode_utf8()
                        .ok()?;
                    if value.is_empty() || (self.verb.is_none() && value.contains(':')) {
                        return None;
                    }
                    bound.push((field.clone(), value.into_owned()));
                }
            }
        }
        parts.next().is_none().then_some(bound)
    }
}

/// The outcome of matching a request line.
pub enum Matched<'a> {
    Route(&'a Route, Bound),
    /// The path is known, the method is not one of these.
    WrongMethod(Vec<Method>),
    NotFound,
}

/// Every HTTP binding of keyplane's RPCs.
#[derive(Debug, Clone)]
pub struct Routes {
    routes: Vec<Route>,
}

/// A descriptor whose annotation cannot be served: a build of the protos that is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{rpc}: {problem}")]
pub struct RouteError {
    rpc: String,
    problem: String,
}

impl Routes {
    /// Reads the bindings of every RPC of keyplane's package in `pool`.
    pub fn from_pool(pool: &DescriptorPool) -> Result<Self, RouteError> {
        let mut routes = Vec::new();
        let Some(extension) = pool.get_extension_by_name("google.api.http") else {
            return Ok(Self { routes });
        };
        for service in pool.services().filter(|s| s.package_name() == PACKAGE) {
            for rpc in service.methods() {
                let options = rpc.options();
                if !options.has_extension(&extension) {
                    continue;
                }
                if let Value::Message(rule) = options.get_extension(&extension).as_ref() {
                    collect(&rpc, rule, &mut routes)?;
                }
            }
        }
        Ok(Self { routes })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The route of `method` `path`. A handful of routes: a scan costs less than the JSON.
    pub fn find(&self, method: &Method, path: &str) -> Matched<'_> {
        let mut allowed = Vec::new();
        for route in &self.routes {
            if let Some(bound) = route.bind(path) {
                if route.method == method {
                    return Matched::Route(route, bound);
                }
                allowed.push(route.method.clone());
            }
        }
        if allowed.is_empty() {
            Matched::NotFound
        } else {
            Matched::WrongMethod(allowed)
        }
    }
}

fn string_field(message: &DynamicMessage, name: &str) -> String {
    match message.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

/// Adds the binding of `rule` and of its additional bindings.
fn collect(
    rpc: &MethodDescriptor,
    rule: &DynamicMessage,
    routes: &mut Vec<Route>,
) -> Result<(), RouteError> {
    let error = |problem: String| RouteError {
        rpc: rpc.full_name().to_owned(),
        problem,
    };
    let verbs = [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ];
    let (method, template) = verbs
        .into_iter()
        .find(|(name, _)| rule.has_field_by_name(name))
        .map(|(name, method)| (method, string_field(rule, name)))
        .ok_or_else(|| error("only get, put, post, delete and patch bindings are served".into()))?;
    let body = match string_field(rule, "body").as_str() {
        "" => BodyMapping::None,
        "*" => BodyMapping::Whole,
        field => {
            if rpc.input().get_field_by_name(field).is_none() {
                return Err(error(format!("body names no field {field}")));
            }
            BodyMapping::Field(field.to_owned())
        }
    };
    let (segments, verb) = parse_template(&template).map_err(error)?;
    for segment in &segments {
        if let Segment::Field(path) = segment
            && field_at(rpc, path).is_none()
        {
            return Err(error(format!(
                "the path variable {} names no field",
                path.join(".")
            )));
        }
    }
    routes.push(Route {
        method,
        template,
        segments,
        verb,
        body,
        grpc_uri: format!("/{}/{}", rpc.parent_service().full_name(), rpc.name())
            .parse()
            .map_err(|e| error(format!("no gRPC path: {e}")))?,
        rpc: rpc.clone(),
    });
    if let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").as_deref() {
        for binding in more {
            if let Value::Message(binding) = binding {
                collect(rpc, binding, routes)?;
            }
        }
    }
    Ok(())
}

/// Whether the request message of `rpc` has a singular string field at `path`.
fn field_at(rpc: &MethodDescriptor, path: &[String]) -> Option<()> {
    let mut message = rpc.input();
    let (last, parents) = path.split_last()?;
    for name in parents {
        message = message
            .get_field_by_name(name)?
            .kind()
            .as_message()?
            .clone();
    }
    let field = message.get_field_by_name(last)?;
    (!field.is_list() && !field.is_map() && field.kind() == prost_reflect::Kind::String)
        .then_some(())
}

/// Splits `/v1/things/{id}:verb` into segments and the verb. Variables are single
/// segments (`{x}` or `{x=*}`): keyplane's ids never hold a slash.
fn parse_template(template: &str) -> Result<(Vec<Segment>, Option<String>), String> {
    let path = template
        .strip_prefix('/')
        .ok_or_else(|| format!("the path {template} does not start with /"))?;
    let (path, verb) = match path.rsplit_once(':') {
        Some((path, verb)) if !verb.contains(['/', '}']) => (path, Some(verb.to_owned())),
        _ => (path, None),
    };
    let segments = path
        .split('/')
        .map(
            |part| match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(var) => {
                    let name = var.strip_suffix("=*").unwrap_or(var);
                    if name.is_empty() || name.contains(['=', '*', '/']) {
                        Err(format!("the path variable {{{var}}} is not served"))
                    } else {
                        Ok(Segment::Field(name.split('.').map(str::to_owned).collect()))
                    }
                }
                None if part.is_empty() || part.contains(['{', '}', '*']) => Err(format!(
                    "the path segment {part:?} of {template} is not served"
                )),
                None => Ok(Segment::Literal(part.to_owned())),
            },
        )
        .collect::<Result<_, _>>()?;
    Ok((segments, verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        Routes::from_pool(&super::super::descriptors::pool().unwrap()).unwrap()
    }

    #[test]
    fn templates_parse() {
        assert_eq!(
            parse_template("/v1/apiKeys/{id}:rotate").unwrap(),
            (
                vec![
                    Segment::Literal("v1".into()),
                    Segment::Literal("apiKeys".into()),
                    Segment::Field(vec!["id".into()])
                ],
                Some("rotate".into())
            )
        );
        assert_eq!(
            parse_template("/v1/workspaces/{workspace.id}").unwrap().0[2],
            Segment::Field(vec!["workspace".into(), "id".into()])
        );
        assert!(parse_template("v1/x").is_err());
        assert!(parse_template("/v1/{x=**}").is_err());
    }

    #[test]
    fn every_keyplane_rpc_is_bound() {
        let routes = routes();
        let pool = super::super::descriptors::pool().unwrap();
        for service in pool.services().filter(|s| s.package_name() == PACKAGE) {
            for rpc in service.methods() {
                assert!(
                    routes.iter().any(|r| r.rpc.full_name() == rpc.full_name()),
                    "{} has no google.api.http binding",
                    rpc.full_name()
                );
            }
        }
    }

    #[test]
    fn requests_match_their_route() {
        let routes = routes();
        let rpc = |method: Method, path: &str| match routes.find(&method, path) {
            Matched::Route(route, bound) => (route.rpc.name().to_owned(), bound),
            Matched::WrongMethod(_) => ("405".into(), vec![]),
            Matched::NotFound => ("404".into(), vec![]),
        };
        assert_eq!(rpc(Method::POST, "/v1/apiKeys:verify").0, "VerifyApiKey");
        assert_eq!(
            rpc(Method::POST, "/v1/apiKeys/a%2Db:rotate"),
            (
                "RotateApiKey".into(),
                vec![(vec!["id".to_owned()], "a-b".to_owned())]
            )
        );
        assert_eq!(rpc(Method::GET, "/v1/apiKeys/k1").0, "GetApiKey");
        assert_eq!(rpc(Method::PATCH, "/v1/workspaces/w").0, "UpdateWorkspace");
        assert_eq!(rpc(Method::PUT, "/v1/workspaces/w").0, "405");
        assert_eq!(rpc(Method::GET, "/v1/apiKeys/k1:nope").0, "404");
        assert_eq!(rpc(Method::GET, "/v1/apiKeys/").0, "404");
        assert_eq!(rpc(Method::GET, "/v1/apiKeys/a/b").0, "404");
        assert_eq!(rpc(Method::GET, "/v2/apiKeys").0, "404");
    }
}
