//! The tree-walking evaluator.
//!
//! Values are borrowed from the context (and from the syntax tree, for literals) wherever
//! they can be: `a.b.c` or `[x.name for x in big_list]` copies only what ends up in the
//! result, and every copy is charged to the [`Meter`].

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::FUNCTIONS;
use super::ast::{self, BinOp, Clause, CmpOp, Kind, Node, Target, Trailer};
use super::builtins::{self, Args, iterate, meter_own};
use super::error::{Error, Fault, Res};
use super::meter::{Meter, SLOT};
use super::methods::{self, DICT_METHODS, LIST_METHODS, STR_METHODS};
use super::value::{self, index_value, position, slice_positions, truthy, type_name};

/// Evaluates `node` with the names of `ctx` in scope.
pub(crate) fn evaluate(node: &Node, ctx: &Value) -> Result<Value, Error> {
    let mut evaluator = Evaluator {
        meter: Meter::new(),
    };
    let root = Scope::Root(ctx);
    let result = evaluator.eval(node, &root)?;
    evaluator.own(result, node.column)
}

/// Where names are looked up: comprehension variables, innermost first, then the context.
/// Each `for` clause binds its variable in a new scope on the evaluator's stack that points
/// to the enclosing one.
enum Scope<'v> {
    Root(&'v Value),
    Bind {
        parent: &'v Scope<'v>,
        target: &'v Target,
        /// The item, for [`Target::Tuple`] already unpacked into a list of the right length.
        value: &'v Value,
    },
}

impl<'v> Scope<'v> {
    fn lookup(&self, name: &str) -> Option<&'v Value> {
        let mut scope = self;
        loop {
            match scope {
                Scope::Root(ctx) => {
                    let ctx: &'v Value = ctx;
                    return ctx.as_object()?.get(name);
                }
                Scope::Bind {
                    parent,
                    target,
                    value,
                } => {
                    let value: &'v Value = value;
                    match target {
                        Target::Name(bound) if bound == name => return Some(value),
                        Target::Tuple(names) => {
                            if let Some(i) = names.iter().position(|n| n == name) {
                                return value.as_array()?.get(i);
                            }
                        }
                        Target::Name(_) => {}
                    }
                    scope = parent;
                }
            }
        }
    }

    fn root(&self) -> &'v Value {
        let mut scope = self;
        loop {
            match scope {
                Scope::Root(ctx) => return ctx,
                Scope::Bind { parent, .. } => scope = parent,
            }
        }
    }
}

/// What a comprehension produces for each combination of its clauses.
#[derive(Clone, Copy)]
enum Body<'v> {
    List(&'v Node),
    Dict(&'v Node, &'v Node),
}

enum Output {
    List(Vec<Value>),
    Dict(Map<String, Value>),
}

struct Evaluator {
    meter: Meter,
}

impl Evaluator {
    // A thin dispatcher: evaluation recurses through here once per level of the tree, and in
    // unoptimized builds a function's stack frame holds the temporaries of all its match arms.
    fn eval<'v>(&mut self, node: &'v Node, scope: &Scope<'v>) -> Result<Cow<'v, Value>, Error> {
        if let Err(fault) = self.meter.step(1) {
            return Err(fault.at(node.column));
        }
        let column = node.column;
        match &node.kind {
            Kind::Literal(value) => Ok(Cow::Borrowed(value)),
            Kind::Name(name) => self.name(name, column, scope),
            Kind::List(items) => self.list(items, scope),
            Kind::Dict(entries) => self.dict(entries, scope),
            Kind::ListComp { element, clauses } => {
                self.comprehension(Body::List(element), clauses, scope)
            }
            Kind::DictComp {
                key,
                value,
                clauses,
            } => self.comprehension(Body::Dict(key, value), clauses, scope),
            Kind::Call(call) => self.call(&call.0, &call.1, column, scope),
            Kind::Postfix { base, trailers } => self.postfix(base, trailers, scope),
            Kind::Neg(operand) => self.unary(operand, value::negate, column, scope),
            Kind::Pos(operand) => self.unary(operand, value::plus, column, scope),
            Kind::Not(operand) => self.not(operand, scope),
            Kind::Arith { first, rest } => self.arith(first, rest, scope),
            Kind::Compare { first, rest } => self.compare(first, rest, scope),
            Kind::And(operands) => self.logic(operands, false, scope),
            Kind::Or(operands) => self.logic(operands, true, scope),
            Kind::IfElse(parts) => self.conditional(parts, scope),
        }
    }

