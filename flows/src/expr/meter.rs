//! The budget one evaluation may spend: steps of work and bytes of new data.
//!
//! Every node evaluated and every loop iteration costs a step; operations that walk data
//! (comparing, searching, copying strings and lists) cost a step per [`SCAN_UNIT`] bytes or
//! items on top. Every value built is charged its approximate size in bytes *before* it is
//! allocated, so `'a' * 10**12` fails without allocating anything.

use serde_json::Value;

use super::error::{Fault, Res};
use super::value::check_depth;
use super::{MAX_BUILD_BYTES, MAX_STEPS};

/// Bytes charged per JSON value (the size of a `serde_json::Value`), on top of string contents.
pub(crate) const SLOT: u64 = 32;

/// Deepest nesting of values the operations that walk them (equality, ordering, `str()`,
/// copies) go into.
pub(crate) const MAX_VALUE_DEPTH: usize = 256;

/// Bytes or items an operation may walk per step.
const SCAN_UNIT: u64 = 64;

#[derive(Debug)]
pub(crate) struct Meter {
    steps_left: u64,
    bytes_left: u64,
}

impl Meter {
    pub(crate) fn new() -> Meter {
        Meter {
            steps_left: MAX_STEPS,
            bytes_left: MAX_BUILD_BYTES,
        }
    }

    /// Charges `n` steps.
    pub(crate) fn step(&mut self, n: u64) -> Res<()> {
        match self.steps_left.checked_sub(n) {
            Some(left) => {
                self.steps_left = left;
                Ok(())
            }
            None => {
                self.steps_left = 0;
                Err(Fault::Limit(format!(
                    "evaluation takes more than the {MAX_STEPS} steps one expression may take"
                )))
            }
        }
    }

    /// Charges walking `n` bytes or items.
    pub(crate) fn scan(&mut self, n: usize) -> Res<()> {
        self.step(n as u64 / SCAN_UNIT)
    }

    /// Charges building `bytes` bytes of `what` (e.g. "a string"), before building it.
    pub(crate) fn build(&mut self, bytes: u64, what: &str) -> Res<()> {
        match self.bytes_left.checked_sub(bytes) {
            Some(left) => {
                self.bytes_left = left;
                self.step(bytes / SCAN_UNIT)
            }
            None => Err(Fault::Limit(format!(
                "building {what} of {bytes} bytes exceeds the {MAX_BUILD_BYTES} bytes one \
                 expression may build"
            ))),
        }
    }

    /// Bytes left to build: renderers that cannot know their output size in advance stop
    /// once they pass this.
    pub(crate) fn bytes_left(&self) -> u64 {
        self.bytes_left
    }

    /// The approximate size of `value` in bytes, walking at most what the build budget could
    /// still pay for (`None` if it is bigger than that).
    pub(crate) fn size_of(&mut self, value: &Value) -> Res<Option<u64>> {
        let cap = self.bytes_left;
        let mut total: u64 = 0;
        let mut visited: usize = 0;
        // An explicit stack, so that a deep value is refused rather than overflowing ours: the
        // copy that follows recurses.
        let mut stack = vec![(value, 0)];
        while let Some((v, depth)) = stack.pop() {
            visited += 1;
            check_depth(depth)?;
            total = total.saturating_add(SLOT);
            match v {
                Value::String(s) => total = total.saturating_add(s.len() as u64),
                Value::Array(items) => stack.extend(items.iter().map(|item| (item, depth + 1))),
                Value::Object(map) => {
                    for (key, item) in map {
                        total = total.saturating_add(key.len() as u64);
                        stack.push((item, depth + 1));
                    }
                }
                Value::Null | Value::Bool(_) | Value::Number(_) => {}
            }
            if total > cap {
                self.scan(visited)?;
                return Ok(None);
            }
        }
        self.scan(visited)?;
        Ok(Some(total))
    }

    /// A copy of `value`, charged to the budget.
    pub(crate) fn copy(&mut self, value: &Value) -> Res<Value> {
        let left = self.bytes_left;
        match self.size_of(value)? {
            Some(size) => self.build(size, "a copy of a value")?,
            None => {
                return Err(Fault::Limit(format!(
                    "copying a value of more than {left} bytes exceeds the {MAX_BUILD_BYTES} \
                     bytes one expression may build"
                )));
            }
        }
        Ok(value.clone())
    }
}
