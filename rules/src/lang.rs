//! The rule expression language: lexer, parser and type checker.
//!
//! ```text
//! expr     := or
//! or       := and ("or" and)*
//! and      := unary ("and" unary)*
//! unary    := "not" unary | compare
//! compare  := value (("==" | "!=" | "<" | "<=" | ">" | ">=") value
//!                   | "contains" value | "~" string | "in" "[" value ("," value)* "]")?
//! value    := string | number | duration | "true" | "false" | field | call | "(" expr ")"
//! call     := count(expr [, duration]) | any(expr [, duration]) | since(expr)
//!           | attr(string) | segment(string) | num(text) | first_seen
//! duration := number ("s" | "m" | "h" | "d" | "w")          e.g. 30d, 12h
//! field    := type | url | url.host | url.path | ref | ref.host | q | src | ip | geo
//!           | geo.country | geo.region | geo.city | ua.browser | ua.os | ua.device | a.<name>
//! ```
//! Fields are properties of one event and exist only inside `count`, `any` and `since`, which
//! look at the user's events (cells of family `e` sharing a version). At the top level,
//! `attr("name")` is the newest value of custom attribute `name`, `first_seen` the time since the
//! user was first seen, and `segment("id")` another segment's result. `#` starts a comment.

use std::fmt;

/// A position in the source: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1 (characters).
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A syntax or type error in an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LangError {
    /// Where.
    pub pos: Pos,
    /// What.
    pub reason: String,
}

fn err<T>(pos: Pos, reason: impl Into<String>) -> Result<T, LangError> {
    Err(LangError {
        pos,
        reason: reason.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Dur(i64),
    Op(&'static str),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    End,
}

fn lex(src: &str) -> Result<Vec<(Tok, Pos)>, LangError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let advance = |i: &mut usize, line: &mut usize, col: &mut usize, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let pos = Pos { line, col };
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col, c);
            continue;
        }
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                let ch = chars[i];
                advance(&mut i, &mut line, &mut col, ch);
            }
            continue;
        }
        if c == '"' {
            advance(&mut i, &mut line, &mut col, c);
            let mut s = String::new();
            loop {
                let Some(&c) = chars.get(i) else {
                    return err(pos, "unterminated string");
                };
                advance(&mut i, &mut line, &mut col, c);
                match c {
                    '"' => break,
                    '\\' => {
                        let Some(&e) = chars.get(i) else {
                            return err(pos, "unterminated string");
                        };
                        advance(&mut i, &mut line, &mut col, e);
                        s.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    }
                    other => s.push(other),
                }
            }
            out.push((Tok::Str(s), pos));
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                let ch = chars[i];
                advance(&mut i, &mut line, &mut col, ch);
            }
            let text: String = chars[start..i].iter().collect();
            let n: f64 = match text.parse() {
                Ok(n) => n,
                Err(_) => return err(pos, format!("bad number {text:?}")),
            };
            let unit = chars.get(i).copied();
            let ms = match unit {
                Some('s') => Some(1_000.0),
                Some('m') => Some(60_000.0),
                Some('h') => Some(3_600_000.0),
                Some('d') => Some(86_400_000.0),
                Some('w') => Some(604_800_000.0),
                _ => None,
            };
            match ms {
                Some(ms) if !chars.get(i + 1).is_some_and(|c| c.is_alphanumeric()) => {
                    advance(&mut i, &mut line, &mut col, unit.expect("some"));
                    out.push((Tok::Dur((n * ms) as i64), pos));
                }
                _ if unit.is_some_and(|c| c.is_alphabetic()) => {
                    return err(
                        pos,
                        format!("unknown duration unit after {text} (use s, m, h, d or w)"),
                    )
                }
                _ => out.push((Tok::Num(n), pos)),
            }
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '-'))
            {
                let ch = chars[i];
                advance(&mut i, &mut line, &mut col, ch);
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), pos));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op = match two.as_str() {
            "==" => Some("=="),
            "!=" => Some("!="),
            "<=" => Some("<="),
            ">=" => Some(">="),
            _ => None,
        };
        if let Some(op) = op {
            advance(&mut i, &mut line, &mut col, c);
            let ch = chars[i];
            advance(&mut i, &mut line, &mut col, ch);
            out.push((Tok::Op(op), pos));
            continue;
        }
        let tok = match c {
            '<' => Tok::Op("<"),
            '>' => Tok::Op(">"),
            '~' => Tok::Op("~"),
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            ',' => Tok::Comma,
            '=' => return err(pos, "use == to compare"),
            other => return err(pos, format!("unexpected character {other:?}")),
        };
        advance(&mut i, &mut line, &mut col, c);
        out.push((tok, pos));
    }
    out.push((Tok::End, Pos { line, col }));
    Ok(out)
}

