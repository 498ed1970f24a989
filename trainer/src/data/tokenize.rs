//! Turning a [`RawSample`] into token ids and HF-style labels.

use std::ops::Range;

use serde_json::Value;

use super::error::SampleError;
use super::jsonl::{RawSample, IGNORE_INDEX};
use super::tokenizer::{Encoding, TextTokenizer};

/// One tokenized sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    /// HF-style labels, same length as input_ids, -100 = not supervised; labels[t] is the
    /// target for the logits at t-1 (the causal-LM shift is done by the loss, like
    /// transformers).
    pub labels: Vec<i64>,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Keeps the first `max_len` tokens; true when something was cut.
    pub fn truncate(&mut self, max_len: usize) -> bool {
        let cut = self.input_ids.len() > max_len;
        self.input_ids.truncate(max_len);
        self.labels.truncate(max_len);
        cut
    }

    /// Labels that reach the loss: those at positions 1.. that are not -100 (a label at
    /// position 0 has no logits before it).
    pub fn supervised_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Tokenizes one sample (see the module docs of `data` for the rules per format).
/// With `train_on_prompt` every token is supervised, except pre-tokenized samples that
/// bring their own labels.
pub fn tokenize_sample(
    raw: &RawSample,
    tokenizer: Option<&TextTokenizer>,
    train_on_prompt: bool,
) -> Result<Sample, SampleError> {
    let need = || tokenizer.ok_or(SampleError::NeedsTokenizer);
    match raw {
        RawSample::Tokens { input_ids, labels } => {
            let labels = match labels {
                Some(labels) => labels.clone(),
                None => input_ids.iter().map(|&id| i64::from(id)).collect(),
            };
            Ok(Sample {
                input_ids: input_ids.clone(),
                labels,
            })
        }
        RawSample::Messages(messages) => tokenize_messages(need()?, messages, train_on_prompt),
        RawSample::PromptCompletion { prompt, completion } => {
            let tok = need()?;
            let text = format!("{prompt}{completion}");
            let enc = tok.encode(&text, true)?;
            let mut sample = label_spans(enc, &[prompt.len()..text.len()], train_on_prompt);
            append_eos(tok, &mut sample);
            Ok(sample)
        }
        RawSample::Text(text) => {
            let tok = need()?;
            let enc = tok.encode(text, true)?;
            let mut sample = label_spans(enc, &[], true);
            append_eos(tok, &mut sample);
            Ok(sample)
        }
    }
}

/// Renders the conversation and supervises the text each assistant message adds: the
/// difference between rendering `messages[..i]` with the generation prompt and
/// `messages[..=i]` without it.
fn tokenize_messages(
    tok: &TextTokenizer,
    messages: &[Value],
    train_on_prompt: bool,
) -> Result<Sample, SampleError> {
    let template = tok.chat_template()?;
    let full = template.render(messages, false)?;
    let mut spans = Vec::new();
    if !train_on_prompt {
        for (i, message) in messages.iter().enumerate() {
            if message.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let before = template.render(&messages[..i], true)?;
            let after = if i + 1 == messages.len() {
                full.clone()
            } else {
                template.render(&messages[..=i], false)?
            };
            if !after.starts_with(&before) {
                return Err(SampleError::NotPrefix {
                    turn: i,
                    with_generation_prompt: true,
                });
            }
            if !full.starts_with(&after) {
                return Err(SampleError::NotPrefix {
                    turn: i + 1,
                    with_generation_prompt: false,
                });
            }
            spans.push(before.len()..after.len());
        }
    }
    let enc = tok.encode(&full, false)?;
    Ok(label_spans(enc, &spans, train_on_prompt))
}

