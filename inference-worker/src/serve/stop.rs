//! The one stop-sequence matcher. Text is pushed as it is generated; what comes back
//! is the part that is safe to send: never a stop sequence, nor text that may turn
//! out to be the start of one. Used by the detokenizer (local generation) and by
//! edge escalation (the cloud's text continuing text the edge held back).

/// Generated text checked against stop sequences as it grows.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stop: Vec<String>,
    /// All the text so far (cut before the stop sequence once one matched).
    text: String,
    /// Bytes of `text` already returned as safe to send.
    emitted: usize,
}

impl StopMatcher {
    /// `held_back`: text that comes before what will be pushed and was not sent
    /// yet (a possible stop prefix held back by an earlier matcher).
    pub fn new(stop: Vec<String>, held_back: String) -> Self {
        Self {
            stop,
            text: held_back,
            emitted: 0,
        }
    }

    /// The text so far (up to a stop sequence if one matched).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends `text`; returns the text safe to send now and whether a stop sequence
    /// matched (then the returned text ends right before it and nothing more follows).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.text.push_str(text);
        // Text before `emitted` was checked already; only a stop sequence that ends in
        // the new text can start in the last `max_stop_len` bytes before it.
        let search_from = self.emitted.saturating_sub(self.max_stop_len());
        let search_from = floor_char_boundary(&self.text, search_from);
        let first_stop = self
            .stop
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min();
        if let Some(pos) = first_stop {
            let end = (search_from + pos).max(self.emitted);
            self.text.truncate(end);
            let out = self.text[self.emitted..].to_string();
            self.emitted = end;
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of a stop sequence.
        let mut safe = self.text.len();
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    safe = safe.min(self.text.len() - k);
                    break;
                }
            }
        }
        let safe = floor_char_boundary(&self.text, safe.max(self.emitted));
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// The held-back rest, when the text ends for another reason.
    pub fn flush(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }

    fn max_stop_len(&self) -> usize {
        self.stop.iter().map(|s| s.len()).max().unwrap_or(0)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_straddling_the_boundary_cut_the_text() {
        // The edge held back "wo" (a prefix of "world"); the cloud continues with "rld!".
        let mut s = StopMatcher::new(vec!["world".into()], "wo".into());
        assert_eq!(s.push("rl"), (String::new(), false));
        assert_eq!(s.push("d!"), (String::new(), true));

        let mut s = StopMatcher::new(vec!["world".into()], "wo".into());
        assert_eq!(s.push("n"), ("won".to_string(), false));
        assert_eq!(s.push("der w"), ("der ".to_string(), false));
        assert_eq!(s.flush(), "w");

        let mut s = StopMatcher::new(vec!["ab".into(), "xyz".into()], String::new());
        assert_eq!(s.push("1x"), ("1".to_string(), false));
        assert_eq!(s.push("yab"), ("xy".to_string(), true));
        let mut s = StopMatcher::new(vec![], "kept".into());
        assert_eq!(s.push("é"), ("kepté".to_string(), false));
    }
}