/// The qualifiers every event may have, resolved to fixed slots when a rule is parsed (so an
/// evaluation never searches cells by name for them).
/// `ua` holds the agent's dictionary id and its parts ([`UA_PARTS`]); rows written before the
/// parts moved into it have them as cells `ua.br`, `ua.os` and `ua.dev` (slots 7-9).
pub const SLOTS: [&str; 11] = [
    "type", "url", "ref", "q", "src", "ip", "geo", "ua.br", "ua.os", "ua.dev", "ua",
];

/// The parts of the user agent, in the order the `e:ua` cell holds them after its 8-byte id
/// (each ended by a 0 byte), and the qualifiers of the cells older rows hold them in.
pub const UA_PARTS: [&str; 3] = ["ua.br", "ua.os", "ua.dev"];

/// The slot of a well-known qualifier.
pub fn slot_of(qualifier: &str) -> Option<usize> {
    // A match (the compiler switches on length first) rather than ten string compares: this runs
    // for every cell of every evaluation.
    let slot = match qualifier {
        "type" => 0,
        "url" => 1,
        "ref" => 2,
        "q" => 3,
        "src" => 4,
        "ip" => 5,
        "geo" => 6,
        "ua.br" => 7,
        "ua.os" => 8,
        "ua.dev" => 9,
        "ua" => 10,
        _ => return None,
    };
    debug_assert_eq!(SLOTS[slot], qualifier);
    Some(slot)
}

const SLOT_URL: usize = 1;
const SLOT_REF: usize = 2;
/// The slot of `ua`.
pub const SLOT_UA: usize = 10;

/// A field of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A well-known cell of family `e`, by slot (see [`SLOTS`]).
    Slot(usize),
    /// Any other cell of family `e` (custom attributes `a.<name>`), by qualifier.
    Cell(String),
    /// The host of the URL in a slot (`url.host`, `ref.host`).
    Host(usize),
    /// The path of the URL in a slot.
    Path(usize),
    /// A part of `geo` (0 country, 1 region, 2 city).
    Geo(usize),
    /// A part of the user agent (0 browser, 1 OS, 2 device class; [`UA_PARTS`]).
    Ua(usize),
}

fn cell_field(qualifier: &str) -> Field {
    match slot_of(qualifier) {
        Some(s) => Field::Slot(s),
        None => Field::Cell(qualifier.to_string()),
    }
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// ==
    Eq,
    /// !=
    Ne,
    /// <
    Lt,
    /// <=
    Le,
    /// >
    Gt,
    /// >=
    Ge,
}

/// The type of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// true / false.
    Bool,
    /// A number.
    Num,
    /// Text.
    Str,
    /// A duration (ms).
    Dur,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Bool => "a condition",
            Type::Num => "a number",
            Type::Str => "text",
            Type::Dur => "a duration",
        })
    }
}

