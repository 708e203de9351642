//! Permission queries: the `permission_query` of `VerifyApiKey`, scope strings combined
//! with `AND`, `OR` and parentheses, such as `crm:read AND (crm:write OR billing:*)`.
//! `required_scopes` can only say "all of these"; a query says which alternatives a route
//! accepts.
//!
//! ```text
//! query   = or
//! or      = and { "OR" and }
//! and     = primary { "AND" primary }
//! primary = scope | "(" or ")"
//! ```
//!
//! `AND` binds tighter than `OR`. Keywords are case-insensitive (`and`, `Or`): a scope
//! string always has a colon, so no spelling of a keyword is a scope string. Tokens are
//! separated by ASCII whitespace; parentheses need none: `(crm:read OR crm:*)`. Terms
//! are scope strings ([`ScopeString::parse`]) and match as everywhere else
//! ([`scope::satisfies`]: a granted `R:*` satisfies `R:anything`).
//!
//! Queries come from callers, so everything is bounded before it is looked at: the
//! length first ([`MAX_LEN`]), then the terms ([`MAX_TERMS`]) and the nesting
//! ([`MAX_DEPTH`]) as they are read, which also bounds the recursion of parsing and
//! evaluating. Every fault is reported with its byte offset. A parsed query is evaluated
//! without allocating while it holds; the list of missing terms is built only when it does
//! not.
use std::fmt;

use super::scope::{self, ScopeError, ScopeString};

/// The longest query accepted, in bytes; checked before anything else.
pub const MAX_LEN: usize = 4096;
/// The most terms (scope strings, counting repeats) a query may have.
pub const MAX_TERMS: usize = 64;
/// The most levels of parentheses a query may nest.
pub const MAX_DEPTH: usize = 8;

/// A parsed permission query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermissionQuery {
    root: Expr,
    /// The distinct terms, in order of first appearance.
    terms: Vec<ScopeString>,
}

/// A node of the query. `And` and `Or` have two operands or more: `a AND b AND c` is one
/// node, and `(a)` is just `a`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expr {
    Term(ScopeString),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

impl Expr {
    fn holds<S: AsRef<str>>(&self, granted: &[S]) -> bool {
        match self {
            Expr::Term(scope) => scope::any_satisfies(granted, scope),
            Expr::And(operands) => operands.iter().all(|e| e.holds(granted)),
            Expr::Or(operands) => operands.iter().any(|e| e.holds(granted)),
        }
    }

    /// Adds this node's terms not yet in `terms`, in order.
    fn collect_terms(&self, terms: &mut Vec<ScopeString>) {
        match self {
            Expr::Term(scope) => {
                if !terms.contains(scope) {
                    terms.push(scope.clone());
                }
            }
            Expr::And(operands) | Expr::Or(operands) => {
                operands.iter().for_each(|e| e.collect_terms(terms));
            }
        }
    }

