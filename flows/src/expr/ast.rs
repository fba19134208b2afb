//! The syntax tree the parser builds and the evaluator walks.
//!
//! Chains of one precedence level (`a + b - c`, `a < b < c`, `a or b or c`) and of trailers
//! (`a.b[0].c()`) are flat lists rather than nested nodes, so the tree is only as deep as the
//! source nests brackets and prefix operators, which the parser bounds by
//! [`MAX_DEPTH`](super::MAX_DEPTH): evaluating and dropping a tree cannot overflow the stack.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    /// Where errors about this node point: its first token, or its operator.
    pub(crate) column: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// Numbers, strings, `True`, `False`, `None`.
    Literal(Value),
    Name(String),
    /// `[a, b]`, and tuples `(a, b)`: JSON has only one kind of sequence.
    List(Vec<Node>),
    Dict(Vec<(Node, Node)>),
    /// `[element for ... if ...]`, and generator expressions `f(x for x in y)`.
    ListComp {
        element: Box<Node>,
        clauses: Vec<Clause>,
    },
    DictComp {
        key: Box<Node>,
        value: Box<Node>,
        clauses: Vec<Clause>,
    },
    /// A call of a built-in function by name (boxed to keep nodes small).
    Call(Box<(String, Args)>),
    /// `base` followed by attribute lookups, subscripts and method calls.
    Postfix {
        base: Box<Node>,
        trailers: Vec<Trailer>,
    },
    Neg(Box<Node>),
    Pos(Box<Node>),
    Not(Box<Node>),
    /// `first op1 x1 op2 x2 ...`, left-associative; `**` is right-associative and so always
    /// has exactly one operation.
    Arith {
        first: Box<Node>,
        rest: Vec<(BinOp, usize, Node)>,
    },
    /// `first op1 x1 op2 x2 ...` meaning `first op1 x1 and x1 op2 x2 and ...`, each operand
    /// evaluated at most once.
    Compare {
        first: Box<Node>,
        rest: Vec<(CmpOp, usize, Node)>,
    },
    And(Vec<Node>),
    Or(Vec<Node>),
    /// `[condition, then, otherwise]`.
    IfElse(Box<[Node; 3]>),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Args {
    pub(crate) positional: Vec<Node>,
    pub(crate) keyword: Vec<(String, Node)>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Trailer {
    /// `.name`: a key lookup on an object.
    Attr { name: String, column: usize },
    /// `[index]`.
    Index { index: Node, column: usize },
    /// `[lower:upper:step]`.
    Slice {
        lower: Option<Node>,
        upper: Option<Node>,
        step: Option<Node>,
        column: usize,
    },
    /// `.name(args)` (boxed to keep trailers small).
    Method(Box<(String, Args)>, usize),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Clause {
    For { target: Target, iter: Node },
    If(Node),
}

/// What a `for` clause binds: a name, or names to unpack each item into.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Target {
    Name(String),
    Tuple(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Mod,
    Pow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    Is,
    IsNot,
}

impl BinOp {
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::FloorDiv => "//",
            BinOp::Mod => "%",
            BinOp::Pow => "**",
        }
    }
}

impl CmpOp {
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::In => "in",
            CmpOp::NotIn => "not in",
            CmpOp::Is => "is",
            CmpOp::IsNot => "is not",
        }
    }
}
