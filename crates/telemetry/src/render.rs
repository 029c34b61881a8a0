//! One trace's spans, gathered from many nodes, as a timeline tree (pure: no I/O, no clock).
//!
//! Roots are the spans whose parent is not among the spans (the CLI's own span is recorded by
//! no node). Offsets are from the trace's earliest start, on each node's wall clock: across
//! machines, clock skew can show a child starting before its parent, which is printed as is.
//! The slowest hop is the span with the most time of its own (its duration minus the union of
//! its children's intervals), which is where the time went.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use crate::record::{SpanRecord, SpanStatus};

/// A node that could not be asked for its spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    pub node: u64,
    pub error: String,
}

/// The spans in tree order with their depth, and whether each is its parent's last child.
struct Tree<'a> {
    order: Vec<(&'a SpanRecord, usize, Vec<bool>)>,
}

fn dedup(spans: &[SpanRecord]) -> Vec<&SpanRecord> {
    let mut seen = BTreeSet::new();
    spans.iter().filter(|s| seen.insert(s.span_id.as_str())).collect()
}

fn sort_key(span: &SpanRecord) -> (u64, &str) {
    (span.start_unix_us, span.span_id.as_str())
}

fn build<'a>(spans: &[&'a SpanRecord]) -> Tree<'a> {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    let mut roots = Vec::new();
    for span in spans {
        match span.parent_id.as_deref().filter(|p| ids.contains(p) && *p != span.span_id) {
            Some(parent) => children.entry(parent).or_default().push(span),
            None => roots.push(*span),
        }
    }
    for list in children.values_mut() {
        list.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    }
    roots.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    let mut order = Vec::with_capacity(spans.len());
    let mut visited = BTreeSet::new();
    // Depth-first from each root; a span is visited once, so a cycle in malformed data ends.
    fn visit<'a>(
        span: &'a SpanRecord,
        lasts: Vec<bool>,
        children: &HashMap<&str, Vec<&'a SpanRecord>>,
        visited: &mut BTreeSet<&'a str>,
        order: &mut Vec<(&'a SpanRecord, usize, Vec<bool>)>,
    ) {
        if !visited.insert(span.span_id.as_str()) {
            return;
        }
        order.push((span, lasts.len(), lasts.clone()));
        let kids: Vec<&SpanRecord> = children
            .get(span.span_id.as_str())
            .map(|k| k.iter().copied().filter(|k| !visited.contains(k.span_id.as_str())).collect())
            .unwrap_or_default();
        let count = kids.len();
        for (i, kid) in kids.into_iter().enumerate() {
            let mut next = lasts.clone();
            next.push(i + 1 == count);
            visit(kid, next, children, visited, order);
        }
    }
    for root in &roots {
        visit(root, Vec::new(), &children, &mut visited, &mut order);
    }
    // Spans only reachable through a cycle: print them as roots.
    let mut rest: Vec<&SpanRecord> = spans.iter().copied().filter(|s| !visited.contains(s.span_id.as_str())).collect();
    rest.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    for span in rest {
        visit(span, Vec::new(), &HashMap::new(), &mut visited, &mut order);
    }
    Tree { order }
}

/// The span with the most time of its own; ties go to the earliest.
pub fn slowest_hop(spans: &[SpanRecord]) -> Option<&SpanRecord> {
    let spans = dedup(spans);
    let mut children: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    for span in &spans {
        if let Some(parent) = span.parent_id.as_deref().filter(|p| *p != span.span_id) {
            children.entry(parent).or_default().push(span);
        }
    }
    let self_time = |span: &SpanRecord| -> u64 {
        let start = span.start_unix_us;
        let end = start.saturating_add(span.duration_us);
        let mut intervals: Vec<(u64, u64)> = children
            .get(span.span_id.as_str())
            .map(|kids| {
                kids.iter()
                    .map(|k| {
                        (
                            k.start_unix_us.clamp(start, end),
                            k.start_unix_us.saturating_add(k.duration_us).clamp(start, end),
                        )
                    })
                    .filter(|(a, b)| b > a)
                    .collect()
            })
            .unwrap_or_default();
        intervals.sort_unstable();
        let mut covered = 0u64;
        let mut current: Option<(u64, u64)> = None;
        for (a, b) in intervals {
            match current {
                Some((ca, cb)) if a <= cb => current = Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    covered += cb - ca;
                    current = Some((a, b));
                }
                None => current = Some((a, b)),
            }
        }
        if let Some((ca, cb)) = current {
            covered += cb - ca;
        }
        span.duration_us.saturating_sub(covered)
    };
    spans
        .into_iter()
        .map(|span| (self_time(span), span))
        .max_by(|(a, sa), (b, sb)| a.cmp(b).then_with(|| sort_key(sb).cmp(&sort_key(sa))))
        .map(|(_, span)| span)
}

