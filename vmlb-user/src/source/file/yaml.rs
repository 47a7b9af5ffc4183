//! A YAML tree that remembers the line of every node.
//!
//! serde's data model (and so `serde_norway::Value`) forgets positions, but every config error
//! must name its line. So files are read with yaml-rust2's event parser, which marks every event,
//! into this small tree; `serviceentry.rs` walks it. One parser for values and lines means they
//! can never disagree (two parsers could split a stream into documents differently).
//!
//! The input is untrusted (a ConfigMap key reaches every node), so the reader has budgets; each
//! is far above what a real configuration needs and fails with the line where it was exceeded:
//! - [`MAX_DOCUMENT_BYTES`]: the size of the text, which bounds the number of nodes and the
//!   size of every scalar (memory and time are linear in it);
//! - [`MAX_DEPTH`]: nesting, counting the nodes an alias pastes in; the tree is built without
//!   recursion, but dropping and walking it recurse, so this bounds the stack;
//! - [`MAX_ALIAS_NODES`]: nodes copied by aliases over the whole stream. Aliases are the one
//!   way a small text makes a big tree (each `*a` copies the anchored subtree, and subtrees
//!   can alias each other: "billion laughs"), so without it 500 bytes can exhaust memory.

use std::collections::HashMap;

/// Largest text read as YAML: 1 MiB is also the most a Kubernetes ConfigMap holds.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Deepest nesting of collections. A ServiceEntry is 5 deep, 7 inside a `kind: List`.
pub(crate) const MAX_DEPTH: usize = 64;
/// Most nodes that aliases may copy in one stream (a few anchors reused for many endpoints fit
/// many times over).
pub(crate) const MAX_ALIAS_NODES: usize = 10_000;

use yaml_rust2::{
    parser::{Event, Parser},
    scanner::{Marker, TScalarStyle},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// 1-based line where the node starts.
    pub line: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Any scalar as written; `plain` (unquoted) ones may also be numbers or null.
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order, duplicates kept (the walker reports them).
    Map(Vec<(Node, Node)>),
}

/// A null node, for fields that are absent.
pub(crate) static NULL: Node = Node {
    line: 0,
    kind: Kind::Scalar {
        value: String::new(),
        plain: true,
    },
};

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, plain: true }
            if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn scalar(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// For messages: what was found where something else was expected.
    pub fn describe(&self) -> String {
        match &self.kind {
            _ if self.is_null() => "nothing".into(),
            Kind::Scalar { value, plain: true } => value.clone(),
            Kind::Scalar { value, .. } => format!("string {value:?}"),
            Kind::Seq(_) => "a list".into(),
            Kind::Map(_) => "a mapping".into(),
        }
    }
}

/// A syntax error: line and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub line: usize,
    pub message: String,
}

/// The documents of a YAML stream. On a syntax error or an exceeded budget, the documents
/// completed before it are still returned, so their errors are reported too.
pub(crate) fn parse(text: &str) -> (Vec<Node>, Option<SyntaxError>) {
    if text.len() > MAX_DOCUMENT_BYTES {
        let error = SyntaxError {
            line: 1,
            message: format!(
                "the document is {} bytes; vmlb reads at most {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        };
        return (Vec::new(), Some(error));
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // Pulled one event at a time (not `Parser::load`) so a budget can stop the parse.
    loop {
        let error = match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((ev, mark)) => match builder.event(ev, mark) {
                Ok(()) => continue,
                Err(e) => e,
            },
            Err(e) => SyntaxError {
                line: e.marker().line(),
                message: e.info().to_string(),
            },
        };
        return (builder.docs, Some(error));
    }
    (builder.docs, None)
}

enum Frame {
    Seq(Node, usize),
    /// The mapping, its anchor, and the key waiting for its value.
    Map(Node, usize, Option<Node>),
}

/// An anchored node, with what pasting it costs.
struct Anchored {
    node: Node,
    /// Nodes in it.
    size: usize,
    /// Levels of collections in it (0 for a scalar).
    height: usize,
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchored>,
    /// Nodes copied by aliases so far.
    alias_nodes: usize,
}

/// (nodes, height) of a tree; recursion bounded by `MAX_DEPTH`.
fn measure(node: &Node) -> (usize, usize) {
    let children: Box<dyn Iterator<Item = &Node>> = match &node.kind {
        Kind::Scalar { .. } => return (1, 0),
        Kind::Seq(items) => Box::new(items.iter()),
        Kind::Map(entries) => Box::new(entries.iter().flat_map(|(k, v)| [k, v])),
    };
    children.fold((1, 1), |(size, height), c| {
        let (s, h) = measure(c);
        (size + s, height.max(h + 1))
    })
}

impl Builder {
    /// A node is complete: remember it under its anchor and attach it to its parent.
    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            let (size, height) = measure(&node);
            let anchored = Anchored {
                node: node.clone(),
                size,
                height,
            };
            self.anchors.insert(anchor, anchored);
        }
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq(
                Node {
                    kind: Kind::Seq(items),
                    ..
                },
                _,
            )) => items.push(node),
            Some(Frame::Map(
                Node {
                    kind: Kind::Map(entries),
                    ..
                },
                _,
                key,
            )) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
            Some(_) => unreachable!("frames hold only collections"),
        }
    }
}

impl Builder {
    fn budget(line: usize, message: String) -> Result<(), SyntaxError> {
        Err(SyntaxError { line, message })
    }

