//! Row keys: the identity under which a row is written once and only once.
//!
//! A key is an ordered list of named parts. Its canonical string (stored in every table's `key`
//! column) is `name=value` pairs joined by `/`, with `%`, `/` and `=` percent-escaped, so two
//! different keys never render to the same string.

use std::fmt;

/// The identity of one row; see the module docs for the canonical string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey(String);

impl RowKey {
    /// Builds a key from `(name, value)` parts, in order.
    pub fn new<'a>(parts: impl IntoIterator<Item = (&'a str, String)>) -> Self {
        let mut out = String::new();
        for (i, (name, value)) in parts.into_iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            escape_into(&mut out, name);
            out.push('=');
            escape_into(&mut out, &value);
        }
        RowKey(out)
    }

    /// The canonical string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a canonical string read back from a table.
    pub fn from_canonical(s: impl Into<String>) -> Self {
        RowKey(s.into())
    }
}

impl fmt::Display for RowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separators_inside_values_do_not_collide() {
        let a = RowKey::new([("a", "x/b=y".to_string())]);
        let b = RowKey::new([("a", "x".to_string()), ("b", "y".to_string())]);
        assert_ne!(a, b);
        assert_eq!(a.as_str(), "a=x%2Fb%3Dy");
        assert_eq!(b.as_str(), "a=x/b=y");
        let c = RowKey::new([("a", "50%".to_string())]);
        assert_eq!(c.as_str(), "a=50%25");
    }
}
