//! Key templates: `user:{id}` → literal parts and column placeholders; `{{`/`}}` are literal
//! braces (Redis Cluster hash tags). From a parsed template we derive the SQL expression that
//! renders a key from a row, and the SCAN pattern that matches every key of the layout.

use crate::error::{invalid, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Lit(String),
    Col(String),
}

pub fn parse(template: &str) -> Result<Vec<Part>> {
    let mut parts = vec![];
    let mut lit = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut col = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => {
                            return Err(invalid(format!(
                                "key template \"{template}\" has an unbalanced '{{' (write {{{{ for a literal brace)"
                            )))
                        }
                        Some(ch) => col.push(ch),
                    }
                }
                if col.is_empty() {
                    return Err(invalid(format!("key template \"{template}\" has an empty placeholder {{}}")));
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Col(col));
            }
            '}' => {
                return Err(invalid(format!(
                    "key template \"{template}\" has an unbalanced '}}' (write }}}} for a literal brace)"
                )))
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    match parts.first() {
        Some(Part::Lit(_)) => {}
        _ => {
            return Err(invalid(format!(
                "key template \"{template}\" must start with a literal prefix, e.g. 'users:{{id}}'"
            )))
        }
    }
    if !parts.iter().any(|p| matches!(p, Part::Col(_))) {
        return Err(invalid(format!(
            "key template \"{template}\" names no column"
        )));
    }
    Ok(parts)
}

pub fn columns(parts: &[Part]) -> Vec<&str> {
    parts
        .iter()
        .filter_map(|p| match p {
            Part::Col(c) => Some(c.as_str()),
            _ => None,
        })
        .collect()
}

/// The literal text before the first placeholder (with the key prefix): two layouts whose
/// prefixes are prefixes of each other could produce the same key and are refused.
pub fn literal_prefix(key_prefix: &str, parts: &[Part]) -> String {
    match parts.first() {
        Some(Part::Lit(l)) => format!("{key_prefix}{l}"),
        _ => key_prefix.to_string(),
    }
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL rendering the key from a row aliased `r`.
pub fn key_sql(key_prefix: &str, parts: &[Part]) -> String {
    let mut out = vec![quote_literal(key_prefix)];
    for p in parts {
        out.push(match p {
            Part::Lit(l) => quote_literal(l),
            Part::Col(c) => format!("(r.{})::text", quote_ident(c)),
        });
    }
    out.join(" || ")
}

/// Text matched literally by a SCAN MATCH glob.
pub fn glob_escape(s: &str) -> String {
    let mut o = String::new();
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            o.push('\\');
        }
        o.push(ch);
    }
    o
}

