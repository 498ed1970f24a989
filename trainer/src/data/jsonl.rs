//! Reading a JSONL dataset into [`RawSample`]s, one per non-blank line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use super::error::{DataError, SampleError};

/// One dataset line, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum RawSample {
    /// `{"messages": [{"role": .., "content": ..}, ..]}`; every message object is passed
    /// to the chat template as-is (extra keys such as `tool_calls` included).
    Messages(Vec<Value>),
    /// `{"prompt": "..", "completion": ".."}`; only the completion is supervised.
    PromptCompletion { prompt: String, completion: String },
    /// `{"text": ".."}`; everything is supervised.
    Text(String),
    /// `{"input_ids": [..], "labels": [..]}`, already tokenized; `labels` (-100 = ignore)
    /// is optional and defaults to `input_ids`.
    Tokens {
        input_ids: Vec<u32>,
        labels: Option<Vec<i64>>,
    },
}

/// The label value that the loss ignores (HF/PyTorch `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Reads every non-blank line of `path`; each item is `(1-based line number, sample)`.
/// Any wrong line is an error naming the file and the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, RawSample)>, DataError> {
    let mut samples = Vec::new();
    visit_jsonl(path, |line, sample| {
        samples.push((line, sample));
        true
    })?;
    Ok(samples)
}

/// Parses the samples of `path` in order, handing each (with its 1-based line number) to
/// `visit`, which returns `false` to stop reading early.
pub fn visit_jsonl(
    path: &Path,
    mut visit: impl FnMut(usize, RawSample) -> bool,
) -> Result<(), DataError> {
    let io_err = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
            break;
        }
        line_no += 1;
        let parsed = std::str::from_utf8(&buf)
            .map_err(|e| SampleError::Json(format!("not valid UTF-8: {e}")))
            .and_then(|text| {
                let text = text.trim_start_matches('\u{feff}').trim();
                if text.is_empty() {
                    Ok(None)
                } else {
                    parse_line(text).map(Some)
                }
            });
        match parsed {
            Ok(Some(sample)) => {
                if !visit(line_no, sample) {
                    break;
                }
            }
            Ok(None) => {}
            Err(source) => {
                return Err(DataError::Sample {
                    path: path.to_path_buf(),
                    line: line_no,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Parses one JSONL line. Keys are tried in the order `input_ids`, `messages`,
/// `prompt`/`completion`, `text` (TRL treats a dataset with `input_ids` as already
/// processed); other keys are ignored.
pub fn parse_line(line: &str) -> Result<RawSample, SampleError> {
    let value: Value = serde_json::from_str(line).map_err(|e| SampleError::Json(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(SampleError::UnknownFormat);
    };
    if let Some(ids) = obj.get("input_ids") {
        return parse_tokens(ids, obj.get("labels"));
    }
    if let Some(messages) = obj.get("messages") {
        return parse_messages(messages);
    }
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(prompt), Some(completion)) => {
            return Ok(RawSample::PromptCompletion {
                prompt: string_field("prompt", prompt)?,
                completion: string_field("completion", completion)?,
            })
        }
        (Some(_), None) => {
            return Err(SampleError::MissingKey {
                present: "prompt",
                missing: "completion",
            })
        }
        (None, Some(_)) => {
            return Err(SampleError::MissingKey {
                present: "completion",
                missing: "prompt",
            })
        }
        (None, None) => {}
    }
    if let Some(text) = obj.get("text") {
        return Ok(RawSample::Text(string_field("text", text)?));
    }
    Err(SampleError::UnknownFormat)
}

fn string_field(key: &str, value: &Value) -> Result<String, SampleError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(_) if key != "text" => Err(SampleError::WrongType {
            key: key.to_string(),
            expected:
                "a string (conversational prompt/completion is not supported; use `messages`)",
        }),
        _ => Err(SampleError::WrongType {
            key: key.to_string(),
            expected: "a string",
        }),
    }
}

fn parse_messages(value: &Value) -> Result<RawSample, SampleError> {
    let wrong = |key: String, expected| SampleError::WrongType { key, expected };
    let messages = match value {
        Value::Array(m) if !m.is_empty() => m,
        _ => {
            return Err(wrong(
                "messages".into(),
                "a non-empty array of message objects",
            ))
        }
    };
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(m) = message else {
            return Err(wrong(
                format!("messages[{i}]"),
                "an object with `role` and `content`",
            ));
        };
        match m.get("role") {
            Some(Value::String(_)) => {}
            _ => return Err(wrong(format!("messages[{i}].role"), "a string")),
        }
        match m.get("content") {
            None | Some(Value::String(_) | Value::Array(_) | Value::Null) => {}
            Some(_) => {
                return Err(wrong(
                    format!("messages[{i}].content"),
                    "a string, a list of content parts, or null",
                ))
            }
        }
    }
    Ok(RawSample::Messages(messages.clone()))
}

