//! A YAML tree that remembers the line of every node.
//!
//! serde's data model (and so `serde_norway::Value`) forgets positions, but every config error
//! must name its line. So files are read with yaml-rust2's event parser, which marks every event,
//! into this small tree; `serviceentry.rs` walks it. One parser for values and lines means they
//! can never disagree (two parsers could split a stream into documents differently).

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
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

/// The documents of a YAML stream. On a syntax error, the documents completed before it are
/// still returned, so their errors are reported too.
pub(crate) fn parse(text: &str) -> (Vec<Node>, Option<SyntaxError>) {
    let mut builder = Builder::default();
    let result = Parser::new_from_str(text).load(&mut builder, true);
    let error = result.err().map(|e| SyntaxError {
        line: e.marker().line(),
        message: e.info().to_string(),
    });
    (builder.docs, error)
}

enum Frame {
    Seq(Node, usize),
    /// The mapping, its anchor, and the key waiting for its value.
    Map(Node, usize, Option<Node>),
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
}

impl Builder {
    /// A node is complete: remember it under its anchor and attach it to its parent.
    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
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

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                let kind = Kind::Scalar { value, plain };
                self.finish(Node { line, kind }, anchor);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(
                Node {
                    line,
                    kind: Kind::Seq(vec![]),
                },
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map(
                Node {
                    line,
                    kind: Kind::Map(vec![]),
                },
                anchor,
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(Frame::Seq(node, anchor) | Frame::Map(node, anchor, _)) =
                    self.stack.pop()
                {
                    self.finish(node, anchor);
                }
            }
            // The parser rejects unknown anchors, so the lookup only fails on malformed input.
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or(NULL.clone());
                self.finish(node, 0);
            }
            Event::DocumentStart => self.anchors.clear(),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
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
}