/// The SCAN MATCH pattern of the layout: literals glob-escaped, placeholders as `*`.
pub fn scan_pattern(key_prefix: &str, parts: &[Part]) -> String {
    let mut out = glob_escape(key_prefix);
    for p in parts {
        match p {
            Part::Lit(l) => out.push_str(&glob_escape(l)),
            Part::Col(_) => out.push('*'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_templates() {
        let p = parse("{{user}}:{id}").unwrap();
        assert_eq!(p, vec![Part::Lit("{user}:".into()), Part::Col("id".into())]);
        assert!(parse("{id}").is_err());
        assert!(parse("u:{id").is_err());
        assert!(parse("u:id}").is_err());
        assert!(parse("u:").is_err());
        assert_eq!(
            scan_pattern("p:", &parse("a*:{x}:{y}").unwrap()),
            "p:a\\*:*:*"
        );
        assert_eq!(
            key_sql("", &parse("u:{id}").unwrap()),
            "'' || 'u:' || (r.\"id\")::text"
        );
    }
}

/// The placeholder values of a key of this layout, or None when the key does not fit it. A
/// placeholder followed by a literal ends at that literal's first occurrence; the last one takes
/// the rest of the key.
pub fn invert(key_prefix: &str, parts: &[Part], key: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix(key_prefix)?;
    let mut values = vec![];
    let mut i = 0;
    while i < parts.len() {
        match &parts[i] {
            Part::Lit(l) => rest = rest.strip_prefix(l.as_str())?,
            Part::Col(_) => match parts.get(i + 1) {
                Some(Part::Lit(next)) => {
                    let end = rest.find(next.as_str())?;
                    values.push(rest[..end].to_string());
                    rest = &rest[end..];
                }
                Some(Part::Col(_)) => return None, // adjacent placeholders: ambiguous
                None => {
                    values.push(rest.to_string());
                    rest = "";
                }
            },
        }
        i += 1;
    }
    if rest.is_empty() {
        Some(values)
    } else {
        None
    }
}

#[cfg(test)]
mod invert_tests {
    use super::*;
    #[test]
    fn inverts_keys() {
        let p = parse("u:{a}:x:{b}").unwrap();
        assert_eq!(
            invert("p:", &p, "p:u:1:x:2"),
            Some(vec!["1".into(), "2".into()])
        );
        assert_eq!(invert("p:", &p, "u:1:x:2"), None);
        assert_eq!(
            invert("", &parse("u:{a}").unwrap(), "u:"),
            Some(vec!["".into()])
        );
        assert_eq!(invert("", &parse("u:{a}:p").unwrap(), "u:1:q"), None);
    }
}

/// Properties of the key-template parser over arbitrary input (issue 6: a fuzz target for
/// templates): it never panics, what it accepts re-renders to the same parts, keys rendered
/// from values invert back to them, and SQL quoting round-trips.
#[cfg(all(test, feature = "pg_test"))]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    fn render(parts: &[Part]) -> String {
        parts
            .iter()
            .map(|p| match p {
                Part::Lit(l) => l.replace('{', "{{").replace('}', "}}"),
                Part::Col(c) => format!("{{{c}}}"),
            })
            .collect()
    }

    fn unquote(q: &str, mark: char) -> Option<String> {
        let inner = q.strip_prefix(mark)?.strip_suffix(mark)?;
        let doubled = format!("{mark}{mark}");
        // every quote mark inside must be doubled
        if inner.replace(&doubled, "").contains(mark) {
            return None;
        }
        Some(inner.replace(&doubled, &mark.to_string()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn parse_never_panics(t in "\\PC{0,40}") {
            let _ = parse(&t);
        }

        #[test]
        fn braces_and_text_round_trip(t in "[a-z:{}\\\\'\" ;\\-]{0,30}") {
            if let Ok(parts) = parse(&t) {
                prop_assert_eq!(parse(&render(&parts)).ok(), Some(parts.clone()));
                prop_assert!(matches!(parts.first(), Some(Part::Lit(_))));
                prop_assert!(parts.iter().any(|p| matches!(p, Part::Col(_))));
                for p in &parts {
                    if let Part::Col(c) = p {
                        let clean = !c.is_empty() && !c.contains(['{', '}']);
                        prop_assert!(clean, "placeholder {:?}", c);
                    }
                }
            }
        }

        #[test]
        fn keys_invert_to_their_values(
            prefix in "[a-z]{0,4}",
            lits in proptest::collection::vec("[:/|-][a-z:/|-]{0,3}", 1..4),
            vals in proptest::collection::vec("[A-Z0-9 _]{0,6}", 4),
        ) {
            // lit, {c0}, lit, {c1}, ...: values never contain the literals' characters
            let mut parts = vec![];
            for (i, l) in lits.iter().enumerate() {
                parts.push(Part::Lit(l.clone()));
                parts.push(Part::Col(format!("c{i}")));
            }
            let mut key = prefix.clone();
            for (i, l) in lits.iter().enumerate() {
                key.push_str(l);
                key.push_str(&vals[i]);
            }
            let want: Vec<String> = vals[..lits.len()].to_vec();
            prop_assert_eq!(invert(&prefix, &parts, &key), Some(want));
        }

        #[test]
        fn sql_quoting_round_trips(s in "\\PC{0,30}") {
            prop_assert_eq!(unquote(&quote_literal(&s), '\''), Some(s.clone()));
            prop_assert_eq!(unquote(&quote_ident(&s), '"'), Some(s.clone()));
        }
    }
}