    fn not<'v>(&mut self, operand: &'v Node, scope: &Scope<'v>) -> Result<Cow<'v, Value>, Error> {
        let value = self.eval(operand, scope)?;
        Ok(Cow::Owned(Value::Bool(!truthy(&value))))
    }

    fn conditional<'v>(
        &mut self,
        [condition, then, otherwise]: &'v [Node; 3],
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let condition = truthy(&*self.eval(condition, scope)?);
        self.eval(if condition { then } else { otherwise }, scope)
    }

    fn own(&mut self, value: Cow<'_, Value>, column: usize) -> Result<Value, Error> {
        meter_own(value, &mut self.meter).map_err(|f| f.at(column))
    }

    fn name<'v>(
        &mut self,
        name: &str,
        column: usize,
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        if let Some(value) = scope.lookup(name) {
            return Ok(Cow::Borrowed(value));
        }
        if FUNCTIONS.contains(&name) {
            return Err(Error::Type {
                message: format!("'{name}' is a function: call it, as in {name}(...)"),
                column,
            });
        }
        Err(Error::UnknownName {
            name: name.to_owned(),
            column,
        })
    }

    fn list<'v>(&mut self, items: &'v [Node], scope: &Scope<'v>) -> Result<Cow<'v, Value>, Error> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let value = self.eval(item, scope)?;
            self.meter
                .build(SLOT, "a list")
                .map_err(|f| f.at(item.column))?;
            out.push(self.own(value, item.column)?);
        }
        Ok(Cow::Owned(Value::Array(out)))
    }

    fn dict<'v>(
        &mut self,
        entries: &'v [(Node, Node)],
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let mut out = Map::new();
        for (key, value) in entries {
            let (key, value) = self.entry(key, value, scope)?;
            out.insert(key, value);
        }
        Ok(Cow::Owned(Value::Object(out)))
    }

    /// One `key: value` of a dict display or comprehension.
    fn entry<'v>(
        &mut self,
        key: &'v Node,
        value: &'v Node,
        scope: &Scope<'v>,
    ) -> Result<(String, Value), Error> {
        let name = match self.eval(key, scope)? {
            Cow::Owned(Value::String(s)) => s,
            Cow::Borrowed(Value::String(s)) => s.clone(),
            other => {
                return Err(Error::Type {
                    message: format!(
                        "dict keys must be strings (JSON has no other keys), not '{}'",
                        type_name(&other)
                    ),
                    column: key.column,
                });
            }
        };
        self.meter
            .build(SLOT + name.len() as u64, "a dict")
            .map_err(|f| f.at(key.column))?;
        let item = self.eval(value, scope)?;
        Ok((name, self.own(item, value.column)?))
    }

    fn comprehension<'v>(
        &mut self,
        body: Body<'v>,
        clauses: &'v [Clause],
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let mut out = match body {
            Body::List(_) => Output::List(Vec::new()),
            Body::Dict(..) => Output::Dict(Map::new()),
        };
        self.clauses(body, clauses, scope, &mut out)?;
        Ok(Cow::Owned(match out {
            Output::List(items) => Value::Array(items),
            Output::Dict(map) => Value::Object(map),
        }))
    }

    /// Runs the first of `clauses`, and for each item it lets through, the rest.
    fn clauses<'v>(
        &mut self,
        body: Body<'v>,
        clauses: &'v [Clause],
        scope: &Scope<'v>,
        out: &mut Output,
    ) -> Result<(), Error> {
        let Some((clause, rest)) = clauses.split_first() else {
            return self.emit(body, scope, out);
        };
        match clause {
            Clause::If(condition) => {
                if truthy(&*self.eval(condition, scope)?) {
                    self.clauses(body, rest, scope, out)?;
                }
                Ok(())
            }
            Clause::For { target, iter } => {
                let at = |fault: Fault| fault.at(iter.column);
                let iterable = self.eval(iter, scope)?;
                let items = iterate(&iterable, &mut self.meter).map_err(at)?;
                for item in &items {
                    self.meter.step(1).map_err(at)?;
                    let value = match target {
                        Target::Name(_) => Cow::Borrowed(&**item),
                        Target::Tuple(names) => {
                            unpack(item, names.len(), &mut self.meter).map_err(at)?
                        }
                    };
                    let inner = Scope::Bind {
                        parent: scope,
                        target,
                        value: &value,
                    };
                    self.clauses(body, rest, &inner, out)?;
                }
                Ok(())
            }
        }
    }

    fn emit<'v>(
        &mut self,
        body: Body<'v>,
        scope: &Scope<'v>,
        out: &mut Output,
    ) -> Result<(), Error> {
        match (body, out) {
            (Body::List(element), Output::List(items)) => {
                let value = self.eval(element, scope)?;
                self.meter
                    .build(SLOT, "a list")
                    .map_err(|f| f.at(element.column))?;
                items.push(self.own(value, element.column)?);
            }
            (Body::Dict(key, value), Output::Dict(map)) => {
                let (key, value) = self.entry(key, value, scope)?;
                map.insert(key, value);
            }
            // `comprehension` makes the output to match the body.
            (Body::List(_), Output::Dict(_)) | (Body::Dict(..), Output::List(_)) => {}
        }
        Ok(())
    }

    fn call<'v>(
        &mut self,
        function: &'v str,
        args: &'v ast::Args,
        column: usize,
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        if !FUNCTIONS.contains(&function) {
            return Err(Error::UnknownFunction {
                name: function.to_owned(),
                column,
            });
        }
        let args = self.args(args, scope)?;
        self.dispatch(function, args, column, scope)
    }

    fn dispatch<'v>(
        &mut self,
        function: &'v str,
        args: Args<'v>,
        column: usize,
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let at = |fault: Fault| fault.at(column);
        match function {
            "is_present" => {
                let [path] = args.bind(function, ["name"], 1).map_err(at)?;
                let found = resolve(scope, path.as_deref(), function).map_err(at)?;
                Ok(Cow::Owned(Value::Bool(found.is_some())))
            }
            "getattr" => {
                let [path, default] = args.bind(function, ["name", "default"], 1).map_err(at)?;
                match resolve(scope, path.as_deref(), function).map_err(at)? {
                    Some(found) => Ok(Cow::Borrowed(found)),
                    None => Ok(default.unwrap_or(Cow::Owned(Value::Null))),
                }
            }
            _ => builtins::call(function, args, &mut self.meter).map_err(at),
        }
    }

    fn args<'v>(&mut self, args: &'v ast::Args, scope: &Scope<'v>) -> Result<Args<'v>, Error> {
        let mut positional = Vec::with_capacity(args.positional.len());
        for arg in &args.positional {
            positional.push(self.eval(arg, scope)?);
        }
        let mut keyword = Vec::with_capacity(args.keyword.len());
        for (name, arg) in &args.keyword {
            keyword.push((name.as_str(), self.eval(arg, scope)?));
        }
        Ok(Args {
            positional,
            keyword,
        })
    }

    fn postfix<'v>(
        &mut self,
        base: &'v Node,
        trailers: &'v [Trailer],
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let mut current = self.eval(base, scope)?;
        for trailer in trailers {
            current = self.trailer(current, trailer, scope)?;
        }
        Ok(current)
    }

    fn trailer<'v>(
        &mut self,
        current: Cow<'v, Value>,
        trailer: &'v Trailer,
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        Ok(match trailer {
            Trailer::Attr { name, column } => {
                attribute(current, name).map_err(|f| f.at(*column))?
            }
            Trailer::Index { index, column } => {
                let key = self.eval(index, scope)?;
                subscript(current, &key, &mut self.meter).map_err(|f| f.at(*column))?
            }
            Trailer::Slice {
                lower,
                upper,
                step,
                column,
            } => {
                let lower = self.bound(lower.as_ref(), scope)?;
                let upper = self.bound(upper.as_ref(), scope)?;
                let step = self.bound(step.as_ref(), scope)?;
                let sliced = slice(&current, lower, upper, step, &mut self.meter)
                    .map_err(|f| f.at(*column))?;
                Cow::Owned(sliced)
            }
            Trailer::Method(call, column) => {
                let (name, args) = &**call;
                let args = self.args(args, scope)?;
                let result = methods::call(&current, name, args, &mut self.meter)
                    .map_err(|f| f.at(*column))?;
                Cow::Owned(result)
            }
        })
    }

    /// A slice bound: absent and `None` both mean "from the end it starts at".
    fn bound<'v>(
        &mut self,
        node: Option<&'v Node>,
        scope: &Scope<'v>,
    ) -> Result<Option<i64>, Error> {
        let Some(node) = node else {
            return Ok(None);
        };
        match &*self.eval(node, scope)? {
            Value::Null => Ok(None),
            value => index_value(value, "a slice index")
                .map(Some)
                .map_err(|f| f.at(node.column)),
        }
    }

    fn unary<'v>(
        &mut self,
        operand: &'v Node,
        op: fn(&Value) -> Res<Value>,
        column: usize,
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let value = self.eval(operand, scope)?;
        op(&value).map(Cow::Owned).map_err(|f| f.at(column))
    }

    fn arith<'v>(
        &mut self,
        first: &'v Node,
        rest: &'v [(BinOp, usize, Node)],
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let mut total = self.eval(first, scope)?;
        for (op, column, operand) in rest {
            let right = self.eval(operand, scope)?;
            let result = value::binary(*op, total, &right, &mut self.meter);
            total = Cow::Owned(result.map_err(|f| f.at(*column))?);
        }
        Ok(total)
    }

    fn compare<'v>(
        &mut self,
        first: &'v Node,
        rest: &'v [(CmpOp, usize, Node)],
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let mut left = self.eval(first, scope)?;
        for (op, column, operand) in rest {
            let right = self.eval(operand, scope)?;
            let holds =
                compare_pair(*op, &left, &right, &mut self.meter).map_err(|f| f.at(*column))?;
            if !holds {
                return Ok(Cow::Owned(Value::Bool(false)));
            }
            left = right;
        }
        Ok(Cow::Owned(Value::Bool(true)))
    }

    /// `and` (`stop_on` false) and `or` (`stop_on` true): the first operand whose truth is
    /// `stop_on`, or else the last, as in Python.
    fn logic<'v>(
        &mut self,
        operands: &'v [Node],
        stop_on: bool,
        scope: &Scope<'v>,
    ) -> Result<Cow<'v, Value>, Error> {
        let mut last = Cow::Owned(Value::Null);
        for operand in operands {
            last = self.eval(operand, scope)?;
            if truthy(&last) == stop_on {
                break;
            }
        }
        Ok(last)
    }
}