/// A checked expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// A literal condition.
    Bool(bool),
    /// A literal number.
    Num(f64),
    /// A literal string.
    Str(String),
    /// A literal duration (ms).
    Dur(i64),
    /// A field of the current event.
    Field(Field),
    /// The newest value of a custom attribute.
    Attr(String),
    /// Time since first seen (ms).
    FirstSeen,
    /// Another segment's result.
    Segment(String),
    /// not.
    Not(Box<Expr>),
    /// and.
    And(Vec<Expr>),
    /// or.
    Or(Vec<Expr>),
    /// A comparison.
    Cmp(Box<Expr>, CmpOp, Box<Expr>),
    /// Substring.
    Contains(Box<Expr>, Box<Expr>),
    /// Regular expression match.
    Matches(Box<Expr>, regex::Regex),
    /// Membership in a literal list.
    In(Box<Expr>, Vec<Expr>),
    /// Events matching a condition within a window (None: all history).
    Count(Box<Cond>, Option<i64>),
    /// At least one event matching within a window.
    Any(Box<Cond>, Option<i64>),
    /// Time since the newest event matching (ms); infinite when none.
    Since(Box<Cond>),
    /// Text as a number (missing when it is not one).
    ToNum(Box<Expr>),
}

/// An event condition (the argument of `count`, `any`, `since`), with its compiled form: the
/// aggregates test it against every event of the window, so it is the hot path of evaluation.
#[derive(Debug, Clone)]
pub struct Cond {
    /// The checked expression.
    pub expr: Expr,
    /// The same, compiled.
    pub(crate) pred: Pred,
    /// Which parsed condition this is: unique per parse, shared by its clones (the pruning's
    /// copy of a rule's condition is the same condition).
    pub(crate) id: u64,
    /// Whether its answer for an event depends on that event alone (no aggregate, attribute,
    /// `first_seen` or segment inside): then one answer per event serves every rule and the
    /// pruning ([`crate::eval::UserView`] remembers the matches found).
    pub(crate) event_local: bool,
}

impl Cond {
    fn new(expr: Expr) -> Cond {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let pred = Pred::compile(&expr);
        let mut event_local = true;
        visit(&expr, &mut |x| {
            if matches!(
                x,
                Expr::Count(..)
                    | Expr::Any(..)
                    | Expr::Since(..)
                    | Expr::Attr(_)
                    | Expr::FirstSeen
                    | Expr::Segment(_)
            ) {
                event_local = false;
            }
        });
        Cond {
            expr,
            pred,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            event_local,
        }
    }
}

/// A compiled event condition: the common shapes (a field against literals, substring, prefix,
/// regex, and / or / not of those) tested without building intermediate values; anything else
/// falls back to the expression interpreter.
#[derive(Debug, Clone)]
pub(crate) enum Pred {
    Const(bool),
    /// `field == lit` (`eq`) or `field != lit`; a missing field is false either way.
    Eq {
        field: Field,
        lit: Box<str>,
        eq: bool,
    },
    /// `field in [lits]`.
    In {
        field: Field,
        lits: Box<[Box<str>]>,
    },
    /// `field contains needle` (the needle lowercased at parse time, the field lowercased).
    Contains {
        field: Field,
        needle: Box<str>,
    },
    /// `field ~ "^literal"`: a regex that is only an anchored literal.
    Prefix {
        field: Field,
        lit: Box<str>,
    },
    /// `field ~ re`.
    Regex {
        field: Field,
        re: regex::Regex,
    },
    And(Box<[Pred]>),
    Or(Box<[Pred]>),
    Not(Box<Pred>),
    /// Interpreted.
    Expr(Box<Expr>),
}

