//! Parsed permission queries, kept by their text: a route sends the same
//! `permission_query` on every request, so it is parsed once and each later request
//! costs a hash lookup, without allocating.
//!
//! Only accepted queries are kept, and at most `capacity` of them (the least useful are
//! evicted): a flood of distinct queries, valid or not, cannot grow memory past the
//! bound. Malformed ones are parsed again every time; that is bounded work (at most
//! [`MAX_LEN`] bytes, refused before hashing when longer).
use std::sync::Arc;

use quick_cache::sync::Cache;

use crate::domain::permission::{MAX_LEN, PermissionQuery, QueryError};

/// A capacity for a server: far more queries than its routes send. Typical entries take a
/// few hundred bytes; one as long as allowed takes up to about 16 KiB (its text, and its
/// terms twice: in the tree and in the list of distinct terms), so a flood of the longest
/// distinct queries tops out around 160 MB.
pub const DEFAULT_CAPACITY: u64 = 10_000;

pub struct ParsedQueries {
    entries: Cache<Arc<str>, Arc<PermissionQuery>>,
}

impl ParsedQueries {
    /// Keeps at most `capacity` parsed queries.
    pub fn new(capacity: u64) -> Self {
        Self {
            entries: Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX)),
        }
    }

    /// The parsed query for `text`, from memory when it was parsed before.
    pub fn get(&self, text: &str) -> Result<Arc<PermissionQuery>, QueryError> {
        if text.len() <= MAX_LEN
            && let Some(query) = self.entries.get(text)
        {
            return Ok(query);
        }
        // Two requests missing at once both parse: cheaper than coordinating them.
        let query = Arc::new(PermissionQuery::parse(text)?);
        self.entries.insert(Arc::from(text), Arc::clone(&query));
        Ok(query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::permission::QueryErrorKind;

    #[test]
    fn parses_once_and_shares_the_result() {
        let queries = ParsedQueries::new(10);
        let first = queries
            .get("crm:read AND (crm:write OR billing:*)")
            .unwrap();
        let again = queries
            .get("crm:read AND (crm:write OR billing:*)")
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(first.missing(&["crm:*"]).is_empty());
        // Keyed by the text as sent: an equivalent spelling is another entry.
        let other = queries
            .get("crm:read and (crm:write or billing:*)")
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(*first, *other);
    }

    #[test]
    fn refuses_malformed_queries_every_time_without_keeping_them() {
        let queries = ParsedQueries::new(10);
        for _ in 0..2 {
            let err = queries.get("crm:read AND").unwrap_err();
            assert_eq!(err.position, 12);
        }
        let long = "a".repeat(MAX_LEN + 1);
        assert!(matches!(
            queries.get(&long).unwrap_err().kind,
            QueryErrorKind::TooLong { .. }
        ));
        assert!(queries.entries.is_empty());
    }

    #[test]
    fn keeps_at_most_its_capacity() {
        let queries = ParsedQueries::new(16);
        for i in 0..200 {
            let text = format!("r:{i} OR s:{i}");
            let query = queries.get(&text).unwrap();
            assert_eq!(query.missing(&[format!("s:{i}")]), Vec::<String>::new());
        }
        assert!(queries.entries.len() <= 16);
        // Evicted or not, every query still answers.
        assert!(
            queries
                .get("r:0 OR s:0")
                .unwrap()
                .missing(&["r:0"])
                .is_empty()
        );
    }
}
