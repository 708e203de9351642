//! Field validation that collects every problem of a request, so a client learns about all
//! bad fields at once (one `BadRequest` field violation each).
use std::collections::BTreeMap;

/// Most entries a `labels` or `metadata` map may hold.
pub const MAP_MAX_ENTRIES: usize = 64;
/// Longest label / metadata value.
pub const MAP_VALUE_MAX: usize = 256;
/// Longest metadata key (labels have a stricter rule).
pub const MAP_KEY_MAX: usize = 128;
/// Longest display name.
pub const NAME_MAX: usize = 120;
/// Longest description.
pub const DESCRIPTION_MAX: usize = 1024;
/// Longest owner / subject id.
pub const OWNER_MAX: usize = 256;
/// Most scopes on one key or in one verification.
pub const SCOPES_MAX: usize = 64;

/// One bad field, named by its proto path (e.g. `workspace.labels`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Every problem found in one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("invalid request: {}", .violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
pub struct ValidationError {
    pub violations: Vec<FieldViolation>,
}

impl ValidationError {
    pub fn single(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut e = Self::default();
        e.add(field, description);
        e
    }
}

/// Collects violations while a request is parsed.
#[derive(Debug, Default)]
pub struct Validator {
    error: ValidationError,
}

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.error.add(field, description);
    }

    /// Records the outcome of a parse and returns the value when it succeeded.
    pub fn check<T, E: std::fmt::Display>(
        &mut self,
        field: &str,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.add(field, e.to_string());
                None
            }
        }
    }

    /// A string of at most `max` characters.
    pub fn max_len(&mut self, field: &str, value: &str, max: usize) -> String {
        if value.chars().count() > max {
            self.add(field, format!("must be at most {max} characters"));
        }
        value.to_owned()
    }

    /// Ends validation: the value when nothing was wrong.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, ValidationError> {
        if self.error.violations.is_empty() {
            Ok(value())
        } else {
            Err(self.error)
        }
    }

    pub fn is_ok(&self) -> bool {
        self.error.violations.is_empty()
    }
}

impl ValidationError {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }
}

/// A display name: trimmed, 1 to 120 characters.
pub fn name(v: &mut Validator, field: &str, raw: &str) -> String {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        v.add(field, "must not be empty");
    }
    v.max_len(field, trimmed, NAME_MAX)
}

/// Workspace labels: keys `[a-z0-9_.-]{1,63}`, values at most 256 characters.
pub fn labels(v: &mut Validator, field: &str, map: &BTreeMap<String, String>) {
    map_size(v, field, map);
    for (key, value) in map {
        let ok_key = (1..=63).contains(&key.len())
            && key.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if !ok_key {
            v.add(
                field,
                format!("label key {key:?} must match [a-z0-9_.-]{{1,63}}"),
            );
        }
        if value.chars().count() > MAP_VALUE_MAX {
            v.add(
                field,
                format!("label {key:?} value must be at most {MAP_VALUE_MAX} characters"),
            );
        }
    }
}

/// Key metadata: at most 64 entries; keys 1 to 128 characters, values at most 256.
pub fn metadata(v: &mut Validator, field: &str, map: &BTreeMap<String, String>) {
    map_size(v, field, map);
    for (key, value) in map {
        if key.is_empty() || key.chars().count() > MAP_KEY_MAX {
            v.add(
                field,
                format!("metadata keys must be 1 to {MAP_KEY_MAX} characters"),
            );
        }
        if value.chars().count() > MAP_VALUE_MAX {
            v.add(
                field,
                format!("metadata value of {key:?} must be at most {MAP_VALUE_MAX} characters"),
            );
        }
    }
}

fn map_size(v: &mut Validator, field: &str, map: &BTreeMap<String, String>) {
    if map.len() > MAP_MAX_ENTRIES {
        v.add(
            field,
            format!("must have at most {MAP_MAX_ENTRIES} entries"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_violation() {
        let mut v = Validator::new();
        assert_eq!(name(&mut v, "name", "  ok  "), "ok");
        assert!(v.is_ok());
        name(&mut v, "name", "   ");
        v.max_len("description", &"x".repeat(1025), DESCRIPTION_MAX);
        let labels_map: BTreeMap<_, _> = [("Bad".to_owned(), "v".to_owned())].into();
        labels(&mut v, "labels", &labels_map);
        let err = v.finish(|| ()).unwrap_err();
        let fields: Vec<_> = err.violations.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["name", "description", "labels"]);
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut v = Validator::new();
        name(&mut v, "name", &"é".repeat(120));
        assert!(v.is_ok());
        name(&mut v, "name", &"é".repeat(121));
        assert!(!v.is_ok());
    }
}