    /// Writes the node in canonical form, with the parentheses that keep its shape: an
    /// `OR` inside an `AND`, and an operator inside the same operator.
    fn write(&self, f: &mut fmt::Formatter<'_>, inside: Option<Operator>) -> fmt::Result {
        let (operator, operands) = match self {
            Expr::Term(scope) => return f.write_str(scope.as_str()),
            Expr::And(operands) => (Operator::And, operands),
            Expr::Or(operands) => (Operator::Or, operands),
        };
        let parenthesized = match inside {
            None => false,
            Some(outer) => outer == operator || outer == Operator::And,
        };
        if parenthesized {
            f.write_str("(")?;
        }
        for (i, operand) in operands.iter().enumerate() {
            if i > 0 {
                f.write_str(operator.separator())?;
            }
            operand.write(f, Some(operator))?;
        }
        if parenthesized {
            f.write_str(")")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operator {
    And,
    Or,
}

impl Operator {
    fn keyword(word: &str) -> Option<Self> {
        if word.eq_ignore_ascii_case("AND") {
            Some(Operator::And)
        } else if word.eq_ignore_ascii_case("OR") {
            Some(Operator::Or)
        } else {
            None
        }
    }

    fn separator(self) -> &'static str {
        match self {
            Operator::And => " AND ",
            Operator::Or => " OR ",
        }
    }
}

impl PermissionQuery {
    /// Parses a query. The empty query is refused like any other malformed one: callers
    /// that treat an empty string as "no query" decide so before calling this.
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        if text.len() > MAX_LEN {
            return Err(QueryError::new(
                MAX_LEN,
                QueryErrorKind::TooLong { len: text.len() },
            ));
        }
        let mut parser = Parser {
            lexer: Lexer { text, pos: 0 },
            peeked: None,
            depth: 0,
            terms: 0,
        };
        if let (_, Token::End) = parser.peek()? {
            return Err(QueryError::new(0, QueryErrorKind::Empty));
        }
        let root = parser.or()?;
        match parser.bump()? {
            (_, Token::End) => {}
            (at, Token::Close) => return Err(QueryError::new(at, QueryErrorKind::Unmatched)),
            (at, other) => {
                return Err(QueryError::new(
                    at,
                    QueryErrorKind::ExpectedOperator(other.found()),
                ));
            }
        }
        let mut terms = Vec::new();
        root.collect_terms(&mut terms);
        Ok(Self { root, terms })
    }

    /// The terms not granted when the query does not hold for `granted` (each once, in
    /// order of first appearance); empty, without allocating, when it holds.
    pub fn missing<S: AsRef<str>>(&self, granted: &[S]) -> Vec<String> {
        if self.root.holds(granted) {
            return Vec::new();
        }
        self.terms
            .iter()
            .filter(|t| !scope::any_satisfies(granted, t))
            .map(|t| t.as_str().to_owned())
            .collect()
    }

    /// The distinct terms, in order of first appearance.
    pub fn terms(&self) -> &[ScopeString] {
        &self.terms
    }
}

/// The canonical form: single spaces, upper-case keywords, only the parentheses the shape
/// needs. It parses back to an equal query (if still within [`MAX_LEN`]).
impl fmt::Display for PermissionQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.write(f, None)
    }
}

/// Why a query was refused, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at {position}: {kind}")]
pub struct QueryError {
    /// Byte offset of the fault in the query, from 0.
    pub position: usize,
    pub kind: QueryErrorKind,
}

impl QueryError {
    fn new(position: usize, kind: QueryErrorKind) -> Self {
        Self { position, kind }
    }
}

/// The faults a query can have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryErrorKind {
    #[error("the query is {len} bytes long, more than the {MAX_LEN} allowed")]
    TooLong { len: usize },
    #[error("the query is empty")]
    Empty,
    #[error("unexpected character `{}`", .0.escape_debug())]
    Character(char),
    #[error("expected a scope or `(`, found {0}")]
    ExpectedOperand(Found),
    #[error("expected `AND`, `OR` or the end of the query, found {0}")]
    ExpectedOperator(Found),
    #[error("expected `AND`, `OR` or `)` closing the `(` at {open}, found {found}")]
    Unclosed { open: usize, found: Found },
    #[error("`)` without a matching `(`")]
    Unmatched,
    #[error("`{term}` is not a scope string: {error}")]
    Scope { term: String, error: ScopeError },
    #[error("more than {MAX_TERMS} terms")]
    TooManyTerms,
    #[error("more than {MAX_DEPTH} levels of parentheses")]
    TooDeep,
}

/// What was found where something else was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// A token, as written.
    Token(String),
    End,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Token(token) => write!(f, "`{token}`"),
            Found::End => f.write_str("the end of the query"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    Open,
    Close,
    /// A keyword or a term.
    Word(&'a str),
    End,
}

impl Token<'_> {
    fn found(self) -> Found {
        match self {
            Token::Open => Found::Token("(".to_owned()),
            Token::Close => Found::Token(")".to_owned()),
            Token::Word(word) => Found::Token(word.to_owned()),
            Token::End => Found::End,
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '*' | ':' | '-')
}

struct Lexer<'a> {
    text: &'a str,
    /// Always on a character boundary: it only moves past ASCII.
    pos: usize,
}