fn compare_pair(op: CmpOp, left: &Value, right: &Value, meter: &mut Meter) -> Res<bool> {
    use std::cmp::Ordering::{Greater, Less};
    Ok(match op {
        CmpOp::Eq => value::eq(left, right, meter)?,
        CmpOp::Ne => !value::eq(left, right, meter)?,
        CmpOp::Lt => value::compare(left, right, op.symbol(), meter)? == Less,
        CmpOp::Le => value::compare(left, right, op.symbol(), meter)? != Greater,
        CmpOp::Gt => value::compare(left, right, op.symbol(), meter)? == Greater,
        CmpOp::Ge => value::compare(left, right, op.symbol(), meter)? != Less,
        CmpOp::In => value::contains(right, left, meter)?,
        CmpOp::NotIn => !value::contains(right, left, meter)?,
        CmpOp::Is => value::same(left, right),
        CmpOp::IsNot => !value::same(left, right),
    })
}

/// `item` unpacked into `n` names: a list of exactly `n` items.
fn unpack<'a>(item: &'a Value, n: usize, meter: &mut Meter) -> Res<Cow<'a, Value>> {
    let parts = match item {
        Value::Array(parts) => {
            if parts.len() == n {
                return Ok(Cow::Borrowed(item));
            }
            parts.len()
        }
        Value::String(_) | Value::Object(_) => {
            let parts = iterate(item, meter)?;
            if parts.len() == n {
                let mut owned = Vec::with_capacity(n);
                for part in parts {
                    owned.push(meter_own(part, meter)?);
                }
                return Ok(Cow::Owned(Value::Array(owned)));
            }
            parts.len()
        }
        other => {
            return Err(Fault::Type(format!(
                "cannot unpack non-iterable '{}' object",
                type_name(other)
            )));
        }
    };
    Err(Fault::Value(format!(
        "cannot unpack {parts} values into {n} names"
    )))
}

