//! Printing outside values so that they cannot forge output: the one escaping rule.
//!
//! Paths, names, uids, endpoints and anything else that comes from the command line, the
//! environment, a file or a peer reach the operator through errors, `--check`, `stats` and log
//! lines. A newline in such a value would start a line of the attacker's choosing, a carriage
//! return or an escape sequence would overwrite one on a terminal. So every character that Rust's
//! `char::escape_debug` escapes (control characters, backslash, unprintable and invisible
//! characters) is written as that escape (`\n`, `\r`, `\u{1b}`, `\\`); everything else, quotes
//! and non-ASCII letters included, passes unchanged. Backslash is escaped too, so what is printed
//! reads back unambiguously.
//!
//! Invariant: the output of `Escaped` never contains a control character. Escaping happens once,
//! where the text leaves the process (errors' `Display`, the log formatter, `stats`), never where
//! values are stored: the relay uses paths and names as they are.

use std::fmt::{self, Write};

/// Displays `T` with every outside character escaped.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{}", self.0)
    }
}

/// Escapes `text` (see the module header); borrows it when nothing needs escaping.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().all(|c| !needs_escape(c)) {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(Escaped(text).to_string())
    }
}

fn needs_escape(c: char) -> bool {
    !matches!(c, '"' | '\'') && c.escape_debug().len() > 1
}

/// A `fmt::Write` that escapes what passes through it.
pub struct EscapingWriter<W>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            if needs_escape(c) {
                self.0.write_str(&s[plain..i])?;
                write!(self.0, "{}", c.escape_debug())?;
                plain = i + c.len_utf8();
            }
        }
        self.0.write_str(&s[plain..])
    }
}

/// The log formatter's field writer (`tracing_subscriber`'s `FormatFields`): the default
/// format (`message key=value ...`), with every value, the message and span fields included,
/// written through `Escaped`. Values logged with `%` (paths, endpoints, names, errors) are
/// escaped here, so no call site has to remember it.
pub struct EscapedFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut v = FieldWriter { writer, result: Ok(()), first: true };
        fields.record(&mut v);
        v.result
    }
}

struct FieldWriter<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl FieldWriter<'_> {
    fn write(&mut self, field: &tracing::field::Field, value: fmt::Arguments<'_>, quoted: bool) {
        let name = field.name();
        // The `log` crate's bridge fields, as the default formatter skips them.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) { "" } else { " " };
        let q = if quoted { "\"" } else { "" };
        self.result = if name == "message" {
            write!(self.writer, "{sep}{}", Escaped(value))
        } else {
            write!(self.writer, "{sep}{}={q}{}{q}", name.trim_start_matches("r#"), Escaped(value))
        };
    }
}

impl tracing::field::Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        // Strings are quoted, as the default formatter does (its `Debug` would escape them a
        // second way).
        self.write(field, format_args!("{value}"), field.name() != "message");
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_backslash_are_escaped() {
        assert_eq!(escape("vm\nkvmi-relay: fake"), "vm\\nkvmi-relay: fake");
        assert_eq!(escape("a\rb\x1b[2Jc\td\0"), "a\\rb\\u{1b}[2Jc\\td\\0");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("\u{7f}\u{85}\u{202e}"), "\\u{7f}\\u{85}\\u{202e}");
    }

    #[test]
    fn ordinary_text_passes_unchanged_and_borrowed() {
        for plain in ["/run/kvmi/one-7.sock", "it's \"quoted\"", "µs über 10.0.0.0/8", ""] {
            assert!(matches!(escape(plain), std::borrow::Cow::Borrowed(_)), "{plain}");
            assert_eq!(Escaped(plain).to_string(), plain);
        }
    }

    #[test]
    fn no_control_character_survives_any_input() {
        let every: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        assert!(!Escaped(&every).to_string().chars().any(char::is_control));
    }
}