impl Pred {
    fn compile(e: &Expr) -> Pred {
        match e {
            Expr::Bool(b) => Pred::Const(*b),
            Expr::And(xs) => Pred::And(xs.iter().map(Pred::compile).collect()),
            Expr::Or(xs) => Pred::Or(xs.iter().map(Pred::compile).collect()),
            Expr::Not(x) => Pred::Not(Box::new(Pred::compile(x))),
            Expr::Cmp(a, op @ (CmpOp::Eq | CmpOp::Ne), b) => match (a.as_ref(), b.as_ref()) {
                (Expr::Field(f), Expr::Str(s)) | (Expr::Str(s), Expr::Field(f)) => Pred::Eq {
                    field: f.clone(),
                    lit: s.as_str().into(),
                    eq: *op == CmpOp::Eq,
                },
                _ => Pred::Expr(Box::new(e.clone())),
            },
            Expr::In(a, items) => match (a.as_ref(), literal_strs(items)) {
                (Expr::Field(f), Some(lits)) => Pred::In {
                    field: f.clone(),
                    lits,
                },
                _ => Pred::Expr(Box::new(e.clone())),
            },
            Expr::Contains(a, b) => match (a.as_ref(), b.as_ref()) {
                (Expr::Field(f), Expr::Str(s)) => Pred::Contains {
                    field: f.clone(),
                    needle: s.as_str().into(),
                },
                _ => Pred::Expr(Box::new(e.clone())),
            },
            Expr::Matches(a, re) => match a.as_ref() {
                Expr::Field(f) => match anchored_literal(re.as_str()) {
                    Some(lit) => Pred::Prefix {
                        field: f.clone(),
                        lit: lit.into(),
                    },
                    None => Pred::Regex {
                        field: f.clone(),
                        re: re.clone(),
                    },
                },
                _ => Pred::Expr(Box::new(e.clone())),
            },
            _ => Pred::Expr(Box::new(e.clone())),
        }
    }
}

fn literal_strs(items: &[Expr]) -> Option<Box<[Box<str>]>> {
    items
        .iter()
        .map(|i| match i {
            Expr::Str(s) => Some(s.as_str().into()),
            _ => None,
        })
        .collect()
}

/// `^literal` with no regex syntax after the anchor: the literal.
fn anchored_literal(pattern: &str) -> Option<&str> {
    let lit = pattern.strip_prefix('^')?;
    (!lit.is_empty() && regex::escape(lit) == lit).then_some(lit)
}

struct Parser {
    toks: Vec<(Tok, Pos)>,
    at: usize,
}