    fn event(&mut self, ev: Event, mark: Marker) -> Result<(), SyntaxError> {
        let line = mark.line();
        let open = |kind| Node { line, kind };
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                self.finish(open(Kind::Scalar { value, plain }), anchor);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                return Self::budget(line, format!("nested deeper than {MAX_DEPTH} levels"));
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Frame::Seq(open(Kind::Seq(vec![])), anchor));
            }
            Event::MappingStart(anchor, _) => {
                let frame = Frame::Map(open(Kind::Map(vec![])), anchor, None);
                self.stack.push(frame);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(Frame::Seq(node, anchor) | Frame::Map(node, anchor, _)) =
                    self.stack.pop()
                {
                    self.finish(node, anchor);
                }
            }
            Event::Alias(id) => {
                // The parser rejects unknown anchors, so the lookup only fails on malformed
                // input.
                let Some(a) = self.anchors.get(&id) else {
                    self.finish(NULL.clone(), 0);
                    return Ok(());
                };
                if self.stack.len() + a.height > MAX_DEPTH {
                    return Self::budget(
                        line,
                        format!("this alias nests deeper than {MAX_DEPTH} levels"),
                    );
                }
                self.alias_nodes += a.size;
                if self.alias_nodes > MAX_ALIAS_NODES {
                    return Self::budget(
                        line,
                        format!(
                            "aliases expand to more than {MAX_ALIAS_NODES} nodes (an alias \
                             copies its anchor's whole subtree)"
                        ),
                    );
                }
                let node = a.node.clone();
                self.finish(node, 0);
            }
            Event::DocumentStart => self.anchors.clear(),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(line: usize, value: &str) -> Node {
        let (value, plain) = (value.to_string(), true);
        Node {
            line,
            kind: Kind::Scalar { value, plain },
        }
    }

    #[test]
    fn lines_are_one_based_and_keys_and_items_have_their_own() {
        let (docs, err) = parse("# c\na: 1\nb:\n- x\n- {y: 2}\n");
        assert_eq!(err, None);
        let Kind::Map(entries) = &docs[0].kind else {
            panic!()
        };
        assert_eq!(entries[0], (scalar(2, "a"), scalar(2, "1")));
        assert_eq!(entries[1].0, scalar(3, "b"));
        let Kind::Seq(items) = &entries[1].1.kind else {
            panic!()
        };
        assert_eq!(items[0], scalar(4, "x"));
        assert_eq!(items[1].line, 5);
    }

    #[test]
    fn multi_document_anchors_and_syntax_errors() {
        let (docs, err) = parse("a: &x [1]\nb: *x\n---\nc: 'd'\n---\ne: [\n");
        assert_eq!(docs.len(), 2);
        let Kind::Map(entries) = &docs[0].kind else {
            panic!()
        };
        assert_eq!(entries[0].1.kind, entries[1].1.kind);
        assert_eq!(docs[1].line, 4);
        assert_eq!(err.map(|e| e.line), Some(7));
    }

    fn budget_error(text: &str) -> SyntaxError {
        let started = std::time::Instant::now();
        let (_, err) = parse(text);
        // Budgets stop the parse early: far below what the unbounded reader took (10 s).
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        err.unwrap_or_else(|| panic!("no error for {:.80}", text))
    }

    #[test]
    fn alias_bombs_are_stopped_at_the_line_that_exceeds_the_budget() {
        // Each level doubles the tree: 2^30 nodes from a few hundred bytes.
        let mut bomb = String::from("a0: &a0 [x, x]\n");
        for i in 1..30 {
            bomb += &format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1);
        }
        let e = budget_error(&bomb);
        assert!(e.message.contains("aliases expand to more than"), "{e:?}");
        // a<i> holds 2^(i+2)-1 nodes: aliases up to a10 copy 8,164 nodes and the first alias
        // of a11 (4,095 more) crosses 10,000, on line 12.
        assert_eq!(e.line, 12, "{e:?}");
        // Reusing an anchor a few times is fine.
        let ok = "ports: &p [{number: 80}]\nx: *p\ny: *p\n";
        assert_eq!(parse(ok).1, None);
    }

    #[test]
    fn deep_nesting_is_refused_directly_and_through_aliases() {
        // yaml-rust2 bounds flow nesting itself (its own recursion limit), before our budget.
        let e = budget_error(&"[".repeat(100_000));
        assert!(
            e.message.contains("nested deeper than 64") || e.message.contains("recursion limit"),
            "{e:?}"
        );
        let e = budget_error(&"- ".repeat(10_000));
        assert!(e.message.contains("nested deeper than 64"), "{e:?}");
        // 40 levels, pasted 40 levels deep: each alone is fine, together too deep.
        let deep = format!("{}x{}", "[".repeat(40), "]".repeat(40));
        let text = format!("a: &d {deep}\nb: {}*d{}\n", "[".repeat(40), "]".repeat(40));
        let e = budget_error(&text);
        assert_eq!(e.line, 2);
        assert!(e.message.contains("this alias nests deeper"), "{e:?}");
    }

    #[test]
    fn huge_documents_and_scalars_are_bounded_by_size() {
        let big = format!("a: \"{}\"\n", "x".repeat(MAX_DOCUMENT_BYTES));
        let e = budget_error(&big);
        assert!(e.message.contains("vmlb reads at most 1048576"), "{e:?}");
        // Just below the limit, one big scalar parses (linear time, one copy).
        let fits = format!("a: {}\n", "x".repeat(MAX_DOCUMENT_BYTES - 10));
        let (docs, err) = parse(&fits);
        assert_eq!((docs.len(), err), (1, None));
    }
}