impl<'a> Lexer<'a> {
    /// The next token and its byte offset.
    fn next(&mut self) -> Result<(usize, Token<'a>), QueryError> {
        let rest = self.text.get(self.pos..).unwrap_or_default();
        let trimmed = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
        let at = self.pos + (rest.len() - trimmed.len());
        let (token, len) = match trimmed.chars().next() {
            None => (Token::End, 0),
            Some('(') => (Token::Open, 1),
            Some(')') => (Token::Close, 1),
            Some(c) if is_word_char(c) => {
                let len = trimmed
                    .find(|c: char| !is_word_char(c))
                    .unwrap_or(trimmed.len());
                (Token::Word(trimmed.get(..len).unwrap_or_default()), len)
            }
            Some(c) => return Err(QueryError::new(at, QueryErrorKind::Character(c))),
        };
        self.pos = at + len;
        Ok((at, token))
    }
}

/// Recursive descent, one token of lookahead. Tokens are read only when needed, so the
/// first fault in the text is the one reported.
struct Parser<'a> {
    lexer: Lexer<'a>,
    peeked: Option<(usize, Token<'a>)>,
    /// Parentheses open around the current position.
    depth: usize,
    /// Terms read so far, counting repeats.
    terms: usize,
}

impl<'a> Parser<'a> {
    fn peek(&mut self) -> Result<(usize, Token<'a>), QueryError> {
        if let Some(token) = self.peeked {
            return Ok(token);
        }
        let token = self.lexer.next()?;
        self.peeked = Some(token);
        Ok(token)
    }

    fn bump(&mut self) -> Result<(usize, Token<'a>), QueryError> {
        let token = self.peek()?;
        self.peeked = None;
        Ok(token)
    }

    /// Whether the next token is this operator; consumes it if so.
    fn eat(&mut self, operator: Operator) -> Result<bool, QueryError> {
        let found =
            matches!(self.peek()?, (_, Token::Word(w)) if Operator::keyword(w) == Some(operator));
        if found {
            self.bump()?;
        }
        Ok(found)
    }

    fn or(&mut self) -> Result<Expr, QueryError> {
        let mut operands = vec![self.and()?];
        while self.eat(Operator::Or)? {
            operands.push(self.and()?);
        }
        Ok(node(operands, Expr::Or))
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut operands = vec![self.primary()?];
        while self.eat(Operator::And)? {
            operands.push(self.primary()?);
        }
        Ok(node(operands, Expr::And))
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        match self.bump()? {
            (at, Token::Word(word)) if Operator::keyword(word).is_none() => self.term(at, word),
            (open, Token::Open) => {
                if self.depth == MAX_DEPTH {
                    return Err(QueryError::new(open, QueryErrorKind::TooDeep));
                }
                self.depth += 1;
                let inner = self.or()?;
                match self.bump()? {
                    (_, Token::Close) => {}
                    (at, other) => {
                        return Err(QueryError::new(
                            at,
                            QueryErrorKind::Unclosed {
                                open,
                                found: other.found(),
                            },
                        ));
                    }
                }
                self.depth -= 1;
                Ok(inner)
            }
            (at, other) => Err(QueryError::new(
                at,
                QueryErrorKind::ExpectedOperand(other.found()),
            )),
        }
    }

    fn term(&mut self, at: usize, word: &str) -> Result<Expr, QueryError> {
        if self.terms == MAX_TERMS {
            return Err(QueryError::new(at, QueryErrorKind::TooManyTerms));
        }
        self.terms += 1;
        ScopeString::parse(word).map(Expr::Term).map_err(|error| {
            QueryError::new(
                at,
                QueryErrorKind::Scope {
                    term: word.to_owned(),
                    error,
                },
            )
        })
    }
}