/// `current.name`: a key of an object.
fn attribute<'v>(current: Cow<'v, Value>, name: &str) -> Res<Cow<'v, Value>> {
    match current {
        Cow::Borrowed(Value::Object(map)) => map
            .get(name)
            .map(Cow::Borrowed)
            .ok_or_else(|| Fault::missing_key(name, map)),
        Cow::Owned(Value::Object(mut map)) => match map.remove(name) {
            Some(value) => Ok(Cow::Owned(value)),
            None => Err(Fault::missing_key(name, &map)),
        },
        other => {
            let kind = type_name(&other);
            let methods: &[&str] = match &*other {
                Value::String(_) => STR_METHODS,
                Value::Array(_) => LIST_METHODS,
                _ => &[],
            };
            Err(Fault::Type(if methods.contains(&name) {
                format!("'{kind}' method '{name}' must be called, as in x.{name}(...)")
            } else {
                format!("'{kind}' object has no attribute '{name}'")
            }))
        }
    }
    .map_err(|fault| match fault {
        // `d.keys` without parentheses on a dict that has no key "keys".
        Fault::MissingKey { ref key, .. } if DICT_METHODS.contains(&key.as_str()) => Fault::Type(
            format!("the dict has no key '{key}'; to call the method, write x.{key}()"),
        ),
        fault => fault,
    })
}

