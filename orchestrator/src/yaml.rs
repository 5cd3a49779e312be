//! A YAML value tree where every node and mapping key carries its line and column.
//!
//! serde-saphyr parses; we keep our own tree (rather than deserialising straight into structs)
//! so that validation done after parsing (unknown keys, bad references, cycles) can still point
//! at the exact place in the file, and so `--set` overrides can be applied to the same tree.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::Spanned;

/// A place in a pipeline file (1-based), or `line == 0` for values given on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub const CLI: Pos = Pos { line: 0, col: 0 };
    pub fn is_cli(self) -> bool {
        self.line == 0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

impl Node {
    pub fn new(kind: Kind, pos: Pos) -> Node {
        Node { kind, pos }
    }

    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.kind {
            Kind::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.name == key).map(|(_, v)| v)
    }

    pub fn key_pos(&self, key: &str) -> Option<Pos> {
        self.as_map()?.iter().find(|(k, _)| k.name == key).map(|(k, _)| k.pos)
    }

    /// Position of a dotted path below this node (`params.lr`, `cmd.1`), falling back to the
    /// deepest node that exists so an error always points somewhere useful.
    pub fn locate(&self, path: &str) -> Pos {
        let mut node = self;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let next = match &node.kind {
                Kind::Map(m) => m.iter().find(|(k, _)| k.name == part).map(|(_, v)| v),
                Kind::Seq(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node.pos
    }

    /// A short name for the node's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a map",
        }
    }

    pub fn to_json(&self) -> Value {
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Int(i) => Value::from(*i),
            Kind::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
            Kind::Str(s) => Value::String(s.clone()),
            Kind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Map(m) => Value::Object(m.iter().map(|(k, v)| (k.name.clone(), v.to_json())).collect()),
        }
    }

    /// Build a node from a JSON value; every position is `pos` (used for interpolated values).
    pub fn from_json(v: &Value, pos: Pos) -> Node {
        let kind = match v {
            Value::Null => Kind::Null,
            Value::Bool(b) => Kind::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Kind::Int(i),
                None => Kind::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Kind::Str(s.clone()),
            Value::Array(a) => Kind::Seq(a.iter().map(|x| Node::from_json(x, pos)).collect()),
            Value::Object(o) => {
                Kind::Map(o.iter().map(|(k, v)| (Key { name: k.clone(), pos }, Node::from_json(v, pos))).collect())
            }
        };
        Node { kind, pos }
    }

    /// Set every position in this subtree (values from `--set` have no place in the file).
    pub fn with_pos(mut self, pos: Pos) -> Node {
        self.pos = pos;
        match &mut self.kind {
            Kind::Seq(items) => {
                for it in items.iter_mut() {
                    *it = std::mem::replace(it, Node::new(Kind::Null, pos)).with_pos(pos);
                }
            }
            Kind::Map(m) => {
                for (k, v) in m.iter_mut() {
                    k.pos = pos;
                    *v = std::mem::replace(v, Node::new(Kind::Null, pos)).with_pos(pos);
                }
            }
            _ => {}
        }
        self
    }
}

