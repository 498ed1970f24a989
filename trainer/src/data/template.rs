//! Chat templates rendered like HF `tokenizer.apply_chat_template`: a Jinja sandbox with
//! `trim_blocks` and `lstrip_blocks`, the variables `messages`, `add_generation_prompt`,
//! `tools`/`documents` (none) and the tokenizer's special tokens, the functions
//! `raise_exception` and `strftime_now`, Python's `json.dumps` as `tojson`, and Python
//! string/dict methods (`.strip()`, `.startswith()`, `.items()`…) from minijinja-contrib.

use std::fmt::Write as _;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};

use super::error::SampleError;

const NAME: &str = "chat_template";

/// Special-token strings a template may refer to (`{{ bos_token }}`…); unset ones are
/// left undefined, as in transformers.
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
}

impl ChatTemplate {
    /// Compiles `source`; the error is minijinja's description of the syntax error.
    pub fn new(source: &str, tokens: TemplateTokens) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| e.to_string())?;
        Ok(Self { env, tokens })
    }

    /// Renders `messages` (each a JSON object passed as-is).
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, SampleError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| SampleError::Template(e.to_string()))?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        let t = &self.tokens;
        for (name, token) in [
            ("bos_token", &t.bos_token),
            ("eos_token", &t.eos_token),
            ("pad_token", &t.pad_token),
            ("unk_token", &t.unk_token),
        ] {
            if let Some(token) = token {
                ctx.push((name, Value::from(token.as_str())));
            }
        }
        template
            .render(Value::from_iter(ctx))
            .map_err(|e| SampleError::Template(e.to_string()))
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=.., separators=.., sort_keys=..)`,
/// which is what transformers installs as `tojson`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n.max(0)).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: bad indent",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&mut out, &json, 0);
    Ok(Value::from(out))
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, out: &mut String, v: &serde_json::Value, depth: usize) {
        use serde_json::Value as J;
        match v {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => out.push_str(&n.to_string()),
            J::String(s) => self.write_str(out, s),
            J::Array(items) if items.is_empty() => out.push_str("[]"),
            J::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i, depth + 1);
                    self.write(out, item, depth + 1);
                }
                self.newline(out, depth);
                out.push(']');
            }
            J::Object(map) if map.is_empty() => out.push_str("{}"),
            J::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separate(out, i, depth + 1);
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth + 1);
                }
                self.newline(out, depth);
                out.push('}');
            }
        }
    }

    fn separate(&self, out: &mut String, i: usize, depth: usize) {
        if i > 0 {
            out.push_str(&self.item_sep);
        }
        self.newline(out, depth);
    }

    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// `strftime_now(format)`: the current time formatted like Python's `strftime`. Uses UTC
/// (transformers uses local time); supports %Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = ((days + 3) % 7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokens() -> TemplateTokens {
        TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..TemplateTokens::default()
        }
    }

    #[test]
    fn renders_like_hf_with_trim_and_lstrip_blocks() {
        let src = "{{ bos_token }}{% for m in messages %}\n    {% if m['role'] == 'user' %}\n[U] {{ m['content'].strip() }}\n    {% else %}\n[A] {{ m.content }}{{ eos_token }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}[A]{% endif %}";
        let t = ChatTemplate::new(src, tokens()).expect("compile");
        let msgs = [
            json!({"role": "user", "content": "  hi  "}),
            json!({"role": "assistant", "content": "yo"}),
        ];
        assert_eq!(
            t.render(&msgs, false).expect("render"),
            "<s>[U] hi\n[A] yo</s>\n"
        );
        assert_eq!(
            t.render(&msgs[..1], true).expect("render"),
            "<s>[U] hi\n[A]"
        );
    }

    #[test]
    fn python_methods_and_unset_tokens() {
        let src = "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].role.startswith('us') }}|{{ pad_token is defined }}|{{ tools is none }}";
        let t = ChatTemplate::new(src, tokens()).expect("compile");
        let out = t
            .render(&[json!({"role": "user", "content": "x"})], false)
            .expect("render");
        // booleans print as in Python, like Jinja2
        assert_eq!(out, "content=x;role=user;True|False|True");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}ok";
        let t = ChatTemplate::new(src, tokens()).expect("compile");
        let err = t
            .render(&[json!({"role": "assistant", "content": "x"})], false)
            .expect_err("raise");
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate user/assistant"),
            "{err}"
        );
        assert!(ChatTemplate::new("{% for %}", tokens()).is_err());
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0].args | tojson }}|{{ messages[0].args | tojson(indent=2) }}|{{ messages[0].s | tojson }}";
        let t = ChatTemplate::new(src, tokens()).expect("compile");
        let msg = json!({"args": {"a": [1, "x"], "b": {}}, "s": "é\"<\n"});
        let out = t.render(&[msg], false).expect("render");
        // python: json.dumps({"a":[1,"x"],"b":{}}, ensure_ascii=False), then with indent=2
        assert_eq!(
            out,
            "{\"a\": [1, \"x\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    \"x\"\n  ],\n  \"b\": {}\n}|\"é\\\"<\\n\""
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday; python: datetime(2024,7,26,13,5,9).strftime(..)
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %H:%M:%S %I%p %j %y %%", t),
            "Friday July 26 13:05:09 01PM 208 24 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        assert!(ChatTemplate::new("{{ strftime_now('%Y') }}", tokens())
            .expect("compile")
            .render(&[json!({})], false)
            .expect("render")
            .starts_with("20"));
    }
}