/// `850µs`, `12.4ms`, `1.53s`.
pub fn format_duration(micros: u64) -> String {
    if micros < 1_000 {
        format!("{micros}µs")
    } else if micros < 999_950 {
        // (Below this, one decimal of milliseconds; above, it would round to "1000.0ms".)
        format!("{:.1}ms", micros as f64 / 1_000.0)
    } else {
        format!("{:.2}s", micros as f64 / 1_000_000.0)
    }
}

fn span_label(span: &SpanRecord) -> String {
    match span.attributes.get("peer") {
        Some(peer) => format!("node {} → {peer}", span.node),
        None => format!("node {}", span.node),
    }
}

pub fn render_text(trace_id: &str, spans: &[SpanRecord], unreachable: &[Unreachable]) -> String {
    let spans = dedup(spans);
    let mut out = String::new();
    let unreachable_line = |out: &mut String| {
        if !unreachable.is_empty() {
            let list: Vec<String> = unreachable.iter().map(|u| format!("node {} ({})", u.node, u.error)).collect();
            let _ = writeln!(out, "unreachable: {}", list.join(", "));
        }
    };
    if spans.is_empty() {
        let _ = writeln!(out, "trace {trace_id}: no spans found on any reachable node");
        unreachable_line(&mut out);
        return out;
    }
    let first = spans.iter().map(|s| s.start_unix_us).min().unwrap_or(0);
    let last = spans.iter().map(|s| s.start_unix_us.saturating_add(s.duration_us)).max().unwrap_or(first);
    let nodes: BTreeSet<u64> = spans.iter().map(|s| s.node).collect();
    let nodes: Vec<String> = nodes.iter().map(u64::to_string).collect();
    let _ = writeln!(
        out,
        "trace {trace_id}: {} spans on nodes {}; {}",
        spans.len(),
        nodes.join(", "),
        format_duration(last.saturating_sub(first))
    );
    let owned: Vec<SpanRecord> = spans.iter().map(|s| (*s).clone()).collect();
    let slowest = slowest_hop(&owned).map(|s| s.span_id.clone());
    let tree = build(&spans);
    let rows: Vec<(String, String, String, String, String)> = tree
        .order
        .iter()
        .map(|(span, depth, lasts)| {
            let mut prefix = String::new();
            for (level, last) in lasts.iter().enumerate() {
                let is_own = level + 1 == *depth;
                prefix.push_str(match (is_own, last) {
                    (true, true) => "└─ ",
                    (true, false) => "├─ ",
                    (false, true) => "   ",
                    (false, false) => "│  ",
                });
            }
            let mut notes = String::new();
            if span.status == SpanStatus::Error {
                let _ = write!(notes, "  ✗ {}", span.error.as_deref().unwrap_or("error"));
            }
            if slowest.as_deref() == Some(span.span_id.as_str()) {
                notes.push_str("  ◀ slowest");
            }
            let others: Vec<String> =
                span.attributes.iter().filter(|(k, _)| k.as_str() != "peer").map(|(k, v)| format!("{k}={v}")).collect();
            if !others.is_empty() {
                let _ = write!(notes, "  ({})", others.join(" "));
            }
            (
                format!("{prefix}{}", span.name),
                span_label(span),
                format!("+{}", format_duration(span.start_unix_us.saturating_sub(first))),
                format_duration(span.duration_us),
                notes,
            )
        })
        .collect();
    let width = |pick: fn(&(String, String, String, String, String)) -> &String| {
        rows.iter().map(|r| pick(r).chars().count()).max().unwrap_or(0)
    };
    let (w0, w1, w2, w3) = (width(|r| &r.0), width(|r| &r.1), width(|r| &r.2), width(|r| &r.3));
    let pad = |text: &str, width: usize| format!("{text}{}", " ".repeat(width.saturating_sub(text.chars().count())));
    for (name, node, offset, duration, notes) in &rows {
        let offset = format!("{}{offset}", " ".repeat(w2.saturating_sub(offset.chars().count())));
        let duration = format!("{}{duration}", " ".repeat(w3.saturating_sub(duration.chars().count())));
        let line = format!("{}  {}  {offset}  {duration}{notes}", pad(name, w0), pad(node, w1));
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let failed: Vec<&SpanRecord> =
        tree.order.iter().map(|(s, _, _)| *s).filter(|s| s.status == SpanStatus::Error).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "failed:");
        for span in failed {
            let _ =
                writeln!(out, "  {} on {}: {}", span.name, span_label(span), span.error.as_deref().unwrap_or("error"));
        }
    }
    unreachable_line(&mut out);
    out
}