fn pos_of<T>(s: &Spanned<T>) -> Pos {
    Pos { line: s.referenced.line() as u32, col: s.referenced.column() as u32 }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Kind, E> {
        Ok(Kind::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Kind, E> {
        Ok(Kind::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
        i64::try_from(v).map(Kind::Int).map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Kind, E> {
        Ok(Kind::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Kind, E> {
        Ok(Kind::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Kind, E> {
        Ok(Kind::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_none<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(KindVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<SpannedKind>>()? {
            let pos = pos_of(&item);
            items.push(Node { kind: item.value.0, pos });
        }
        Ok(Kind::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut entries = Vec::new();
        // A key is the text written (`n`, `010`, `1.50`), never a boolean or a number.
        while let Some(k) = map.next_key::<Spanned<String>>()? {
            let kpos = pos_of(&k);
            let v = map.next_value::<Spanned<SpannedKind>>()?;
            let vpos = pos_of(&v);
            entries.push((Key { name: k.value, pos: kpos }, Node { kind: v.value.0, pos: vpos }));
        }
        Ok(Kind::Map(entries))
    }
}

/// Newtype so `Spanned<_>` can wrap our visitor's output.
struct SpannedKind(Kind);

impl<'de> Deserialize<'de> for SpannedKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor).map(SpannedKind)
    }
}

/// A YAML syntax or structure error, with where it happened when the parser knows.
#[derive(Debug, Clone)]
pub struct YamlError {
    pub message: String,
    pub pos: Option<Pos>,
}

fn options() -> serde_saphyr::Options {
    // Duplicate keys reach our visitor so we can name both places (a duplicate stage name is
    // a pipeline error with its own message); the budget bounds alias bombs. The YAML 1.2
    // Core schema: only `true`/`false` (any case) are booleans, so `n`, `y`, `on`, `off`,
    // `yes`, `no` stay the words written; a null-looking key (`~`) is its text.
    serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::PassThrough,
        strict_booleans: true,
        null_as_string: true,
    }
}

/// Parse one YAML document into a positioned tree.
pub fn parse(source: &str) -> Result<Node, YamlError> {
    match serde_saphyr::from_str_with_options::<Spanned<SpannedKind>>(source, options()) {
        Ok(root) => {
            let pos = pos_of(&root);
            let mut node = Node { kind: root.value.0, pos };
            integers_as_written(&mut node, source);
            Ok(node)
        }
        Err(e) => {
            let pos = e.location().map(|l| Pos { line: l.line() as u32, col: l.column() as u32 });
            Err(YamlError { message: first_line_message(&e.to_string()), pos })
        }
    }
}

/// YAML 1.2 Core reads a plain `010` or `-007` as an integer; serde-saphyr infers a float for
/// decimals with leading zeros. Only plain scalars become floats, so a float whose text in the
/// file is a decimal integer is turned back into that integer.
fn integers_as_written(node: &mut Node, source: &str) {
    match &mut node.kind {
        Kind::Float(_) => {
            let token = source
                .lines()
                .nth(node.pos.line.saturating_sub(1) as usize)
                .and_then(|l| l.get(node.pos.col.saturating_sub(1) as usize..))
                .map(|rest| rest.split(|c: char| c.is_whitespace() || ",]}#".contains(c)).next().unwrap_or(""));
            let digits = token.map(|t| t.trim_start_matches(['-', '+']));
            if digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
                if let Some(i) = token.and_then(|t| t.trim_start_matches('+').parse::<i64>().ok()) {
                    node.kind = Kind::Int(i);
                }
            }
        }
        Kind::Seq(items) => items.iter_mut().for_each(|n| integers_as_written(n, source)),
        Kind::Map(m) => m.iter_mut().for_each(|(_, n)| integers_as_written(n, source)),
        _ => {}
    }
}

/// serde-saphyr renders a snippet under its message; we render our own, so keep the message.
fn first_line_message(rendered: &str) -> String {
    let mut msg = rendered.lines().next().unwrap_or("invalid YAML").trim().to_string();
    if let Some(rest) = msg.strip_prefix("error: ") {
        msg = rest.to_string();
    }
    msg
}

/// Parse a `--set` value: YAML scalar or flow syntax (`7`, `true`, `[1, 2]`, `{a: 1}`, `text`).
pub fn parse_value(text: &str) -> Result<Node, YamlError> {
    if text.trim().is_empty() {
        return Ok(Node::new(Kind::Str(String::new()), Pos::CLI));
    }
    parse(text).map(|n| n.with_pos(Pos::CLI))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_and_values() {
        let src = "name: demo\nstages:\n  a:\n    kind: command\n    cmd: [\"x\", 1]\n";
        let root = parse(src).unwrap();
        assert_eq!(root.key_pos("stages"), Some(Pos { line: 2, col: 1 }));
        let a = root.get("stages").unwrap().get("a").unwrap();
        assert_eq!(a.get("kind").unwrap().pos, Pos { line: 4, col: 11 });
        assert_eq!(a.locate("cmd.1").line, 5);
        assert_eq!(a.get("cmd").unwrap().to_json(), serde_json::json!(["x", 1]));
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_caller() {
        let root = parse("a: 1\na: 2\n").unwrap();
        assert_eq!(root.as_map().unwrap().len(), 2);
    }

    #[test]
    fn syntax_error_has_location() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.is_some(), "{e:?}");
        assert!(!e.message.is_empty());
    }

    #[test]
    fn yaml_1_2_core_schema() {
        let root = parse("n: no\ny: off\non: yes\nNO: n\n010: 010\n1.50: 1.50\nt: True\nf: false\nx: 0x1F\n").unwrap();
        let map: Vec<(String, Kind)> =
            root.as_map().unwrap().iter().map(|(k, v)| (k.name.clone(), v.kind.clone())).collect();
        let s = |v: &str| Kind::Str(v.into());
        assert_eq!(
            map,
            vec![
                ("n".into(), s("no")),
                ("y".into(), s("off")),
                ("on".into(), s("yes")),
                ("NO".into(), s("n")),
                ("010".into(), Kind::Int(10)),
                ("1.50".into(), Kind::Float(1.5)),
                ("t".into(), Kind::Bool(true)),
                ("f".into(), Kind::Bool(false)),
                ("x".into(), Kind::Int(31)),
            ]
        );
        assert!(parse("[1, 2]: x\n").is_err(), "a key must be a plain value");
        let flow = parse("a: [007, -010, '010', 1.0, 2e3]\n").unwrap();
        assert_eq!(flow.get("a").unwrap().to_json(), serde_json::json!([7, -10, "010", 1.0, 2000.0]));
        assert_eq!(parse_value("010").unwrap().kind, Kind::Int(10));
    }

    #[test]
    fn cli_values() {
        assert_eq!(parse_value("7").unwrap().kind, Kind::Int(7));
        assert_eq!(parse_value("[1, 2]").unwrap().to_json(), serde_json::json!([1, 2]));
        assert_eq!(parse_value("hello world").unwrap().kind, Kind::Str("hello world".into()));
        assert!(parse_value("7").unwrap().pos.is_cli());
    }
}
