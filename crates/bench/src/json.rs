//! A minimal JSON writer (the package has no serde_json outside its tests).

pub enum J {
    Null,
    Bool(bool),
    Num(f64),
    Int(i64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn obj() -> J {
        J::Obj(Vec::new())
    }
    /// Add a field (on an object).
    pub fn set(&mut self, k: &str, v: impl Into<J>) -> &mut J {
        if let J::Obj(f) = self {
            f.push((k.to_string(), v.into()));
        }
        self
    }
    pub fn render(&self, out: &mut String, indent: usize) {
        let pad = |n: usize| "  ".repeat(n);
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(x) if !x.is_finite() => out.push_str("null"),
            J::Num(x) => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    out.push_str(&format!("{}", *x as i64))
                } else {
                    out.push_str(format!("{:.6}", x).trim_end_matches('0'))
                }
            }
            J::Int(i) => out.push_str(&i.to_string()),
            J::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        '\t' => out.push_str("\\t"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            J::Arr(v) => {
                if v.is_empty() {
                    out.push_str("[]");
                    return;
                }
                let flat = v.iter().all(|x| matches!(x, J::Num(_) | J::Int(_) | J::Null | J::Bool(_)));
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    if !flat {
                        out.push('\n');
                        out.push_str(&pad(indent + 1));
                    }
                    x.render(out, indent + 1);
                }
                if !flat {
                    out.push('\n');
                    out.push_str(&pad(indent));
                }
                out.push(']');
            }
            J::Obj(f) => {
                if f.is_empty() {
                    out.push_str("{}");
                    return;
                }
                out.push('{');
                for (i, (k, v)) in f.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('\n');
                    out.push_str(&pad(indent + 1));
                    J::Str(k.clone()).render(out, indent + 1);
                    out.push_str(": ");
                    v.render(out, indent + 1);
                }
                out.push('\n');
                out.push_str(&pad(indent));
                out.push('}');
            }
        }
    }
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.render(&mut s, 0);
        s.push('\n');
        s
    }
}

impl From<f64> for J {
    fn from(x: f64) -> J {
        J::Num(x)
    }
}
impl From<u64> for J {
    fn from(x: u64) -> J {
        J::Int(x as i64)
    }
}
impl From<i64> for J {
    fn from(x: i64) -> J {
        J::Int(x)
    }
}
impl From<u32> for J {
    fn from(x: u32) -> J {
        J::Int(x as i64)
    }
}
impl From<bool> for J {
    fn from(x: bool) -> J {
        J::Bool(x)
    }
}
impl From<&str> for J {
    fn from(x: &str) -> J {
        J::Str(x.to_string())
    }
}
impl From<String> for J {
    fn from(x: String) -> J {
        J::Str(x)
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(x: Option<T>) -> J {
        x.map(Into::into).unwrap_or(J::Null)
    }
}
impl From<Vec<J>> for J {
    fn from(x: Vec<J>) -> J {
        J::Arr(x)
    }
}
