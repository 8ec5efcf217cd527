//! The seed's pgbench scripts read as pgbench reads them, for the harness's
//! own load generators ([`super::two_pc`]): `\set NAME random(A, B)` draws
//! a uniform integer in `A..=B` per run of the script, every other line
//! (up to `;`) is one statement, run on its own (autocommit), with `:NAME`
//! replaced by the drawn value. Only what the seed scripts use is
//! understood; anything else is an error rather than a silently different
//! workload.

use anyhow::{bail, Context, Result};
use rand::Rng;

/// One `\set NAME random(LOW, HIGH)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomVar {
    pub name: String,
    pub low: i64,
    pub high: i64,
}

/// A parsed script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedScript {
    pub name: String,
    pub vars: Vec<RandomVar>,
    /// The statements without their `;`, `:NAME` still in them.
    pub statements: Vec<String>,
}

impl SeedScript {
    /// Parses pgbench script text; `name` is for messages.
    pub fn parse(name: &str, text: &str) -> Result<SeedScript> {
        let mut vars = Vec::new();
        let mut statements = Vec::new();
        let mut pending = String::new();
        for (no, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let at = || format!("{name}:{}", no + 1);
            if line.is_empty() || line.starts_with("--") {
                continue;
            }
            if let Some(rest) = line.strip_prefix('\\') {
                if !pending.is_empty() {
                    bail!("{}: meta-command inside a statement", at());
                }
                vars.push(parse_set(rest).with_context(at)?);
                continue;
            }
            if !pending.is_empty() {
                pending.push(' ');
            }
            pending.push_str(line);
            if let Some(stmt) = pending.strip_suffix(';') {
                let stmt = stmt.trim().to_string();
                if stmt.contains(';') {
                    bail!("{}: more than one statement on a line", at());
                }
                statements.push(stmt);
                pending.clear();
            }
        }
        if !pending.is_empty() {
            bail!("{name}: the last statement has no `;`");
        }
        if statements.is_empty() {
            bail!("{name}: no statement");
        }
        let script = SeedScript {
            name: name.to_string(),
            vars,
            statements,
        };
        // Every :NAME must be set: catch it here, not at the first run.
        script.expand(&script.vars.iter().map(|v| v.low).collect::<Vec<_>>())?;
        Ok(script)
    }

    /// One value per variable, as pgbench draws them for one run.
    pub fn draw(&self, rng: &mut impl Rng) -> Vec<i64> {
        self.vars
            .iter()
            .map(|v| rng.gen_range(v.low..=v.high))
            .collect()
    }

    /// The statements of one run with `values[i]` for `vars[i]`.
    pub fn expand(&self, values: &[i64]) -> Result<Vec<String>> {
        if values.len() != self.vars.len() {
            bail!(
                "{}: {} values for {} variables",
                self.name,
                values.len(),
                self.vars.len()
            );
        }
        self.statements
            .iter()
            .map(|s| substitute(s, &self.vars, values).with_context(|| self.name.clone()))
            .collect()
    }
}

/// `set NAME random(LOW, HIGH)` (the leading backslash stripped).
fn parse_set(rest: &str) -> Result<RandomVar> {
    let mut words = rest.splitn(3, char::is_whitespace);
    let (Some("set"), Some(name), Some(expr)) = (words.next(), words.next(), words.next()) else {
        bail!("only `\\set NAME random(LOW, HIGH)` is understood, not `\\{rest}`");
    };
    let expr: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let args = expr
        .strip_prefix("random(")
        .and_then(|e| e.strip_suffix(')'))
        .with_context(|| format!("`\\set {name}`: only random(LOW, HIGH) is understood"))?;
    let (low, high) = args
        .split_once(',')
        .with_context(|| format!("`\\set {name}`: random needs two arguments"))?;
    let low: i64 = low
        .parse()
        .with_context(|| format!("`\\set {name}`: {low:?} is not an integer"))?;
    let high: i64 = high
        .parse()
        .with_context(|| format!("`\\set {name}`: {high:?} is not an integer"))?;
    if low > high {
        bail!("`\\set {name}`: random({low}, {high}) is empty");
    }
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("`\\set {name}`: not a variable name");
    }
    Ok(RandomVar {
        name: name.to_string(),
        low,
        high,
    })
}

/// Replaces `:NAME` (a whole identifier) by its value; `::type` casts stay.
fn substitute(stmt: &str, vars: &[RandomVar], values: &[i64]) -> Result<String> {
    let mut out = String::with_capacity(stmt.len() + 16);
    let mut rest = stmt;
    while let Some(i) = rest.find(':') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(cast) = after.strip_prefix(':') {
            out.push_str("::");
            rest = cast;
            continue;
        }
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let ident = &after[..len];
        if ident.is_empty() {
            out.push(':');
            rest = after;
            continue;
        }
        let Some(k) = vars.iter().position(|v| v.name == ident) else {
            bail!("`:{ident}` is never set in `{stmt}`");
        };
        // Parenthesised when negative so `:x+1` and `-:x` keep their meaning.
        if values[k] < 0 {
            out.push_str(&format!("({})", values[k]));
        } else {
            out.push_str(&values[k].to_string());
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const TEXT: &str = "-- comment\n\\set id1 random(1,30000)\n\\set id2 random( 5 , 5 )\n\n\
        insert into mm select 3*(random()*10000)::int+1, md5(random()::text), now();\n\
        update mm set info='x' where id=:id1;\n\
        delete from mm where id=:id1+1\n   or id = :id2;\n";

    #[test]
    fn parses_and_expands_like_pgbench() {
        let s = SeedScript::parse("t.sql", TEXT).unwrap();
        assert_eq!(s.vars.len(), 2);
        assert_eq!(s.vars[1].low, 5);
        assert_eq!(s.statements.len(), 3);
        let got = s.expand(&[42, 5]).unwrap();
        assert_eq!(
            got[0],
            "insert into mm select 3*(random()*10000)::int+1, md5(random()::text), now()"
        );
        assert_eq!(got[1], "update mm set info='x' where id=42");
        assert_eq!(got[2], "delete from mm where id=42+1 or id = 5");
        assert_eq!(
            s.expand(&[-3, 5]).unwrap()[2],
            "delete from mm where id=(-3)+1 or id = 5"
        );
        assert!(s.expand(&[1]).is_err());
    }

    #[test]
    fn draws_within_bounds() {
        let s = SeedScript::parse("t.sql", TEXT).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..1000 {
            let v = s.draw(&mut rng);
            assert!((1..=30000).contains(&v[0]));
            assert_eq!(v[1], 5);
        }
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        assert!(SeedScript::parse("t", "\\sleep 1\nselect 1;").is_err());
        assert!(SeedScript::parse("t", "\\set a random(1)\nselect :a;").is_err());
        assert!(SeedScript::parse("t", "\\set a random(3,1)\nselect :a;").is_err());
        assert!(SeedScript::parse("t", "select :nope;").is_err());
        assert!(SeedScript::parse("t", "select 1").is_err());
        assert!(SeedScript::parse("t", "").is_err());
    }

    #[test]
    fn the_seed_scripts_parse() {
        for name in crate::bench::SCRIPTS {
            let path = crate::pgbench::scripts_dir().join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            let s = SeedScript::parse(name, &text).unwrap();
            assert_eq!(s.vars.len(), 5, "{name}");
            assert_eq!(s.statements.len(), 12, "{name}");
            let run = s.expand(&[1, 2, 3, 4, 5]).unwrap();
            assert_eq!(run[10], "delete from mm where id=1+1");
            assert!(run.iter().all(|st| !st.contains(":id")), "{run:?}");
        }
    }
}
