//! Itera-Lite and the Transformer as ONNX graphs (opset 17), weights as initializers.
//!
//! - Full sequence: `input_ids` int64 [batch, seq] → `logits` f32 [batch, seq, vocab].
//! - Itera-Lite step: `input_ids` [batch, 1], `position` int64 [1], and per layer
//!   `conv_state.<i>` [batch, d_conv−1, d_inner] and `ssm_state.<i>` [batch, d_state] →
//!   `logits` [batch, 1, vocab], `conv_state_out.<i>`, `ssm_state_out.<i>`.
//!
//! The SSM recurrence is an ONNX `Scan` over time (tract has no `Loop`); the depthwise causal
//! convolution a grouped `Conv` with left padding; MoE is computed densely with the gates zero
//! off the top-k, exactly as the native training path. Quantized weights are stored as int8
//! initializers with f32 scales and dequantized in the graph (`Cast` · scale): tract 0.23's
//! `DequantizeLinear` reads only the first scale, which would silently break per-channel scales.

use std::collections::BTreeMap;

use itera_models::config::{IteraConfig, TransformerConfig};
use itera_models::quant::QWeight;
use itera_models::{Model, ModelConfig};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::ModelProto;

use crate::graph::{model, value_info_any, Attr, Dim, Graph};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the checkpoint has no tensor `{0}`")]
    Missing(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Weights of a model: every variable (quantized ones hold dequantized values) and the
/// quantized matrices themselves.
pub struct Weights {
    values: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    quant: BTreeMap<String, QWeight>,
}

impl Weights {
    pub fn of(model: &mut Model) -> Result<Weights, ExportError> {
        Ok(Weights { values: model.named_values()?, quant: model.quantized_weights() })
    }

    fn get(&self, name: &str) -> Result<&(Vec<usize>, Vec<f32>), ExportError> {
        self.values.get(name).ok_or_else(|| ExportError::Missing(name.to_string()))
    }

    pub fn is_quantized(&self) -> bool {
        !self.quant.is_empty()
    }
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = data[r * cols + c];
        }
    }
    t
}

struct Builder<'a> {
    g: Graph,
    w: &'a Weights,
}