/// The node of one operand or more: a single operand stands for itself.
fn node(operands: Vec<Expr>, operator: fn(Vec<Expr>) -> Expr) -> Expr {
    match <[Expr; 1]>::try_from(operands) {
        Ok([single]) => single,
        Err(operands) => operator(operands),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn q(text: &str) -> PermissionQuery {
        PermissionQuery::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn err(text: &str) -> QueryError {
        PermissionQuery::parse(text).unwrap_err()
    }

    fn token(text: &str) -> Found {
        Found::Token(text.to_owned())
    }

    const NONE: [&str; 0] = [];

    #[test]
    fn the_spec_example() {
        let query = q("crm:read AND (crm:write OR billing:*)");
        assert!(query.missing(&["crm:*"]).is_empty());
        assert!(query.missing(&["crm:read", "billing:*"]).is_empty());
        assert!(query.missing(&["crm:read", "crm:write"]).is_empty());
        // `billing:*` is a term like any other: only a granted `billing:*` satisfies it.
        assert_eq!(
            query.missing(&["crm:read", "billing:read"]),
            ["crm:write", "billing:*"]
        );
        assert_eq!(query.missing(&["billing:*"]), ["crm:read", "crm:write"]);
        assert_eq!(query.missing(&NONE), ["crm:read", "crm:write", "billing:*"]);
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let loose = q("a:x OR b:x AND c:x");
        assert!(loose.missing(&["a:x"]).is_empty());
        assert!(!loose.missing(&["b:x"]).is_empty());
        assert!(loose.missing(&["b:x", "c:x"]).is_empty());
        assert_eq!(loose, q("a:x OR (b:x AND c:x)"));
        let grouped = q("(a:x OR b:x) AND c:x");
        assert_eq!(grouped.missing(&["a:x"]), ["b:x", "c:x"]);
        assert!(grouped.missing(&["b:x", "c:x"]).is_empty());
        let right = q("a:x AND b:x OR c:x");
        assert!(right.missing(&["c:x"]).is_empty());
        assert_eq!(right, q("(a:x AND b:x) OR c:x"));
    }

    #[test]
    fn wildcards_match_as_scopes_do() {
        let query = q("crm:read AND erp:write");
        assert!(query.missing(&["crm:*", "erp:*"]).is_empty());
        assert_eq!(query.missing(&["crm:*", "*:*"]), ["erp:write"]);
        assert_eq!(query.missing(&["cr:*", "erp:write"]), ["crm:read"]);
        let star = q("crm:*");
        assert!(star.missing(&["crm:*"]).is_empty());
        assert_eq!(star.missing(&["crm:read"]), ["crm:*"]);
    }

    #[test]
    fn missing_lists_each_term_once_in_order_and_takes_strings() {
        let query = q("b:x AND a:x AND (b:x OR c:x) AND a:x");
        assert_eq!(query.terms().len(), 3);
        let granted: Vec<String> = vec!["c:x".into()];
        assert_eq!(query.missing(&granted), ["b:x", "a:x"]);
        assert_eq!(query.missing(&NONE), ["b:x", "a:x", "c:x"]);
    }

    #[test]
    fn keywords_spacing_and_parentheses() {
        let canonical = q("a:b AND c:d OR e:f");
        assert_eq!(q("a:b and c:d Or e:f"), canonical);
        assert_eq!(q("  a:b\tAND\nc:d  OR e:f  "), canonical);
        assert_eq!(q("(a:b AND c:d)OR(e:f)"), canonical);
        assert_eq!(q("((a:b))"), q("a:b"));
        // Neither `and` nor `AND:x` is a keyword once it is a scope string.
        assert_eq!(q("and:x AND or:y").terms().len(), 2);
    }

    #[test]
    fn canonical_form() {
        for (text, canonical) in [
            ("crm:read", "crm:read"),
            ("((crm:read))", "crm:read"),
            ("( a:b or c:d ) and e:f", "(a:b OR c:d) AND e:f"),
            ("a:b and (c:d and e:f)", "a:b AND (c:d AND e:f)"),
            ("a:b or (c:d or e:f)", "a:b OR (c:d OR e:f)"),
            ("(a:b and c:d) or e:f", "a:b AND c:d OR e:f"),
            ("a:b AND c:d AND e:f", "a:b AND c:d AND e:f"),
        ] {
            let query = q(text);
            assert_eq!(query.to_string(), canonical, "{text}");
            assert_eq!(q(canonical), query, "{text}");
        }
    }

    #[test]
    fn every_fault_has_its_position() {
        use QueryErrorKind::*;
        let scope = |term: &str, error| Scope {
            term: term.to_owned(),
            error,
        };
        for (text, position, kind) in [
            ("", 0, Empty),
            (" \t\n", 0, Empty),
            (
                "crm:read AND (crm:write OR )",
                27,
                ExpectedOperand(token(")")),
            ),
            ("crm:read AND", 12, ExpectedOperand(Found::End)),
            ("crm:read AND OR a:b", 13, ExpectedOperand(token("OR"))),
            ("OR crm:read", 0, ExpectedOperand(token("OR"))),
            ("()", 1, ExpectedOperand(token(")"))),
            (")", 0, ExpectedOperand(token(")"))),
            (
                "crm:read crm:write",
                9,
                ExpectedOperator(token("crm:write")),
            ),
            ("crm:read (a:b)", 9, ExpectedOperator(token("("))),
            (
                "(crm:read",
                9,
                Unclosed {
                    open: 0,
                    found: Found::End,
                },
            ),
            (
                "a:b AND ((c:d) OR e:f",
                21,
                Unclosed {
                    open: 8,
                    found: Found::End,
                },
            ),
            (
                "(crm:read crm:write)",
                10,
                Unclosed {
                    open: 0,
                    found: token("crm:write"),
                },
            ),
            ("crm:read)", 8, Unmatched),
            ("(a:b)) OR c:d", 5, Unmatched),
            ("crm AND x:y", 0, scope("crm", ScopeError::Shape)),
            (
                "a:b AND c*m:read",
                8,
                scope("c*m:read", ScopeError::Resource),
            ),
            ("a:b OR (c:)", 8, scope("c:", ScopeError::Action)),
            ("a:b OR c:d:e", 7, scope("c:d:e", ScopeError::Action)),
            ("a:b & c:d", 4, Character('&')),
            ("a:b && c:d", 4, Character('&')),
            ("a:b AND é:x", 8, Character('é')),
            ("a:b\u{a0}", 3, Character('\u{a0}')),
            ("\u{0}", 0, Character('\0')),
        ] {
            assert_eq!(
                PermissionQuery::parse(text),
                Err(QueryError { position, kind }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn messages_say_what_and_where() {
        for (text, message) in [
            (
                "crm:read AND (crm:write OR )",
                "at 27: expected a scope or `(`, found `)`",
            ),
            (
                "crm:read AND",
                "at 12: expected a scope or `(`, found the end of the query",
            ),
            (
                "a:b c:d",
                "at 4: expected `AND`, `OR` or the end of the query, found `c:d`",
            ),
            (
                "(a:b",
                "at 4: expected `AND`, `OR` or `)` closing the `(` at 0, found the end of the query",
            ),
            ("a:b)", "at 3: `)` without a matching `(`"),
            (
                "crm",
                "at 0: `crm` is not a scope string: must have the form resource:action",
            ),
            ("a:b\0", "at 3: unexpected character `\\0`"),
            ("", "at 0: the query is empty"),
        ] {
            assert_eq!(err(text).to_string(), message);
        }
        assert_eq!(
            err(&"a".repeat(5000)).to_string(),
            "at 4096: the query is 5000 bytes long, more than the 4096 allowed"
        );
        assert_eq!(
            err(&vec!["a:b"; 65].join(" OR ")).to_string(),
            "at 448: more than 64 terms"
        );
        assert_eq!(
            err(&format!("{}a:b{}", "(".repeat(9), ")".repeat(9))).to_string(),
            "at 8: more than 8 levels of parentheses"
        );
    }

    #[test]
    fn length_is_checked_first() {
        let padded = format!("a:b{}", " ".repeat(MAX_LEN - 3));
        assert_eq!(padded.len(), MAX_LEN);
        assert_eq!(q(&padded), q("a:b"));
        let over = format!("{padded} ");
        assert_eq!(
            err(&over),
            QueryError {
                position: MAX_LEN,
                kind: QueryErrorKind::TooLong { len: MAX_LEN + 1 },
            }
        );
        // Too long is reported before the fault at its start.
        assert_eq!(
            err(&format!(")){over}")).kind,
            QueryErrorKind::TooLong { len: MAX_LEN + 3 }
        );
    }

    #[test]
    fn at_most_64_terms_counting_repeats() {
        let terms: Vec<String> = (0..65).map(|i| format!("r:{i}")).collect();
        let ok = q(&terms[..64].join(" AND "));
        assert_eq!(ok.terms().len(), 64);
        assert!(ok.missing(&terms).is_empty());
        let over = terms.join(" AND ");
        let at = over.rfind("r:64").unwrap();
        assert_eq!(
            err(&over),
            QueryError {
                position: at,
                kind: QueryErrorKind::TooManyTerms
            }
        );
        // Repeats count: the 65th occurrence is refused even with one distinct term.
        assert_eq!(q(&vec!["a:b"; 64].join(" OR ")).terms().len(), 1);
        assert_eq!(err(&vec!["a:b"; 65].join(" OR ")).position, 64 * 7);
    }

    #[test]
    fn at_most_8_levels_of_parentheses() {
        let nested = |levels: usize| format!("{}a:b{}", "(".repeat(levels), ")".repeat(levels));
        assert_eq!(q(&nested(8)), q("a:b"));
        assert_eq!(
            err(&nested(9)),
            QueryError {
                position: 8,
                kind: QueryErrorKind::TooDeep
            }
        );
        // Depth, not count: many groups side by side are fine.
        let groups = vec![nested(8); 8].join(" AND ");
        assert_eq!(q(&groups).terms().len(), 1);
        // The ninth level is refused wherever it opens.
        let deep = format!("a:b OR {}c:d AND (e:f){}", "(".repeat(8), ")".repeat(8));
        assert_eq!(
            err(&deep),
            QueryError {
                position: deep.find("(e:f)").unwrap(),
                kind: QueryErrorKind::TooDeep
            }
        );
    }

    /// A query as a test writes it, evaluated independently of the parser.
    #[derive(Clone, Debug)]
    enum Ast {
        Term(&'static str),
        And(Vec<Ast>),
        Or(Vec<Ast>),
        /// Parentheses the shape does not need.
        Paren(Box<Ast>),
    }

    const TERMS: [&str; 6] = [
        "crm:read",
        "crm:write",
        "crm:*",
        "billing:read",
        "billing:pay",
        "erp:x",
    ];
    const GRANTABLE: [&str; 7] = [
        "crm:read",
        "crm:write",
        "crm:*",
        "billing:read",
        "billing:*",
        "erp:x",
        "openid",
    ];

    /// How an [`Ast`] is written out.
    #[derive(Clone, Debug)]
    struct Style {
        and: &'static str,
        or: &'static str,
        space: &'static str,
        /// Whitespace inside parentheses.
        padded: bool,
    }

    impl Ast {
        fn holds(&self, granted: &[&str]) -> bool {
            match self {
                Ast::Term(t) => term_granted(t, granted),
                Ast::And(v) => v.iter().all(|a| a.holds(granted)),
                Ast::Or(v) => v.iter().any(|a| a.holds(granted)),
                Ast::Paren(a) => a.holds(granted),
            }
        }

        fn leaves(&self, out: &mut Vec<&'static str>) {
            match self {
                Ast::Term(t) => out.push(t),
                Ast::And(v) | Ast::Or(v) => v.iter().for_each(|a| a.leaves(out)),
                Ast::Paren(a) => a.leaves(out),
            }
        }

        fn write(&self, style: &Style, in_and: bool, out: &mut String) {
            let group = |out: &mut String, inner: &dyn Fn(&mut String)| {
                out.push('(');
                if style.padded {
                    out.push_str(style.space);
                }
                inner(out);
                if style.padded {
                    out.push_str(style.space);
                }
                out.push(')');
            };
            let list = |out: &mut String, v: &[Ast], keyword: &str, and: bool| {
                for (i, a) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(style.space);
                        out.push_str(keyword);
                        out.push_str(style.space);
                    }
                    a.write(style, and, out);
                }
            };
            match self {
                Ast::Term(t) => out.push_str(t),
                Ast::And(v) => list(out, v, style.and, true),
                Ast::Or(v) if in_and => group(out, &|out| list(out, v, style.or, false)),
                Ast::Or(v) => list(out, v, style.or, false),
                Ast::Paren(a) => group(out, &|out| a.write(style, false, out)),
            }
        }
    }

    fn ast() -> impl Strategy<Value = Ast> {
        let leaf = prop::sample::select(TERMS.to_vec()).prop_map(Ast::Term);
        // Depth 6: each level adds at most one level of parentheses.
        leaf.prop_recursive(6, 48, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..4).prop_map(Ast::And),
                prop::collection::vec(inner.clone(), 2..4).prop_map(Ast::Or),
                inner.prop_map(|a| Ast::Paren(Box::new(a))),
            ]
        })
    }

    fn style() -> impl Strategy<Value = Style> {
        (
            prop::sample::select(vec!["AND", "and", "And"]),
            prop::sample::select(vec!["OR", "or", "oR"]),
            prop::sample::select(vec![" ", "\t", " \n  "]),
            any::<bool>(),
        )
            .prop_map(|(and, or, space, padded)| Style {
                and,
                or,
                space,
                padded,
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in ".{0,300}") {
            let _ = PermissionQuery::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_query_like_text(text in "[a-c:*() \t]{0,200}|([a-c]:[a-c*]|AND|or|[()]| ){0,80}") {
            if let Ok(query) = PermissionQuery::parse(&text) {
                prop_assert_eq!(PermissionQuery::parse(&query.to_string()), Ok(query));
            }
        }

        #[test]
        fn written_queries_parse_to_what_they_say(ast in ast(), style in style()) {
            let mut text = String::new();
            ast.write(&style, false, &mut text);
            let mut leaves = Vec::new();
            ast.leaves(&mut leaves);
            let parsed = PermissionQuery::parse(&text);
            if leaves.len() > MAX_TERMS {
                prop_assert_eq!(parsed.map_err(|e| e.kind), Err(QueryErrorKind::TooManyTerms));
                return Ok(());
            }
            let query = parsed.map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            let mut distinct: Vec<&str> = Vec::new();
            for leaf in &leaves {
                if !distinct.contains(leaf) {
                    distinct.push(leaf);
                }
            }
            for subset in 0u32..(1 << GRANTABLE.len()) {
                let granted: Vec<&str> = GRANTABLE
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| subset & (1 << i) != 0)
                    .map(|(_, g)| *g)
                    .collect();
                let missing = query.missing(&granted);
                if ast.holds(&granted) {
                    prop_assert!(missing.is_empty(), "{} with {:?}: {:?}", text, granted, missing);
                } else {
                    let expected: Vec<&str> = distinct
                        .iter()
                        .copied()
                        .filter(|t| !term_granted(t, &granted))
                        .collect();
                    prop_assert_eq!(missing, expected, "{} with {:?}", text, granted);
                }
            }
            prop_assert_eq!(PermissionQuery::parse(&query.to_string()), Ok(query));
        }
    }

    /// The matching rule, applied to one term of a test query.
    fn term_granted(term: &str, granted: &[&str]) -> bool {
        let term = ScopeString::parse(term).unwrap();
        granted.iter().any(|g| scope::satisfies(g, &term))
    }
}