fn parse_tokens(ids: &Value, labels: Option<&Value>) -> Result<RawSample, SampleError> {
    let Value::Array(ids) = ids else {
        return Err(SampleError::WrongType {
            key: "input_ids".into(),
            expected: "an array of token ids",
        });
    };
    let input_ids = ids
        .iter()
        .enumerate()
        .map(|(index, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| SampleError::BadTokenId {
                    index,
                    value: v.to_string(),
                })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let labels = match labels {
        None | Some(Value::Null) => None,
        Some(Value::Array(labels)) => {
            if labels.len() != input_ids.len() {
                return Err(SampleError::LabelsLength {
                    input_ids: input_ids.len(),
                    labels: labels.len(),
                });
            }
            let parsed = labels
                .iter()
                .enumerate()
                .map(|(index, v)| match v.as_i64() {
                    Some(l) if l == IGNORE_INDEX || (0..=i64::from(u32::MAX)).contains(&l) => Ok(l),
                    _ => Err(SampleError::BadLabel {
                        index,
                        value: v.to_string(),
                    }),
                })
                .collect::<Result<Vec<i64>, _>>()?;
            Some(parsed)
        }
        Some(_) => {
            return Err(SampleError::WrongType {
                key: "labels".into(),
                expected: "an array of token ids or -100",
            })
        }
    };
    Ok(RawSample::Tokens { input_ids, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train.jsonl");
        std::fs::write(&path, lines).expect("write");
        (dir, path)
    }

    #[test]
    fn reads_every_format_with_line_numbers() {
        let (_dir, path) = write(
            "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\",\"name\":\"x\"}]}\n\n  \n\
             {\"prompt\":\"a\",\"completion\":\"b\",\"id\":7}\r\n\
             {\"text\":\"t\"}\n\
             {\"input_ids\":[1,2,3]}\n\
             {\"input_ids\":[1,2],\"labels\":[-100,2]}",
        );
        let got = read_jsonl(&path).expect("read");
        let lines: Vec<usize> = got.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![1, 4, 5, 6, 7]);
        match &got[0].1 {
            RawSample::Messages(m) => assert_eq!(m[0]["name"], "x"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            got[1].1,
            RawSample::PromptCompletion {
                prompt: "a".into(),
                completion: "b".into()
            }
        );
        assert_eq!(got[2].1, RawSample::Text("t".into()));
        assert_eq!(
            got[3].1,
            RawSample::Tokens {
                input_ids: vec![1, 2, 3],
                labels: None
            }
        );
        assert_eq!(
            got[4].1,
            RawSample::Tokens {
                input_ids: vec![1, 2],
                labels: Some(vec![-100, 2])
            }
        );
    }

    fn error_of(lines: &str) -> String {
        let (_dir, path) = write(lines);
        match read_jsonl(&path) {
            Err(e) => e.to_string(),
            Ok(v) => panic!("expected an error, got {v:?}"),
        }
    }

    #[test]
    fn errors_name_file_and_line() {
        let msg = error_of("{\"text\":\"ok\"}\n\n{\"text\": \"unterminated}\n");
        assert!(msg.contains("train.jsonl:3: invalid JSON"), "{msg}");
        let msg = error_of("{\"text\":\"ok\"}\n{\"foo\":1}\n");
        assert!(
            msg.ends_with(
                "train.jsonl:2: expected one of messages, prompt/completion, text, input_ids"
            ),
            "{msg}"
        );
        let msg = error_of("[1,2]\n");
        assert!(msg.contains("train.jsonl:1: expected one of"), "{msg}");
    }

    #[test]
    fn rejects_wrong_types_and_values() {
        let cases = [
            ("{\"text\": 3}", "`text`: expected a string"),
            ("{\"prompt\": \"a\"}", "has `prompt` but no `completion`"),
            (
                "{\"messages\": []}",
                "`messages`: expected a non-empty array",
            ),
            (
                "{\"messages\": [{\"content\": \"x\"}]}",
                "`messages[0].role`: expected a string",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": 1}]}",
                "`messages[0].content`",
            ),
            (
                "{\"input_ids\": [1, -2]}",
                "`input_ids[1]` = -2 is not a token id",
            ),
            ("{\"input_ids\": [1, 2.5]}", "`input_ids[1]` = 2.5"),
            (
                "{\"input_ids\": [4294967296]}",
                "`input_ids[0]` = 4294967296",
            ),
            (
                "{\"input_ids\": [1, 2], \"labels\": [1]}",
                "`labels` has 1 entries but `input_ids` has 2",
            ),
            (
                "{\"input_ids\": [1, 2], \"labels\": [1, -1]}",
                "`labels[1]` = -1",
            ),
            ("{\"input_ids\": \"1 2\"}", "`input_ids`: expected an array"),
        ];
        for (line, want) in cases {
            let msg = error_of(&format!("{{\"text\":\"ok\"}}\n{line}\n"));
            assert!(
                msg.contains(&format!("train.jsonl:2: {want}")),
                "{line} -> {msg}"
            );
        }
    }

    #[test]
    fn missing_file_names_path() {
        let err = read_jsonl(Path::new("/nonexistent/x.jsonl")).expect_err("missing");
        assert!(
            err.to_string().starts_with("/nonexistent/x.jsonl: "),
            "{err}"
        );
    }
}