/// Where an expression is being checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    User,
    Event,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.at].0
    }
    fn pos(&self) -> Pos {
        self.toks[self.at].1
    }
    fn next(&mut self) -> (Tok, Pos) {
        let t = self.toks[self.at].clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        t
    }
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s == kw)
    }
    fn expect(&mut self, tok: Tok, what: &str) -> Result<Pos, LangError> {
        let (t, pos) = self.next();
        if t == tok {
            Ok(pos)
        } else {
            err(pos, format!("expected {what}, found {}", describe(&t)))
        }
    }

    fn or(&mut self, scope: Scope) -> Result<(Expr, Type, Pos), LangError> {
        let (first, ty, pos) = self.and(scope)?;
        if !self.is_kw("or") {
            return Ok((first, ty, pos));
        }
        want(ty, Type::Bool, pos, "`or` joins conditions")?;
        let mut all = vec![first];
        while self.is_kw("or") {
            self.next();
            let (e, t, p) = self.and(scope)?;
            want(t, Type::Bool, p, "`or` joins conditions")?;
            all.push(e);
        }
        Ok((Expr::Or(all), Type::Bool, pos))
    }

    fn and(&mut self, scope: Scope) -> Result<(Expr, Type, Pos), LangError> {
        let (first, ty, pos) = self.unary(scope)?;
        if !self.is_kw("and") {
            return Ok((first, ty, pos));
        }
        want(ty, Type::Bool, pos, "`and` joins conditions")?;
        let mut all = vec![first];
        while self.is_kw("and") {
            self.next();
            let (e, t, p) = self.unary(scope)?;
            want(t, Type::Bool, p, "`and` joins conditions")?;
            all.push(e);
        }
        Ok((Expr::And(all), Type::Bool, pos))
    }

    fn unary(&mut self, scope: Scope) -> Result<(Expr, Type, Pos), LangError> {
        if self.is_kw("not") {
            let (_, pos) = self.next();
            let (e, t, p) = self.unary(scope)?;
            want(t, Type::Bool, p, "`not` takes a condition")?;
            return Ok((Expr::Not(Box::new(e)), Type::Bool, pos));
        }
        self.compare(scope)
    }

    fn compare(&mut self, scope: Scope) -> Result<(Expr, Type, Pos), LangError> {
        let (left, lt, pos) = self.value(scope)?;
        let op = match self.peek().clone() {
            Tok::Op("~") => {
                self.next();
                want(lt, Type::Str, pos, "`~` matches text")?;
                let (t, p) = self.next();
                let Tok::Str(pattern) = t else {
                    return err(p, "`~` takes a regular expression in quotes");
                };
                let re = regex::Regex::new(&pattern).map_err(|e| LangError {
                    pos: p,
                    reason: format!("bad regular expression: {e}"),
                })?;
                return Ok((Expr::Matches(Box::new(left), re), Type::Bool, pos));
            }
            Tok::Ident(k) if k == "contains" => {
                self.next();
                want(lt, Type::Str, pos, "`contains` looks inside text")?;
                let (right, rt, rp) = self.value(scope)?;
                want(rt, Type::Str, rp, "`contains` takes text")?;
                // Case-insensitive: a literal needle is lowercased once, here.
                let right = match right {
                    Expr::Str(s) => Expr::Str(s.to_lowercase()),
                    other => other,
                };
                return Ok((
                    Expr::Contains(Box::new(left), Box::new(right)),
                    Type::Bool,
                    pos,
                ));
            }
            Tok::Ident(k) if k == "in" => {
                self.next();
                self.expect(Tok::LBracket, "[ after in")?;
                let mut items = Vec::new();
                loop {
                    let (e, t, p) = self.value(scope)?;
                    if t != lt {
                        return err(p, format!("list item is {t}, but the left side is {lt}"));
                    }
                    items.push(e);
                    match self.next() {
                        (Tok::Comma, _) => continue,
                        (Tok::RBracket, _) => break,
                        (t, p) => {
                            return err(p, format!("expected , or ], found {}", describe(&t)))
                        }
                    }
                }
                return Ok((Expr::In(Box::new(left), items), Type::Bool, pos));
            }
            Tok::Op(o) => match o {
                "==" => CmpOp::Eq,
                "!=" => CmpOp::Ne,
                "<" => CmpOp::Lt,
                "<=" => CmpOp::Le,
                ">" => CmpOp::Gt,
                ">=" => CmpOp::Ge,
                _ => return Ok((left, lt, pos)),
            },
            _ => return Ok((left, lt, pos)),
        };
        let (_, op_pos) = self.next();
        let (right, rt, rp) = self.value(scope)?;
        if lt != rt {
            return err(rp, format!("cannot compare {lt} with {rt}"));
        }
        if lt == Type::Bool && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
            return err(op_pos, "conditions can only be compared with == or !=");
        }
        Ok((
            Expr::Cmp(Box::new(left), op, Box::new(right)),
            Type::Bool,
            pos,
        ))
    }

    fn window(&mut self) -> Result<Option<i64>, LangError> {
        if *self.peek() == Tok::Comma {
            self.next();
            match self.next() {
                (Tok::Dur(ms), _) if ms > 0 => Ok(Some(ms)),
                (t, p) => err(
                    p,
                    format!("expected a window such as 30d, found {}", describe(&t)),
                ),
            }
        } else {
            Ok(None)
        }
    }

    fn event_condition(&mut self, scope: Scope, name: &str, pos: Pos) -> Result<Expr, LangError> {
        if scope == Scope::Event {
            return err(
                pos,
                format!("{name}() cannot be nested inside another count/any/since"),
            );
        }
        let (e, t, p) = self.or(Scope::Event)?;
        want(
            t,
            Type::Bool,
            p,
            &format!("{name}() takes a condition on events"),
        )?;
        Ok(e)
    }

    fn value(&mut self, scope: Scope) -> Result<(Expr, Type, Pos), LangError> {
        let (tok, pos) = self.next();
        match tok {
            Tok::Str(s) => Ok((Expr::Str(s), Type::Str, pos)),
            Tok::Num(n) => Ok((Expr::Num(n), Type::Num, pos)),
            Tok::Dur(d) => Ok((Expr::Dur(d), Type::Dur, pos)),
            Tok::LParen => {
                let e = self.or(scope)?;
                self.expect(Tok::RParen, ")")?;
                Ok(e)
            }
            Tok::Ident(name) => self.ident(name, pos, scope),
            other => err(pos, format!("expected a value, found {}", describe(&other))),
        }
    }

    fn string_arg(&mut self, f: &str) -> Result<String, LangError> {
        self.expect(Tok::LParen, &format!("( after {f}"))?;
        let (t, p) = self.next();
        let Tok::Str(s) = t else {
            return err(p, format!("{f}() takes a name in quotes"));
        };
        self.expect(Tok::RParen, ")")?;
        Ok(s)
    }

    fn ident(
        &mut self,
        name: String,
        pos: Pos,
        scope: Scope,
    ) -> Result<(Expr, Type, Pos), LangError> {
        let is_call = *self.peek() == Tok::LParen;
        match (name.as_str(), is_call) {
            ("true", false) => return Ok((Expr::Bool(true), Type::Bool, pos)),
            ("false", false) => return Ok((Expr::Bool(false), Type::Bool, pos)),
            ("count" | "any", true) => {
                self.next();
                let cond = self.event_condition(scope, &name, pos)?;
                let window = self.window()?;
                self.expect(Tok::RParen, ")")?;
                return Ok(if name == "count" {
                    (
                        Expr::Count(Box::new(Cond::new(cond)), window),
                        Type::Num,
                        pos,
                    )
                } else {
                    (
                        Expr::Any(Box::new(Cond::new(cond)), window),
                        Type::Bool,
                        pos,
                    )
                });
            }
            ("since", true) => {
                self.next();
                let cond = self.event_condition(scope, &name, pos)?;
                self.expect(Tok::RParen, ")")?;
                return Ok((Expr::Since(Box::new(Cond::new(cond))), Type::Dur, pos));
            }
            ("attr", true) => {
                let a = self.string_arg("attr")?;
                if scope == Scope::Event {
                    return Ok((Expr::Field(Field::Cell(format!("a.{a}"))), Type::Str, pos));
                }
                return Ok((Expr::Attr(a), Type::Str, pos));
            }
            ("segment", true) => {
                let s = self.string_arg("segment")?;
                if scope == Scope::Event {
                    return err(pos, "segment() is a property of the user, not of an event");
                }
                return Ok((Expr::Segment(s), Type::Bool, pos));
            }
            ("num", true) => {
                self.next();
                let (e, t, p) = self.or(scope)?;
                want(t, Type::Str, p, "num() turns text into a number")?;
                self.expect(Tok::RParen, ")")?;
                return Ok((Expr::ToNum(Box::new(e)), Type::Num, pos));
            }
            ("first_seen", false) => {
                if scope == Scope::Event {
                    return err(pos, "first_seen is a property of the user, not of an event");
                }
                return Ok((Expr::FirstSeen, Type::Dur, pos));
            }
            (_, true) => {
                return err(
                    pos,
                    format!(
                    "unknown function {name}() (functions: count, any, since, attr, segment, num)"
                ),
                )
            }
            _ => {}
        }
        let field = match name.as_str() {
            "type" | "url" | "ref" | "q" | "src" | "ip" | "geo" => cell_field(&name),
            "url.host" => Field::Host(SLOT_URL),
            "ref.host" => Field::Host(SLOT_REF),
            "url.path" => Field::Path(SLOT_URL),
            "geo.country" => Field::Geo(0),
            "geo.region" => Field::Geo(1),
            "geo.city" => Field::Geo(2),
            "ua.browser" => Field::Ua(0),
            "ua.os" => Field::Ua(1),
            "ua.device" => Field::Ua(2),
            n if n.starts_with("a.") && n.len() > 2 => Field::Cell(n.to_string()),
            _ => {
                return err(
                    pos,
                    format!(
                        "unknown name {name:?} (fields: type, url, url.host, url.path, ref, ref.host, q, src, ip, geo, geo.country, geo.region, geo.city, ua.browser, ua.os, ua.device, a.<attr>)"
                    ),
                )
            }
        };
        if scope == Scope::User {
            return err(
                pos,
                format!("field {name} is a property of an event: use it inside count(), any() or since(), or use attr(\"…\") for the user's attributes"),
            );
        }
        Ok((Expr::Field(field), Type::Str, pos))
    }
}