/// Labels a token with its id when its text overlaps a span (or `all`), else -100. A
/// token straddling a span's edge counts as inside, like HF's `char_to_token` masks.
/// Zero-width tokens (added BOS/EOS) are inside only with `all`.
fn label_spans(enc: Encoding, spans: &[Range<usize>], all: bool) -> Sample {
    let labels = enc
        .ids
        .iter()
        .zip(&enc.offsets)
        .map(|(&id, &(start, end))| {
            let inside = spans
                .iter()
                .any(|s| start < s.end && end > s.start && end > start);
            if all || inside {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Sample {
        input_ids: enc.ids,
        labels,
    }
}

/// Appends the (supervised) EOS unless the tokens already end with it.
fn append_eos(tok: &TextTokenizer, sample: &mut Sample) {
    if let Some(eos) = tok.eos_id() {
        if sample.input_ids.last() != Some(&eos) {
            sample.input_ids.push(eos);
            sample.labels.push(i64::from(eos));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, *};
    use super::*;
    use serde_json::json;

    const I: i64 = IGNORE_INDEX;

    fn load(template: &str) -> (tempfile::TempDir, TextTokenizer) {
        let dir = fixtures::model_dir(template);
        let tok = TextTokenizer::load(dir.path()).expect("load");
        (dir, tok)
    }

    fn messages(v: serde_json::Value) -> RawSample {
        match v {
            serde_json::Value::Array(m) => RawSample::Messages(m),
            _ => panic!("not an array"),
        }
    }

    fn l(ids: &[u32]) -> Vec<i64> {
        ids.iter().map(|&i| i64::from(i)).collect()
    }

    #[test]
    fn messages_supervise_only_assistant_turns() {
        let (_d, tok) = load(CHATML);
        let raw = messages(json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": " fine thanks "},
        ]));
        let s = tokenize_sample(&raw, Some(&tok), false).expect("tokenize");
        #[rustfmt::skip]
        let want_ids = vec![
            BOS, IM_START, SYSTEM, BE, BRIEF, IM_END,
            IM_START, USER, HI, IM_END,
            IM_START, ASSISTANT, HELLO, THERE, IM_END,
            IM_START, USER, HOW, ARE, YOU, IM_END,
            IM_START, ASSISTANT, FINE, THANKS, IM_END,
        ];
        assert_eq!(s.input_ids, want_ids);
        #[rustfmt::skip]
        let want_labels = vec![
            I, I, I, I, I, I,
            I, I, I, I,
            I, I, HELLO as i64, THERE as i64, IM_END as i64,
            I, I, I, I, I, I,
            I, I, FINE as i64, THANKS as i64, IM_END as i64,
        ];
        assert_eq!(s.labels, want_labels);
        assert_eq!(s.supervised_tokens(), 6);

        let all = tokenize_sample(&raw, Some(&tok), true).expect("tokenize");
        assert_eq!(all.input_ids, want_ids);
        assert_eq!(all.labels, l(&want_ids));
    }

    #[test]
    fn prompt_completion_supervises_completion_and_eos() {
        let (_d, tok) = load(CHATML);
        let raw = RawSample::PromptCompletion {
            prompt: "how are you ".into(),
            completion: "fine thanks".into(),
        };
        let s = tokenize_sample(&raw, Some(&tok), false).expect("tokenize");
        assert_eq!(s.input_ids, vec![BOS, HOW, ARE, YOU, FINE, THANKS, EOS]);
        assert_eq!(
            s.labels,
            vec![I, I, I, I, FINE as i64, THANKS as i64, EOS as i64]
        );
        let s = tokenize_sample(&raw, Some(&tok), true).expect("tokenize");
        assert_eq!(s.labels, l(&[BOS, HOW, ARE, YOU, FINE, THANKS, EOS]));
        // an EOS already at the end is not doubled
        let raw = RawSample::PromptCompletion {
            prompt: "hi".into(),
            completion: " hello</s>".into(),
        };
        let s = tokenize_sample(&raw, Some(&tok), false).expect("tokenize");
        assert_eq!(s.input_ids, vec![BOS, HI, HELLO, EOS]);
        assert_eq!(s.labels, vec![I, I, HELLO as i64, EOS as i64]);
    }

    #[test]
    fn text_and_tokens() {
        let (_d, tok) = load(CHATML);
        let s = tokenize_sample(&RawSample::Text("hello there".into()), Some(&tok), false)
            .expect("text");
        assert_eq!(s.input_ids, vec![BOS, HELLO, THERE, EOS]);
        assert_eq!(s.labels, l(&[BOS, HELLO, THERE, EOS]));

        let raw = RawSample::Tokens {
            input_ids: vec![7, 8, 9],
            labels: Some(vec![I, I, 9]),
        };
        for train_on_prompt in [false, true] {
            let s = tokenize_sample(&raw, None, train_on_prompt).expect("tokens");
            assert_eq!(
                (s.input_ids.clone(), s.labels),
                (vec![7, 8, 9], vec![I, I, 9])
            );
        }
        let raw = RawSample::Tokens {
            input_ids: vec![7, 8],
            labels: None,
        };
        assert_eq!(
            tokenize_sample(&raw, None, false).expect("tokens").labels,
            vec![7, 8]
        );
    }

    #[test]
    fn text_needs_a_tokenizer() {
        let err = tokenize_sample(&RawSample::Text("x".into()), None, false).expect_err("none");
        assert_eq!(err, SampleError::NeedsTokenizer);
        assert!(err.to_string().contains("tokenizer.json"));
    }

    #[test]
    fn template_errors_and_unstable_prefixes() {
        let (_d, tok) = load(CHATML);
        let raw = messages(json!([{"role": "robot", "content": "hi"}]));
        let err = tokenize_sample(&raw, Some(&tok), false)
            .expect_err("bad role")
            .to_string();
        assert!(err.contains("Unknown role: robot"), "{err}");

        // a template that only shows the last message is not prefix-stable
        let (_d, tok) = load(
            "{{ messages[-1]['content'] }}{% if add_generation_prompt %} assistant{% endif %}",
        );
        let raw = messages(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]));
        let err = tokenize_sample(&raw, Some(&tok), false).expect_err("unstable");
        assert_eq!(
            err,
            SampleError::NotPrefix {
                turn: 1,
                with_generation_prompt: true
            }
        );
    }

    #[test]
    fn truncate_and_count() {
        let mut s = Sample {
            input_ids: vec![1, 2, 3, 4],
            labels: vec![I, 2, I, 4],
        };
        assert_eq!(s.supervised_tokens(), 2);
        assert!(!s.truncate(4));
        assert!(s.truncate(3));
        assert_eq!(
            (s.input_ids.clone(), s.labels.clone()),
            (vec![1, 2, 3], vec![I, 2, I])
        );
        assert_eq!(s.supervised_tokens(), 1);
    }
}
