//! Quoting for SQL text that mm builds itself (applied remote changes, DDL
//! messages). Values travel as untyped string literals: PostgreSQL resolves
//! an `unknown` literal to the column's type in `INSERT … VALUES`, `SET col =`
//! and `col = …`, so text output of any type round-trips without casts.
//! Sessions run with `standard_conforming_strings = on` (the default since
//! 9.1), so a literal only doubles its single quotes.

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('"');
    for c in name.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// `'text'` with embedded quotes doubled.
pub fn quote_literal(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('\'');
    for c in text.chars() {
        if c == '\'' {
            s.push('\'');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"back\slash"), r"'back\slash'");
        assert_eq!(qualified("public", "t"), r#""public"."t""#);
    }
}