impl Builder<'_> {
    /// A weight as-is.
    fn param(&mut self, name: &str) -> Result<String, ExportError> {
        let (dims, data) = self.w.get(name)?;
        Ok(self.g.f32(name, dims, data))
    }

    /// A (out, in) weight as the (in, out) right operand of MatMul.
    fn matrix_t(&mut self, name: &str) -> Result<String, ExportError> {
        if let Some(q) = self.w.quant.get(name) {
            let (rows, cols, groups) = (q.rows, q.cols, q.cols / q.group);
            let mut qt = vec![0i8; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    qt[c * rows + r] = q.q[r * cols + c];
                }
            }
            // scales (rows, groups) → (groups, 1, rows) to broadcast over (groups, group, rows).
            let mut st = vec![0f32; rows * groups];
            for r in 0..rows {
                for g in 0..groups {
                    st[g * rows + r] = q.scales[r * groups + g];
                }
            }
            let wq = self.g.i8(&format!("{name}_t.int8"), &[cols, rows], &qt);
            let s = self.g.f32(&format!("{name}_t.scale"), &[groups, 1, rows], &st);
            let f = self.g.op("Cast", &[&wq], vec![("to", Attr::Int(DataType::Float as i64))]);
            let grouped_shape = self.g.i64s("shape", &[groups as i64, q.group as i64, rows as i64]);
            let grouped = self.g.op("Reshape", &[&f, &grouped_shape], vec![]);
            let scaled = self.g.binary("Mul", &grouped, &s);
            let flat = self.g.i64s("shape", &[cols as i64, rows as i64]);
            return Ok(self.g.op("Reshape", &[&scaled, &flat], vec![]));
        }
        let (dims, data) = self.w.get(name)?;
        let (rows, cols) = (dims[0], dims[1]);
        Ok(self.g.f32(&format!("{name}_t"), &[cols, rows], &transpose(data, rows, cols)))
    }

    fn linear(&mut self, prefix: &str, x: &str, bias: bool) -> Result<String, ExportError> {
        let w = self.matrix_t(&format!("{prefix}.weight"))?;
        let y = self.g.binary("MatMul", x, &w);
        if bias {
            let b = self.param(&format!("{prefix}.bias"))?;
            return Ok(self.g.binary("Add", &y, &b));
        }
        Ok(y)
    }

    fn norm(&mut self, prefix: &str, x: &str, eps: f64) -> Result<String, ExportError> {
        let w = self.param(&format!("{prefix}.weight"))?;
        let b = self.param(&format!("{prefix}.bias"))?;
        Ok(self.g.layer_norm(x, &w, &b, eps))
    }

    fn expert(&mut self, prefix: &str, x: &str) -> Result<String, ExportError> {
        let up = self.linear(&format!("{prefix}.up"), x, false)?;
        let act = self.g.gelu(&up);
        self.linear(&format!("{prefix}.down"), &act, false)
    }

    /// Token + position embeddings; `positions` is the [seq, d] slice of the position table.
    fn embed(&mut self, ids: &str, positions: &str) -> Result<String, ExportError> {
        let e = self.param("embed.weight")?;
        let tok = self.g.op("Gather", &[&e, ids], vec![("axis", Attr::Int(0))]);
        Ok(self.g.binary("Add", &tok, positions))
    }

    /// Final LayerNorm and the tied head (the embedding, transposed; its quantized copy when
    /// the embedding was quantized).
    fn head(&mut self, x: &str, eps: f64) -> Result<String, ExportError> {
        let h = self.norm("norm_f", x, eps)?;
        let w = self.matrix_t("embed.weight")?;
        Ok(self.g.binary("MatMul", &h, &w))
    }

    /// Feed-forward of layer `i`: dense FFN or MoE (dense, gates zero off the top-k); residual.
    fn feed_forward(&mut self, cfg: &IteraConfig, i: usize, x: &str) -> Result<String, ExportError> {
        if !cfg.moe_layers.contains(&i) {
            let p = format!("layers.{i}.ffn");
            let h = self.norm(&format!("{p}.norm"), x, cfg.ln_eps)?;
            let y = self.expert(&p, &h)?;
            return Ok(self.g.binary("Add", x, &y));
        }
        let p = format!("layers.{i}.moe");
        let h = self.norm(&format!("{p}.norm"), x, cfg.ln_eps)?;
        let logits = self.linear(&format!("{p}.router"), &h, false)?;
        let k = self.g.i64s("k", &[cfg.top_k as i64]);
        let (vals, _) = self.g.op2(
            "TopK",
            &[&logits, &k],
            vec![("axis", Attr::Int(-1)), ("largest", Attr::Int(1)), ("sorted", Attr::Int(1))],
        );
        let kth = self.g.slice(&vals, &[cfg.top_k as i64 - 1], &[cfg.top_k as i64], &[-1]);
        let ge = self.g.binary("GreaterOrEqual", &logits, &kth);
        let mask = self.g.op("Cast", &[&ge], vec![("to", Attr::Int(DataType::Float as i64))]);
        let mx = self.g.reduce("ReduceMax", &logits, -1);
        let shifted = self.g.binary("Sub", &logits, &mx);
        let ex = self.g.unary("Exp", &shifted);
        let weights = self.g.binary("Mul", &ex, &mask);
        let total = self.g.reduce("ReduceSum", &weights, -1);
        let gates = self.g.binary("Div", &weights, &total);
        let mut acc: Option<String> = None;
        for e in 0..cfg.n_experts {
            let y = self.expert(&format!("{p}.experts.{e}"), &h)?;
            let gate = self.g.slice(&gates, &[e as i64], &[e as i64 + 1], &[-1]);
            let term = self.g.binary("Mul", &y, &gate);
            acc = Some(match acc {
                None => term,
                Some(a) => self.g.binary("Add", &a, &term),
            });
        }
        let acc = acc.ok_or_else(|| ExportError::Missing(format!("{p}.experts")))?;
        Ok(self.g.binary("Add", x, &acc))
    }

    /// SSM block up to the recurrence: returns (xc, z, a, u) for a (batch, t, d) input after
    /// the convolution produced `conv_out` (batch, t, d_inner).
    fn ssm_inputs(&mut self, p: &str, conv_out: &str) -> Result<(String, String, String), ExportError> {
        let xc = self.g.silu(conv_out);
        let dp = self.linear(&format!("{p}.delta_proj"), &xc, true)?;
        let sp = self.g.unary("Softplus", &dp);
        let delta = self.g.reduce("ReduceMean", &sp, -1); // (b, t, 1)
        let a_log = self.param(&format!("{p}.A_log"))?;
        let a_exp = self.g.unary("Exp", &a_log);
        let a_neg = self.g.unary("Neg", &a_exp);
        let da = self.g.binary("Mul", &delta, &a_neg);
        let a = self.g.unary("Exp", &da); // (b, t, n)
        let b_t = self.matrix_t(&format!("{p}.B"))?;
        let bx = self.g.binary("MatMul", &xc, &b_t);
        let u = self.g.binary("Mul", &delta, &bx);
        Ok((xc, a, u))
    }

    /// After the recurrence: y = C h + D ⊙ xc, gated by SiLU(z), out_proj, residual.
    fn ssm_output(&mut self, p: &str, x: &str, xc: &str, z: &str, h: &str) -> Result<String, ExportError> {
        let c_t = self.matrix_t(&format!("{p}.C"))?;
        let ch = self.g.binary("MatMul", h, &c_t);
        let d = self.param(&format!("{p}.D"))?;
        let dx = self.g.binary("Mul", xc, &d);
        let y = self.g.binary("Add", &ch, &dx);
        let gate = self.g.silu(z);
        let gated = self.g.binary("Mul", &y, &gate);
        let out = self.linear(&format!("{p}.out_proj"), &gated, false)?;
        Ok(self.g.binary("Add", x, &out))
    }

    fn split_xz(&mut self, p: &str, x: &str, cfg: &IteraConfig) -> Result<(String, String), ExportError> {
        let h = self.norm(&format!("{p}.norm"), x, cfg.ln_eps)?;
        let xz = self.linear(&format!("{p}.in_proj"), &h, false)?;
        let di = cfg.d_inner() as i64;
        let xs = self.g.slice(&xz, &[0], &[di], &[-1]);
        let z = self.g.slice(&xz, &[di], &[2 * di], &[-1]);
        Ok((xs, z))
    }

    /// The position table rows [0, seq) for `ids` of shape (batch, seq).
    fn positions_for(&mut self, ids: &str) -> Result<String, ExportError> {
        let pos = self.param("pos.weight")?;
        let seq = self.g.op("Shape", &[ids], vec![("start", Attr::Int(1)), ("end", Attr::Int(2))]);
        let zero = self.g.i64s("zero", &[0]);
        let axis = self.g.i64s("axes", &[0]);
        Ok(self.g.op("Slice", &[&pos, &zero, &seq, &axis], vec![]))
    }
}

