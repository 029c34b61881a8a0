//! Listing helpers: `encoding-type=url`, continuation tokens, times.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use s3s::dto::Timestamp;

/// What S3 leaves unescaped in `encoding-type=url` answers; `+` and space are escaped, since
/// SDKs decode with `unquote_plus`.
const URL_KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');

/// `text` as a listing answers it: percent-encoded when the client asked for `url`.
pub(crate) fn encode(text: String, url: bool) -> String {
    if url {
        utf8_percent_encode(&text, URL_KEEP).to_string()
    } else {
        text
    }
}

/// An opaque continuation token for the position after `last`.
pub(crate) fn token_after(last: &str) -> String {
    mendfs_types::hex(last.as_bytes())
}

/// The position a continuation token names.
pub(crate) fn position_of(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

pub(crate) fn timestamp(ms: u64) -> Timestamp {
    Timestamp::from(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

pub(crate) fn millis(timestamp: &Timestamp) -> u64 {
    let at: time::OffsetDateTime = timestamp.clone().into();
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_any_key() {
        for key in ["a", "dir//x/../y/", "ünïcødé key +", ""] {
            assert_eq!(position_of(&token_after(key)).as_deref(), Some(key));
        }
        assert_eq!(position_of("zz"), None);
        assert_eq!(position_of("abc"), None);
    }

    #[test]
    fn url_encoding_escapes_what_sdks_unquote() {
        assert_eq!(encode("a b+c/d~e".into(), true), "a%20b%2Bc/d~e");
        assert_eq!(encode("a b".into(), false), "a b");
    }

    #[test]
    fn times_round_trip_in_milliseconds() {
        assert_eq!(millis(&timestamp(1_700_000_000_123)), 1_700_000_000_123);
    }
}