/// `current[key]`.
fn subscript<'v>(current: Cow<'v, Value>, key: &Value, meter: &mut Meter) -> Res<Cow<'v, Value>> {
    match current {
        Cow::Borrowed(Value::Array(items)) => {
            let at = position(index_value(key, "a list index")?, items.len(), "list")?;
            Ok(items.get(at).map_or(Cow::Owned(Value::Null), Cow::Borrowed))
        }
        Cow::Owned(Value::Array(mut items)) => {
            let at = position(index_value(key, "a list index")?, items.len(), "list")?;
            Ok(Cow::Owned(
                items.get_mut(at).map(std::mem::take).unwrap_or_default(),
            ))
        }
        Cow::Borrowed(Value::Object(map)) => match key {
            Value::String(k) => map
                .get(k)
                .map(Cow::Borrowed)
                .ok_or_else(|| Fault::missing_key(k, map)),
            other => Err(key_fault(map, other, meter)),
        },
        Cow::Owned(Value::Object(mut map)) => match key {
            Value::String(k) => match map.remove(k) {
                Some(value) => Ok(Cow::Owned(value)),
                None => Err(Fault::missing_key(k, &map)),
            },
            other => Err(key_fault(&map, other, meter)),
        },
        Cow::Borrowed(Value::String(s)) => char_at(s, key, meter),
        Cow::Owned(Value::String(s)) => char_at(&s, key, meter),
        other => Err(Fault::Type(format!(
            "'{}' object is not subscriptable",
            type_name(&other)
        ))),
    }
}