pub fn render_json(trace_id: &str, spans: &[SpanRecord], unreachable: &[Unreachable]) -> serde_json::Value {
    let spans = dedup(spans);
    let first = spans.iter().map(|s| s.start_unix_us).min().unwrap_or(0);
    let owned: Vec<SpanRecord> = spans.iter().map(|s| (*s).clone()).collect();
    let slowest = slowest_hop(&owned).map(|s| s.span_id.clone());
    let tree = build(&spans);
    let rendered: Vec<serde_json::Value> = tree
        .order
        .iter()
        .map(|(span, depth, _)| {
            let mut object = serde_json::Map::new();
            object.insert("node".into(), span.node.into());
            // How deep in the tree: the dashboard's waterfall indents by it.
            object.insert("depth".into(), (*depth).into());
            object.insert("name".into(), span.name.clone().into());
            object.insert("span_id".into(), span.span_id.clone().into());
            object.insert("parent".into(), span.parent_id.clone().map_or(serde_json::Value::Null, Into::into));
            object.insert("start_us".into(), span.start_unix_us.saturating_sub(first).into());
            object.insert("start_unix_us".into(), span.start_unix_us.into());
            object.insert("duration_us".into(), span.duration_us.into());
            object.insert(
                "status".into(),
                match span.status {
                    SpanStatus::Ok => "ok",
                    SpanStatus::Error => "error",
                }
                .into(),
            );
            if let Some(error) = &span.error {
                object.insert("error".into(), error.clone().into());
            }
            if !span.attributes.is_empty() {
                let attributes: BTreeMap<String, serde_json::Value> =
                    span.attributes.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
                object.insert("attributes".into(), serde_json::to_value(attributes).unwrap_or_default());
            }
            serde_json::Value::Object(object)
        })
        .collect();
    serde_json::json!({
        "trace_id": trace_id,
        "spans": rendered,
        "slowest": slowest,
        "unreachable": unreachable.iter().map(|u| serde_json::json!({"node": u.node, "error": u.error})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: Option<&str>, node: u64, name: &str, start: u64, duration: u64) -> SpanRecord {
        SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: id.into(),
            parent_id: parent.map(str::to_string),
            node,
            name: name.into(),
            start_unix_us: start,
            duration_us: duration,
            status: SpanStatus::Ok,
            error: None,
            attributes: BTreeMap::new(),
        }
    }

    fn failed(mut span: SpanRecord, error: &str, peer: u64) -> SpanRecord {
        span.status = SpanStatus::Error;
        span.error = Some(error.into());
        span.attributes.insert("peer".into(), peer.to_string());
        span
    }

    /// A put on node 1 (its parent, the client, is recorded nowhere), two hops to nodes 2
    /// and 3, each with the replica's server span under it.
    fn put_trace() -> Vec<SpanRecord> {
        vec![
            span("b2", Some("a2"), 2, "Storage/PrepareChunk", 1_100, 300),
            span("a1", Some("client"), 1, "Files/Put", 1_000, 5_000),
            span("a2", Some("a1"), 1, "prepare_chunk", 1_050, 400),
            failed(span("a3", Some("a1"), 1, "prepare_chunk", 1_060, 4_000), "no answer within 2s", 3),
            span("c3", Some("a3"), 3, "Storage/PrepareChunk", 1_200, 100),
        ]
    }

    #[test]
    fn a_tree_across_nodes_with_one_root_and_children_in_start_order() {
        let json = render_json("t", &put_trace(), &[]);
        let names: Vec<(&str, &str)> = json["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["span_id"].as_str().unwrap(), s["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a1", "Files/Put"),
                ("a2", "prepare_chunk"),
                ("b2", "Storage/PrepareChunk"),
                ("a3", "prepare_chunk"),
                ("c3", "Storage/PrepareChunk")
            ]
        );
        let depths: Vec<u64> = json["spans"].as_array().unwrap().iter().map(|s| s["depth"].as_u64().unwrap()).collect();
        assert_eq!(depths, [0, 1, 2, 1, 2], "the waterfall's indentation");
        let text = render_text("t", &put_trace(), &[]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "trace t: 5 spans on nodes 1, 2, 3; 5.0ms");
        assert!(lines[1].starts_with("Files/Put"));
        assert!(lines[2].starts_with("├─ prepare_chunk"));
        assert!(lines[3].starts_with("│  └─ Storage/PrepareChunk"));
        assert!(lines[4].starts_with("└─ prepare_chunk"));
        assert!(lines[5].starts_with("   └─ Storage/PrepareChunk"));
    }

    #[test]
    fn failed_spans_are_marked_and_listed_with_their_peer() {
        let text = render_text("t", &put_trace(), &[Unreachable { node: 3, error: "timed out".into() }]);
        let failed_line = text.lines().find(|l| l.contains("✗")).unwrap();
        assert!(failed_line.contains("node 1 → 3") && failed_line.contains("no answer within 2s"), "{text}");
        assert!(text.contains("failed:\n  prepare_chunk on node 1 → 3: no answer within 2s"), "{text}");
        assert!(text.ends_with("unreachable: node 3 (timed out)\n"), "{text}");
        let json = render_json("t", &put_trace(), &[Unreachable { node: 3, error: "timed out".into() }]);
        let failed = json["spans"].as_array().unwrap().iter().find(|s| s["status"] == "error").unwrap();
        assert_eq!(failed["attributes"]["peer"], "3");
        assert_eq!(failed["error"], "no answer within 2s");
        assert_eq!(json["unreachable"][0]["node"], 3);
        assert_eq!(json["spans"][0]["parent"], "client");
        assert_eq!(json["spans"][0]["start_us"], 0);
        assert_eq!(json["spans"][1]["start_us"], 50);
        assert!(json["spans"][0].get("error").is_none());
    }

    #[test]
    fn the_slowest_hop_is_the_largest_self_time_with_overlapping_children_counted_once() {
        // The put lasts 5 ms; its children cover 1 060..5 060 (overlapping): 4 ms, clipped to
        // the put's end at 6 000 → self time 1 ms. The failed hop a3 has 4 ms less its child's
        // 0.1 ms: the slowest.
        assert_eq!(slowest_hop(&put_trace()).map(|s| s.span_id.as_str()), Some("a3"));
        let parallel = vec![
            span("p", None, 1, "parent", 0, 10_000),
            span("x", Some("p"), 1, "x", 0, 6_000),
            span("y", Some("p"), 1, "y", 1_000, 6_000),
        ];
        // Union of children: 0..7 000, so the parent's own time is 3 ms; y has 6 ms.
        assert_eq!(slowest_hop(&parallel).map(|s| s.span_id.as_str()), Some("x"));
        assert!(render_text("t", &parallel, &[]).lines().any(|l| l.contains("x") && l.contains("◀ slowest")));
        assert_eq!(render_json("t", &parallel, &[])["slowest"], "x");
        assert_eq!(slowest_hop(&[]), None);
    }

    #[test]
    fn orphans_duplicates_cycles_and_skew_are_handled() {
        let mut spans = put_trace();
        spans.push(spans[0].clone()); // asked twice
        spans.push(span("z", Some("gone"), 4, "orphan", 900, 10)); // parent recorded nowhere
        spans.push(span("k1", Some("k2"), 5, "cycle-a", 2_000, 1));
        spans.push(span("k2", Some("k1"), 5, "cycle-b", 2_001, 1));
        spans.push(span("early", Some("a1"), 2, "skewed", 10, 5)); // starts before its parent
        let json = render_json("t", &spans, &[]);
        let ids: Vec<&str> = json["spans"].as_array().unwrap().iter().map(|s| s["span_id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 9, "every distinct span once: {ids:?}");
        assert!(ids.contains(&"z") && ids.contains(&"k1") && ids.contains(&"k2"));
        let text = render_text("t", &spans, &[]);
        assert!(text.contains("orphan") && text.contains("skewed"));
        assert_eq!(text.lines().filter(|l| l.contains("Storage/PrepareChunk")).count(), 2);
    }

    #[test]
    fn nothing_found_says_so_and_names_the_unreachable() {
        let text = render_text("t", &[], &[Unreachable { node: 2, error: "connection refused".into() }]);
        assert_eq!(text, "trace t: no spans found on any reachable node\nunreachable: node 2 (connection refused)\n");
        let json = render_json("t", &[], &[]);
        assert_eq!(json["spans"].as_array().unwrap().len(), 0);
        assert!(json["slowest"].is_null());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(0), "0µs");
        assert_eq!(format_duration(999), "999µs");
        assert_eq!(format_duration(1_000), "1.0ms");
        assert_eq!(format_duration(12_449), "12.4ms");
        assert_eq!(format_duration(999_949), "999.9ms");
        assert_eq!(format_duration(999_999), "1.00s");
        assert_eq!(format_duration(1_000_000), "1.00s");
        assert_eq!(format_duration(1_532_000), "1.53s");
    }
}