fn scan_body() -> tract_onnx::pb::GraphProto {
    let mut b = Graph::new("scan_");
    b.inputs.push(value_info_any("h_prev", DataType::Float));
    b.inputs.push(value_info_any("a_t", DataType::Float));
    b.inputs.push(value_info_any("u_t", DataType::Float));
    let m = b.binary("Mul", "a_t", "h_prev");
    b.node_named("Add", &[&m, "u_t"], &["h_next"], vec![]);
    b.node_named("Identity", &["h_next"], &["h_seq"], vec![]);
    b.outputs.push(value_info_any("h_next", DataType::Float));
    b.outputs.push(value_info_any("h_seq", DataType::Float));
    b.into_proto("ssm_scan")
}

fn itera_full(cfg: &IteraConfig, w: &Weights) -> Result<ModelProto, ExportError> {
    let mut b = Builder { g: Graph::new(""), w };
    let ids = b.g.input("input_ids", DataType::Int64, &[Dim::Named("batch"), Dim::Named("seq")]);
    let pos = b.positions_for(&ids)?;
    let mut x = b.embed(&ids, &pos)?;
    let (di, k) = (cfg.d_inner(), cfg.d_conv);
    for i in 0..cfg.n_layers {
        let p = format!("layers.{i}.ssm");
        let (xs, z) = b.split_xz(&p, &x, cfg)?;
        // Depthwise causal conv: Conv over (batch, d_inner, t), groups = d_inner, k−1 zeros on the left.
        let xt = b.g.op("Transpose", &[&xs], vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
        let (cw_dims, cw) = b.w.get(&format!("{p}.conv.weight"))?.clone();
        let cw = b.g.f32(&format!("{p}.conv.weight_oik"), &[cw_dims[0], 1, cw_dims[1]], &cw);
        let cb = b.param(&format!("{p}.conv.bias"))?;
        let conv = b.g.op(
            "Conv",
            &[&xt, &cw, &cb],
            vec![
                ("group", Attr::Int(di as i64)),
                ("kernel_shape", Attr::Ints(vec![k as i64])),
                ("pads", Attr::Ints(vec![k as i64 - 1, 0])),
            ],
        );
        let conv = b.g.op("Transpose", &[&conv], vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
        let (xc, a, u) = b.ssm_inputs(&p, &conv)?;
        // h_0 = 0, shaped (batch, n) from u's first step.
        let zero_idx = b.g.i64s("zero", &[0]);
        let u0 = b.g.op("Gather", &[&u, &zero_idx], vec![("axis", Attr::Int(1))]);
        let axis1 = b.g.i64s("axes", &[1]);
        let u0 = b.g.op("Squeeze", &[&u0, &axis1], vec![]);
        let zero = b.g.scalar("zero", 0.0);
        let h0 = b.g.binary("Mul", &u0, &zero);
        let (_, h) = b.g.op2(
            "Scan",
            &[&h0, &a, &u],
            vec![
                ("body", Attr::Graph(scan_body())),
                ("num_scan_inputs", Attr::Int(2)),
                ("scan_input_axes", Attr::Ints(vec![1, 1])),
                ("scan_output_axes", Attr::Ints(vec![1])),
            ],
        );
        x = b.ssm_output(&p, &x, &xc, &z, &h)?;
        x = b.feed_forward(cfg, i, &x)?;
    }
    let logits = b.head(&x, cfg.ln_eps)?;
    b.g.output(
        &logits,
        "logits",
        DataType::Float,
        &[Dim::Named("batch"), Dim::Named("seq"), Dim::Fixed(cfg.vocab_size)],
    );
    Ok(model(
        b.g.into_proto("itera_lite"),
        "Itera-Lite, full sequence: input_ids [batch, seq] → logits [batch, seq, vocab]",
    ))
}

fn itera_step(cfg: &IteraConfig, w: &Weights) -> Result<ModelProto, ExportError> {
    let mut b = Builder { g: Graph::new(""), w };
    let ids = b.g.input("input_ids", DataType::Int64, &[Dim::Named("batch"), Dim::Fixed(1)]);
    let position = b.g.input("position", DataType::Int64, &[Dim::Fixed(1)]);
    let (di, k, n) = (cfg.d_inner(), cfg.d_conv, cfg.d_state);
    let mut states = Vec::new();
    for i in 0..cfg.n_layers {
        let c = b.g.input(
            &format!("conv_state.{i}"),
            DataType::Float,
            &[Dim::Named("batch"), Dim::Fixed(k - 1), Dim::Fixed(di)],
        );
        let h = b.g.input(&format!("ssm_state.{i}"), DataType::Float, &[Dim::Named("batch"), Dim::Fixed(n)]);
        states.push((c, h));
    }
    let pos_table = b.param("pos.weight")?;
    let pos = b.g.op("Gather", &[&pos_table, &position], vec![("axis", Attr::Int(0))]); // (1, d)
    let mut x = b.embed(&ids, &pos)?;
    for (i, (conv_state, ssm_state)) in states.iter().enumerate() {
        let p = format!("layers.{i}.ssm");
        let (xs, z) = b.split_xz(&p, &x, cfg)?;
        let window = b.g.op("Concat", &[conv_state, &xs], vec![("axis", Attr::Int(1))]); // (b, k, di)
        let (cw_dims, cw) = b.w.get(&format!("{p}.conv.weight"))?.clone();
        let taps =
            b.g.f32(&format!("{p}.conv.weight_kd"), &[cw_dims[1], cw_dims[0]], &transpose(&cw, cw_dims[0], cw_dims[1]));
        let prod = b.g.binary("Mul", &window, &taps);
        let summed = b.g.reduce("ReduceSum", &prod, 1); // (b, 1, di)
        let cb = b.param(&format!("{p}.conv.bias"))?;
        let conv = b.g.binary("Add", &summed, &cb);
        let next_conv = b.g.slice(&window, &[1], &[k as i64], &[1]);
        b.g.output(
            &next_conv,
            &format!("conv_state_out.{i}"),
            DataType::Float,
            &[Dim::Named("batch"), Dim::Fixed(k - 1), Dim::Fixed(di)],
        );
        let (xc, a, u) = b.ssm_inputs(&p, &conv)?;
        let axis1 = b.g.i64s("axes", &[1]);
        let hp = b.g.op("Unsqueeze", &[ssm_state, &axis1], vec![]);
        let ah = b.g.binary("Mul", &a, &hp);
        let h = b.g.binary("Add", &ah, &u); // (b, 1, n)
        let h_out = b.g.op("Squeeze", &[&h, &axis1], vec![]);
        b.g.output(&h_out, &format!("ssm_state_out.{i}"), DataType::Float, &[Dim::Named("batch"), Dim::Fixed(n)]);
        x = b.ssm_output(&p, &x, &xc, &z, &h)?;
        x = b.feed_forward(cfg, i, &x)?;
    }
    let logits = b.head(&x, cfg.ln_eps)?;
    // Outputs in a fixed order: logits first.
    let mut g = b.g;
    g.output(&logits, "logits", DataType::Float, &[Dim::Named("batch"), Dim::Fixed(1), Dim::Fixed(cfg.vocab_size)]);
    let last = g.outputs.pop();
    if let Some(l) = last {
        g.outputs.insert(0, l);
    }
    Ok(model(
        g.into_proto("itera_lite_step"),
        "Itera-Lite, one token: input_ids [batch, 1], position [1], conv_state.<i>, ssm_state.<i> → \
            logits [batch, 1, vocab], conv_state_out.<i>, ssm_state_out.<i>",
    ))
}

fn transformer_full(cfg: &TransformerConfig, w: &Weights) -> Result<ModelProto, ExportError> {
    let mut b = Builder { g: Graph::new(""), w };
    let ids = b.g.input("input_ids", DataType::Int64, &[Dim::Named("batch"), Dim::Named("seq")]);
    let pos = b.positions_for(&ids)?;
    let mut x = b.embed(&ids, &pos)?;
    let (d, h) = (cfg.d_model, cfg.n_heads);
    let hd = d / h;
    // Causal mask for the longest sequence, sliced to (seq, seq).
    let m = cfg.max_seq_len;
    let mask: Vec<f32> =
        (0..m).flat_map(|i| (0..m).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = b.g.f32("causal_mask", &[m, m], &mask);
    let seq = b.g.op("Shape", &[&ids], vec![("start", Attr::Int(1)), ("end", Attr::Int(2))]);
    let ends = b.g.op("Concat", &[&seq, &seq], vec![("axis", Attr::Int(0))]);
    let zeros = b.g.i64s("zero", &[0, 0]);
    let axes = b.g.i64s("axes", &[0, 1]);
    let mask = b.g.op("Slice", &[&mask, &zeros, &ends, &axes], vec![]);
    let scale = b.g.scalar("sqrt_hd", (hd as f32).sqrt());
    let qkv_shape = b.g.i64s("shape", &[0, 0, 3, h as i64, hd as i64]);
    let out_shape = b.g.i64s("shape", &[0, 0, d as i64]);
    for i in 0..cfg.n_layers {
        let p = format!("layers.{i}");
        let hn = b.norm(&format!("{p}.ln1"), &x, cfg.ln_eps)?;
        let qkv = b.linear(&format!("{p}.attn.qkv"), &hn, false)?;
        let qkv = b.g.op("Reshape", &[&qkv, &qkv_shape], vec![]);
        let qkv = b.g.op("Transpose", &[&qkv], vec![("perm", Attr::Ints(vec![2, 0, 3, 1, 4]))]); // (3, b, h, l, hd)
        let mut parts = Vec::new();
        for j in 0..3 {
            let idx = b.g.i64s("idx", &[j]);
            let t = b.g.op("Gather", &[&qkv, &idx], vec![("axis", Attr::Int(0))]);
            let ax = b.g.i64s("axes", &[0]);
            parts.push(b.g.op("Squeeze", &[&t, &ax], vec![]));
        }
        let kt = b.g.op("Transpose", &[&parts[1]], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))]);
        let scores = b.g.binary("MatMul", &parts[0], &kt);
        let scores = b.g.binary("Div", &scores, &scale);
        let scores = b.g.binary("Add", &scores, &mask);
        let att = b.g.op("Softmax", &[&scores], vec![("axis", Attr::Int(-1))]);
        let y = b.g.binary("MatMul", &att, &parts[2]);
        let y = b.g.op("Transpose", &[&y], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
        let y = b.g.op("Reshape", &[&y, &out_shape], vec![]);
        let y = b.linear(&format!("{p}.attn.proj"), &y, false)?;
        x = b.g.binary("Add", &x, &y);
        let hn = b.norm(&format!("{p}.ln2"), &x, cfg.ln_eps)?;
        let up = b.linear(&format!("{p}.mlp.up"), &hn, false)?;
        let act = b.g.gelu(&up);
        let down = b.linear(&format!("{p}.mlp.down"), &act, false)?;
        x = b.g.binary("Add", &x, &down);
    }
    let logits = b.head(&x, cfg.ln_eps)?;
    b.g.output(
        &logits,
        "logits",
        DataType::Float,
        &[Dim::Named("batch"), Dim::Named("seq"), Dim::Fixed(cfg.vocab_size)],
    );
    Ok(model(
        b.g.into_proto("transformer"),
        "Transformer baseline, full sequence: input_ids [batch, seq] → logits [batch, seq, vocab]",
    ))
}

/// The full-sequence graph of any model.
pub fn full_graph(config: &ModelConfig, w: &Weights) -> Result<ModelProto, ExportError> {
    match config {
        ModelConfig::IteraLite(c) => itera_full(c, w),
        ModelConfig::Transformer(c) => transformer_full(c, w),
    }
}

/// The one-token graph (Itera-Lite only; the Transformer's generation uses its full graph).
pub fn step_graph(config: &ModelConfig, w: &Weights) -> Result<Option<ModelProto>, ExportError> {
    match config {
        ModelConfig::IteraLite(c) => Ok(Some(itera_step(c, w)?)),
        ModelConfig::Transformer(_) => Ok(None),
    }
}