/// Why `map[key]` fails for a key that is not a string: JSON keys are strings.
fn key_fault(map: &Map<String, Value>, key: &Value, meter: &mut Meter) -> Fault {
    match key {
        Value::Array(_) | Value::Object(_) => {
            Fault::Type(format!("unhashable type: '{}'", type_name(key)))
        }
        other => match value::repr(other, meter) {
            Ok(shown) => Fault::missing_key(&shown, map),
            Err(fault) => fault,
        },
    }
}

/// `s[key]`: the character at an index.
fn char_at<'v>(s: &str, key: &Value, meter: &mut Meter) -> Res<Cow<'v, Value>> {
    meter.scan(s.len())?;
    let at = position(
        index_value(key, "a string index")?,
        s.chars().count(),
        "str",
    )?;
    meter.build(SLOT + 4, "a string")?;
    let c = s.chars().nth(at).map(String::from).unwrap_or_default();
    Ok(Cow::Owned(Value::String(c)))
}

/// `value[lower:upper:step]`.
fn slice(
    value: &Value,
    lower: Option<i64>,
    upper: Option<i64>,
    step: Option<i64>,
    meter: &mut Meter,
) -> Res<Value> {
    match value {
        Value::Array(items) => {
            let positions = slice_positions(items.len(), lower, upper, step)?;
            meter.build(SLOT * positions.len() as u64, "a list")?;
            let mut out = Vec::with_capacity(positions.len());
            for at in positions {
                if let Some(item) = items.get(at) {
                    out.push(meter.copy(item)?);
                }
            }
            Ok(Value::Array(out))
        }
        Value::String(s) => {
            meter.scan(s.len())?;
            let chars: Vec<char> = s.chars().collect();
            let positions = slice_positions(chars.len(), lower, upper, step)?;
            meter.build(4 * positions.len() as u64, "a string")?;
            Ok(Value::String(
                positions.iter().filter_map(|at| chars.get(*at)).collect(),
            ))
        }
        other => Err(Fault::Type(format!(
            "'{}' object cannot be sliced",
            type_name(other)
        ))),
    }
}

/// The value a path names for `is_present` and `getattr`: `"a"`, `"a.b.c"`, `"a.b[0]"`,
/// optionally prefixed with `"$."` as in the JSONPaths of flow definitions; `None` if it is
/// not there.
fn resolve<'v>(scope: &Scope<'v>, path: Option<&Value>, function: &str) -> Res<Option<&'v Value>> {
    let path = match path {
        Some(Value::String(path)) => path.as_str(),
        Some(other) => {
            return Err(Fault::Type(format!(
                "{function}() takes the name of a value as a string, not '{}'",
                type_name(other)
            )));
        }
        None => return Err(Fault::Type(format!("{function}() missing argument 'name'"))),
    };
    let invalid = || {
        Fault::Value(format!(
            "{function}(): invalid path '{path}': expected names separated by '.', each \
             optionally followed by [index]"
        ))
    };
    if path == "$" {
        return Ok(Some(scope.root()));
    }
    let relative = path.strip_prefix("$.").unwrap_or(path);
    let mut current: Option<&'v Value> = None;
    for (i, segment) in relative.split('.').enumerate() {
        let (name, mut indices) = match segment.find('[') {
            Some(at) => (
                segment.get(..at).unwrap_or_default(),
                segment.get(at..).unwrap_or_default(),
            ),
            None => (segment, ""),
        };
        if name.is_empty() {
            return Err(invalid());
        }
        let found = match current {
            None if i == 0 => scope.lookup(name),
            Some(Value::Object(map)) => map.get(name),
            _ => None,
        };
        let Some(mut value) = found else {
            return Ok(None);
        };
        while !indices.is_empty() {
            let (index, rest) = indices
                .strip_prefix('[')
                .and_then(|s| s.split_once(']'))
                .ok_or_else(invalid)?;
            let index: i64 = index.trim().parse().map_err(|_| invalid())?;
            indices = rest;
            let Value::Array(items) = value else {
                return Ok(None);
            };
            let Ok(at) = position(index, items.len(), "list") else {
                return Ok(None);
            };
            let Some(item) = items.get(at) else {
                return Ok(None);
            };
            value = item;
        }
        current = Some(value);
    }
    Ok(current)
}
