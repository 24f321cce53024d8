//! Where each key sits in the YAML text, so that errors found after parsing
//! (an unknown provider in a rule, a watch path that does not exist) can still
//! name `file:line:column` like the parser's own errors do.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column number.
    pub column: usize,
}

/// Key path (`watches[0].path`) to the position of that key (or list item).
#[derive(Debug, Default)]
pub struct PositionIndex {
    positions: HashMap<String, Position>,
}

impl PositionIndex {
    /// Index a YAML document. A document that does not parse yields an empty
    /// index: the parser's own error is reported instead.
    pub fn build(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Self::default();
        }
        Self {
            positions: builder.positions,
        }
    }

    /// True when nothing was indexed: the document does not parse as YAML
    /// (or is empty).
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The key written on `line` closest before `column`: names the key of a
    /// value the parser rejected when its error carries no key path.
    pub fn key_at(&self, line: usize, column: usize) -> Option<String> {
        self.positions
            .iter()
            .filter(|(_, p)| p.line == line && p.column <= column)
            .max_by_key(|(path, p)| (p.column, path.len()))
            .map(|(path, _)| path.clone())
    }

    /// The position of `path`, or of its nearest indexed ancestor (a value
    /// filled in by a default has no position of its own).
    pub fn find(&self, path: &str) -> Position {
        let mut candidate = path.to_string();
        loop {
            if let Some(position) = self.positions.get(&candidate) {
                return *position;
            }
            match candidate.rfind(['.', '[']) {
                Some(cut) => candidate.truncate(cut),
                None => return Position { line: 1, column: 1 },
            }
        }
    }
}

/// One open container while walking the event stream.
enum Frame {
    Mapping {
        path: String,
        pending_key: Option<String>,
    },
    Sequence {
        path: String,
        next_index: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, Position>,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// The path a new node (scalar or container) takes at this point, recording
    /// its position; `None` when the node is a mapping key.
    fn place_node(
        &mut self,
        mark: Marker,
        scalar: Option<&str>,
        container: bool,
    ) -> Option<String> {
        let position = Position {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Sequence { path, next_index }) => {
                let item = format!("{path}[{next_index}]");
                *next_index += 1;
                // A mapping's start mark is unreliable; its first key places it.
                if !container {
                    self.positions.insert(item.clone(), position);
                }
                Some(item)
            }
            Some(Frame::Mapping { path, pending_key }) => match pending_key.take() {
                Some(key) => Some(join(path, &key)),
                None => {
                    let key = scalar.unwrap_or("?").to_string();
                    self.positions.entry(path.clone()).or_insert(position);
                    self.positions.insert(join(path, &key), position);
                    *pending_key = Some(key);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(value, ..) => {
                self.place_node(mark, Some(&value), false);
            }
            Event::Alias(_) => {
                self.place_node(mark, None, false);
            }
            Event::MappingStart(..) => {
                let path = self.place_node(mark, None, true).unwrap_or_default();
                self.stack.push(Frame::Mapping {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.place_node(mark, None, true).unwrap_or_default();
                self.stack.push(Frame::Sequence {
                    path,
                    next_index: 0,
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_list_items() {
        let text = "state_dir: ./s\nwatches:\n  - name: a\n    path: /x\nrules:\n  - match: {}\n    provider: p\n";
        let index = PositionIndex::build(text);
        assert_eq!(index.find("state_dir"), Position { line: 1, column: 1 });
        assert_eq!(
            index.find("watches[0].path"),
            Position { line: 4, column: 5 }
        );
        assert_eq!(
            index.find("rules[0].provider"),
            Position { line: 7, column: 5 }
        );
        // Unknown leaf: nearest ancestor.
        assert_eq!(
            index.find("rules[0].metadata.title"),
            Position { line: 6, column: 5 }
        );
    }
}
