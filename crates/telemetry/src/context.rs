//! W3C trace context: the `traceparent` header (version 00) that carries a trace id and the
//! caller's span id on every RPC, so spans recorded on different nodes join into one tree.
//!
//! Format: `00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`, lowercase, all-zero ids
//! invalid (<https://www.w3.org/TR/trace-context/#traceparent-header>).

use std::fmt;
use std::str::FromStr;

/// The gRPC metadata key (HTTP/2 header) carrying the context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A trace's id: 16 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(u128);

/// A span's id: 8 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("trace id {0:?} is not 32 hex digits")]
    BadTraceId(String),
    #[error("the all-zero trace id is invalid")]
    ZeroTraceId,
    #[error("traceparent {0:?} is not 00-<32 hex>-<16 hex>-<2 hex>")]
    BadTraceparent(String),
}

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id: u128 = rand::random();
            if id != 0 {
                return TraceId(id);
            }
        }
    }

    pub fn from_u128(id: u128) -> Option<Self> {
        (id != 0).then_some(TraceId(id))
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id: u64 = rand::random();
            if id != 0 {
                return SpanId(id);
            }
        }
    }

    pub fn from_u64(id: u64) -> Option<Self> {
        (id != 0).then_some(SpanId(id))
    }

    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for TraceId {
    type Err = ContextError;

    /// Accepts upper case too: an operator pasting an id should not be refused over case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.trim().to_ascii_lowercase();
        if lower.len() != 32 || !is_lower_hex(&lower) {
            return Err(ContextError::BadTraceId(text.to_string()));
        }
        let id = u128::from_str_radix(&lower, 16).map_err(|_| ContextError::BadTraceId(text.to_string()))?;
        TraceId::from_u128(id).ok_or(ContextError::ZeroTraceId)
    }
}

/// The context a caller passes to the callee: which trace, and which span of the caller the
/// callee's work runs under.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The caller's span (W3C "parent-id").
    pub parent_span_id: SpanId,
    /// Whether the caller records this trace (W3C flag 01). An unsampled request is served
    /// normally and recorded nowhere.
    pub sampled: bool,
}

impl TraceContext {
    /// A context for a new trace started by a caller that records nothing itself (the CLI):
    /// `parent_span_id` names the caller's own, unrecorded span.
    pub fn new_root(trace_id: TraceId) -> Self {
        TraceContext { trace_id, parent_span_id: SpanId::random(), sampled: true }
    }

    /// The `traceparent` header value.
    pub fn to_traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_span_id, u8::from(self.sampled))
    }

    /// Parses a `traceparent` header. Strict for version 00 (the only one defined); a higher
    /// version is read by its first four fields, as the specification asks of receivers.
    pub fn parse_traceparent(value: &str) -> Result<Self, ContextError> {
        let bad = || ContextError::BadTraceparent(value.to_string());
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
            return Err(bad());
        }
        if version == "00" && parts.next().is_some() {
            return Err(bad());
        }
        if trace.len() != 32 || !is_lower_hex(trace) || parent.len() != 16 || !is_lower_hex(parent) {
            return Err(bad());
        }
        if flags.len() != 2 || !is_lower_hex(flags) {
            return Err(bad());
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().and_then(TraceId::from_u128).ok_or_else(bad)?;
        let parent_span_id = u64::from_str_radix(parent, 16).ok().and_then(SpanId::from_u64).ok_or_else(bad)?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| bad())?;
        Ok(TraceContext { trace_id, parent_span_id, sampled: flags & 1 == 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_specification_example() {
        let context = TraceContext::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid traceparent");
        assert_eq!(context.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(context.sampled);
        assert_eq!(context.to_traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    }

    #[test]
    fn refuses_malformed_headers() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(TraceContext::parse_traceparent(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_future_version_is_read_by_its_first_fields() {
        let context = TraceContext::parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")
            .expect("future version");
        assert!(!context.sampled);
    }

    #[test]
    fn trace_ids_parse_in_either_case_and_refuse_zero() {
        let id: TraceId = "4BF92F3577B34DA6A3CE929D0E0E4736".parse().expect("upper case");
        assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!("0".repeat(32).parse::<TraceId>(), Err(ContextError::ZeroTraceId));
        assert!("xyz".parse::<TraceId>().is_err());
    }

    proptest! {
        #[test]
        fn traceparent_round_trips(trace in 1u128.., span in 1u64.., sampled: bool) {
            let context = TraceContext {
                trace_id: TraceId::from_u128(trace).expect("non-zero"),
                parent_span_id: SpanId::from_u64(span).expect("non-zero"),
                sampled,
            };
            prop_assert_eq!(TraceContext::parse_traceparent(&context.to_traceparent()), Ok(context));
        }
    }
}
