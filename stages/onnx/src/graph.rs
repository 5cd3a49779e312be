//! A small builder over the ONNX protobuf types that `tract-onnx` exposes (`tract_onnx::pb`).

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::type_proto::{self, Tensor as TensorType};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

pub const OPSET: i64 = 17;
/// ONNX IR version 8 goes with opset 17.
pub const IR_VERSION: i64 = 8;

/// A dimension of a graph input/output: fixed or named (dynamic).
#[derive(Clone, Debug)]
pub enum Dim {
    Fixed(usize),
    Named(&'static str),
}

pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Graph(GraphProto),
}

#[derive(Default)]
pub struct Graph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
    counter: usize,
    prefix: String,
}

pub fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Named(s) => dimension::Value::DimParam(s.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(TensorType {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// A value whose rank is known but not its shape (for subgraph inputs).
pub fn value_info_any(name: &str, elem: DataType) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(TensorType { elem_type: elem as i32, shape: None })),
        }),
        doc_string: String::new(),
    }
}

impl Graph {
    pub fn new(prefix: &str) -> Graph {
        Graph { prefix: prefix.to_string(), ..Default::default() }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{}{hint}_{}", self.prefix, self.counter)
    }

    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    pub fn output(&mut self, value: &str, name: &str, elem: DataType, dims: &[Dim]) {
        self.node_named("Identity", &[value], &[name], vec![]);
        self.outputs.push(value_info(name, elem, dims));
    }

    /// An f32 initializer.
    pub fn f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.initializers.push(TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.to_string()
    }

    pub fn i8(&mut self, name: &str, dims: &[usize], data: &[i8]) -> String {
        self.initializers.push(TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Int8 as i32,
            raw_data: data.iter().map(|&v| v as u8).collect(),
            ..Default::default()
        });
        name.to_string()
    }

    /// An int64 constant (initializer), for shapes, axes and indices.
    pub fn i64s(&mut self, hint: &str, data: &[i64]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: vec![data.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    /// An f32 scalar constant.
    pub fn scalar(&mut self, hint: &str, v: f32) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: vec![],
            data_type: DataType::Float as i32,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name
    }

    pub fn node_named(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        let name = self.fresh(op);
        let attribute = attrs
            .into_iter()
            .map(|(n, a)| {
                let mut p = AttributeProto { name: n.to_string(), ..Default::default() };
                match a {
                    Attr::Int(i) => {
                        p.r#type = AttributeType::Int as i32;
                        p.i = i;
                    }
                    Attr::Ints(v) => {
                        p.r#type = AttributeType::Ints as i32;
                        p.ints = v;
                    }
                    Attr::Float(f) => {
                        p.r#type = AttributeType::Float as i32;
                        p.f = f;
                    }
                    Attr::Graph(g) => {
                        p.r#type = AttributeType::Graph as i32;
                        p.g = Some(g);
                    }
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.to_string(),
            domain: String::new(),
            attribute,
            doc_string: String::new(),
        });
    }

    /// One node with one output; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.node_named(op, inputs, &[&out], attrs);
        out
    }

    pub fn op2(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> (String, String) {
        let a = self.fresh(&op.to_lowercase());
        let b = self.fresh(&op.to_lowercase());
        self.node_named(op, inputs, &[&a, &b], attrs);
        (a, b)
    }

    pub fn into_proto(self, name: &str) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: name.to_string(),
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        }
    }

    // Common compositions.

    pub fn binary(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(op, &[a, b], vec![])
    }

    pub fn unary(&mut self, op: &str, a: &str) -> String {
        self.op(op, &[a], vec![])
    }

    /// Slice along `axes` with constant bounds.
    pub fn slice(&mut self, x: &str, starts: &[i64], ends: &[i64], axes: &[i64]) -> String {
        let (s, e, a) = (self.i64s("starts", starts), self.i64s("ends", ends), self.i64s("axes", axes));
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }

    pub fn silu(&mut self, x: &str) -> String {
        let s = self.unary("Sigmoid", x);
        self.binary("Mul", x, &s)
    }

    /// Exact (erf) GELU: 0.5·x·(1 + erf(x/√2)).
    pub fn gelu(&mut self, x: &str) -> String {
        let r2 = self.scalar("sqrt2", std::f32::consts::SQRT_2);
        let half = self.scalar("half", 0.5);
        let one = self.scalar("one", 1.0);
        let d = self.binary("Div", x, &r2);
        let e = self.unary("Erf", &d);
        let p = self.binary("Add", &e, &one);
        let m = self.binary("Mul", x, &p);
        self.binary("Mul", &m, &half)
    }

    pub fn layer_norm(&mut self, x: &str, w: &str, b: &str, eps: f64) -> String {
        self.op("LayerNormalization", &[x, w, b], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))])
    }

    pub fn reduce(&mut self, op: &str, x: &str, axis: i64) -> String {
        // Opset 17: ReduceSum takes axes as an input, the others as an attribute.
        if op == "ReduceSum" {
            let a = self.i64s("axes", &[axis]);
            self.op(op, &[x, &a], vec![("keepdims", Attr::Int(1))])
        } else {
            self.op(op, &[x], vec![("axes", Attr::Ints(vec![axis])), ("keepdims", Attr::Int(1))])
        }
    }
}

pub fn model(graph: GraphProto, doc: &str) -> ModelProto {
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "orchestrate".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc.to_string(),
        graph: Some(graph),
        ..Default::default()
    }
}