fn want(got: Type, want: Type, pos: Pos, ctx: &str) -> Result<(), LangError> {
    if got == want {
        Ok(())
    } else {
        err(pos, format!("{ctx}, but this is {got}"))
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("{s:?}"),
        Tok::Str(s) => format!("text {s:?}"),
        Tok::Num(n) => format!("number {n}"),
        Tok::Dur(d) => format!("duration of {d} ms"),
        Tok::Op(o) => format!("`{o}`"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::LBracket => "`[`".into(),
        Tok::RBracket => "`]`".into(),
        Tok::Comma => "`,`".into(),
        Tok::End => "the end of the rule".into(),
    }
}

/// Parses and checks a rule condition: it must be a condition on the user.
pub fn parse(src: &str) -> Result<Expr, LangError> {
    let toks = lex(src)?;
    let mut p = Parser { toks, at: 0 };
    if *p.peek() == Tok::End {
        return err(p.pos(), "the rule is empty");
    }
    let (e, t, pos) = p.or(Scope::User)?;
    want(t, Type::Bool, pos, "a rule must be a condition")?;
    let (tok, pos) = p.next();
    if tok != Tok::End {
        return err(
            pos,
            format!("unexpected {} (missing `and` / `or`?)", describe(&tok)),
        );
    }
    Ok(e)
}

/// Calls `f` on `e` and on every expression inside it, conditions of aggregates included.
pub fn visit(e: &Expr, f: &mut impl FnMut(&Expr)) {
    f(e);
    match e {
        Expr::Count(c, _) | Expr::Any(c, _) | Expr::Since(c) => visit(&c.expr, f),
        Expr::Not(x) | Expr::ToNum(x) | Expr::Matches(x, _) => visit(x, f),
        Expr::And(v) | Expr::Or(v) => v.iter().for_each(|x| visit(x, f)),
        Expr::Cmp(a, _, b) | Expr::Contains(a, b) => {
            visit(a, f);
            visit(b, f);
        }
        Expr::In(a, v) => {
            visit(a, f);
            v.iter().for_each(|x| visit(x, f));
        }
        Expr::Bool(_)
        | Expr::Num(_)
        | Expr::Str(_)
        | Expr::Dur(_)
        | Expr::Field(_)
        | Expr::Attr(_)
        | Expr::FirstSeen
        | Expr::Segment(_) => {}
    }
}

/// The qualifiers of family `e` an expression reads from events (with repeats).
pub fn event_qualifiers(e: &Expr, out: &mut Vec<String>) {
    visit(e, &mut |x| {
        if let Expr::Field(f) = x {
            let q = match f {
                Field::Slot(s) | Field::Host(s) | Field::Path(s) => SLOTS[*s],
                Field::Geo(_) => SLOTS[6],
                Field::Ua(part) => {
                    // Older rows hold the part in a cell of its own.
                    out.push(UA_PARTS[*part].to_string());
                    SLOTS[SLOT_UA]
                }
                Field::Cell(q) => q.as_str(),
            };
            out.push(q.to_string());
        }
    });
}

/// The ids of the segments an expression refers to.
pub fn segment_refs(e: &Expr, out: &mut Vec<String>) {
    visit(e, &mut |x| {
        if let Expr::Segment(s) = x {
            out.push(s.clone());
        }
    });
}
