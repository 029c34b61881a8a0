//! The W3C `traceparent` header every call may carry: parsed, and what parses writes back the same.
#![no_main]
use mendfs_telemetry::context::TraceContext;

libfuzzer_sys::fuzz_target!(|text: &str| {
    if let Ok(context) = TraceContext::parse_traceparent(text) {
        let written = context.to_traceparent();
        assert_eq!(TraceContext::parse_traceparent(&written), Ok(context), "{text:?} → {written:?}");
    }
});
