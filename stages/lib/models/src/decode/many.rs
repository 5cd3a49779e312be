//! Several sequences decoded together by one [`IteraDecoder`]: each step applies every weight
//! matrix to all of the sequences at once (one pass over the weights instead of one per
//! sequence), and runs the per-sequence parts — conv window, scan, expert routing — row by row.
//! What a server batching concurrent requests needs; tested equal to [`IteraDecoder::step`].

use candle_core::Result;

use super::{embed_token, silu, softplus, Dense, Expert, Ff, IteraDecodeState, IteraDecoder, Ssm, Weights};

/// Rows of `n` sequences, each `width` wide, in one buffer.
struct Rows {
    v: Vec<f32>,
    width: usize,
}

impl Rows {
    fn new(n: usize, width: usize) -> Rows {
        Rows { v: vec![0.0; n * width], width }
    }
    fn row(&self, i: usize) -> &[f32] {
        &self.v[i * self.width..(i + 1) * self.width]
    }
    fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.v[i * self.width..(i + 1) * self.width]
    }
}

impl Dense {
    /// `out` (n × rows) = `xs` (n × cols) · Wᵀ (+ b).
    fn apply_many(&self, xs: &[f32], n: usize, out: &mut [f32]) {
        match &self.w {
            // Weight row outer: a row (≤ a few KB) stays in L1 while every sequence uses it.
            Weights::F32(w) => super::matmul_rows(w, self.cols, xs, n, out),
            Weights::Quant(q) => out[..n * self.rows].copy_from_slice(&q.matmul_t(&xs[..n * self.cols], n)),
        }
        if let Some(bias) = &self.bias {
            for o in out[..n * self.rows].chunks_exact_mut(self.rows) {
                for (o, b) in o.iter_mut().zip(bias) {
                    *o += b;
                }
            }
        }
    }
}

/// Buffers for one batched step, sized for `n` sequences.
struct Batch {
    normed: Rows,
    xz: Rows,
    xc: Rows,
    inner: Rows,
    model: Rows,
    acc: Rows,
    hidden: Rows,
    route: Rows,
}

impl Ssm {
    fn step_many(&self, layer: usize, states: &mut [&mut IteraDecodeState], bt: &mut Batch) {
        let (di, k, nst, n) = (self.d_inner, self.k, self.a.len(), states.len());
        if bt.xc.width != di {
            (bt.xz, bt.xc, bt.inner) = (Rows::new(n, 2 * di), Rows::new(n, di), Rows::new(n, di));
        }
        for (i, st) in states.iter().enumerate() {
            self.norm.apply(&st.x, bt.normed.row_mut(i));
        }
        self.in_proj.apply_many(&bt.normed.v, n, &mut bt.xz.v);
        for (i, st) in states.iter_mut().enumerate() {
            let ls = &mut st.layers[layer];
            let (xs, xc) = (&bt.xz.row(i)[..di], &mut bt.xc.v[i * di..(i + 1) * di]);
            for (c, (xc, &x_new)) in xc.iter_mut().zip(xs).enumerate() {
                let taps = &self.conv_w[c * k..(c + 1) * k];
                let mut y = self.conv_b[c];
                for (j, tap) in taps[..k - 1].iter().enumerate() {
                    y += ls.conv[j * di + c] * tap;
                }
                *xc = silu(y + x_new * taps[k - 1]);
            }
            ls.conv.copy_within(di.., 0);
            ls.conv[(k - 2) * di..].copy_from_slice(xs);
        }
        self.delta_proj.apply_many(&bt.xc.v, n, &mut bt.inner.v);
        for (i, st) in states.iter_mut().enumerate() {
            let ls = &mut st.layers[layer];
            let xc = &bt.xc.v[i * di..(i + 1) * di];
            let inner = &mut bt.inner.v[i * di..(i + 1) * di];
            let delta = inner.iter().map(|&v| softplus(v)).sum::<f32>() / di as f32;
            for (j, h) in ls.h.iter_mut().enumerate() {
                let bx: f32 = self.b[j * di..(j + 1) * di].iter().zip(xc).map(|(b, x)| b * x).sum();
                *h = (delta * self.a[j]).exp() * *h + delta * bx;
            }
            let z = &bt.xz.row(i)[di..2 * di];
            for (c, (out, &zc)) in inner.iter_mut().zip(z).enumerate() {
                let ch: f32 = self.c[c * nst..(c + 1) * nst].iter().zip(&ls.h).map(|(c, h)| c * h).sum();
                *out = (ch + self.d[c] * xc[c]) * silu(zc);
            }
        }
        self.out_proj.apply_many(&bt.inner.v[..n * di], n, &mut bt.model.v);
        for (i, st) in states.iter_mut().enumerate() {
            for (x, o) in st.x.iter_mut().zip(bt.model.row(i)) {
                *x += o;
            }
        }
    }
}

impl Expert {
    /// out (n × d) = down(gelu(up(xs))) for n rows.
    fn apply_many(&self, xs: &[f32], n: usize, hidden: &mut Vec<f32>, out: &mut [f32]) {
        hidden.resize(n * self.up.rows, 0.0);
        self.up.apply_many(xs, n, hidden);
        crate::fused::gelu_in_place(hidden);
        self.down.apply_many(hidden, n, out);
    }
}

impl Ff {
    fn step_many(&self, states: &mut [&mut IteraDecodeState], bt: &mut Batch) {
        let n = states.len();
        let (norm, d) = match self {
            Ff::Dense { norm, .. } | Ff::Moe { norm, .. } => (norm, bt.normed.width),
        };
        for (i, st) in states.iter().enumerate() {
            norm.apply(&st.x, bt.normed.row_mut(i));
        }
        match self {
            Ff::Dense { ff, .. } => ff.apply_many(&bt.normed.v, n, &mut bt.hidden.v, &mut bt.acc.v),
            Ff::Moe { router, experts, top_k, .. } => {
                bt.route = Rows::new(n, router.rows);
                router.apply_many(&bt.normed.v, n, &mut bt.route.v);
                bt.acc.v.iter_mut().for_each(|v| *v = 0.0);
                // Per row, as in `step`: every expert whose logit reaches the k-th largest,
                // gated by the softmax over them. Then each expert runs once on its rows.
                let mut gates = vec![Vec::new(); experts.len()];
                for i in 0..n {
                    let route = bt.route.row(i);
                    let mut sorted = route.to_vec();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    let (kth, max) = (sorted[(*top_k).min(sorted.len()) - 1], sorted[0]);
                    let total: f32 = route.iter().filter(|&&l| l >= kth).map(|&l| (l - max).exp()).sum();
                    for (j, &l) in route.iter().enumerate() {
                        if l >= kth {
                            gates[j].push((i, (l - max).exp() / total));
                        }
                    }
                }
                let mut xs = Vec::new();
                for (ex, rows) in experts.iter().zip(&gates) {
                    if rows.is_empty() {
                        continue;
                    }
                    xs.clear();
                    for &(i, _) in rows {
                        xs.extend_from_slice(bt.normed.row(i));
                    }
                    ex.apply_many(&xs, rows.len(), &mut bt.hidden.v, &mut bt.model.v);
                    for (r, &(i, gate)) in rows.iter().enumerate() {
                        for (a, o) in bt.acc.row_mut(i).iter_mut().zip(&bt.model.v[r * d..(r + 1) * d]) {
                            *a += o * gate;
                        }
                    }
                }
            }
        }
        for (i, st) in states.iter_mut().enumerate() {
            for (x, a) in st.x.iter_mut().zip(bt.acc.row(i)) {
                *x += a;
            }
        }
    }
}

impl IteraDecoder {
    /// Feed one token to each of several sequences (`tokens[i]` to `states[i]`, at each
    /// state's own position); returns each sequence's next-token logits. The same numbers as
    /// [`IteraDecoder::step`] on each sequence alone.
    pub fn step_many(&self, tokens: &[u32], states: &mut [&mut IteraDecodeState]) -> Result<Vec<Vec<f32>>> {
        let (n, d) = (states.len(), self.d_model);
        if tokens.len() != n {
            candle_core::bail!("{} tokens for {n} sequences", tokens.len());
        }
        for (st, &t) in states.iter_mut().zip(tokens) {
            embed_token(&self.embed, &self.pos, (self.vocab, self.max_seq_len), t, st.pos, &mut st.x)?;
        }
        let di = self.layers.iter().map(|(s, _)| s.d_inner).max().unwrap_or(0);
        let mut bt = Batch {
            normed: Rows::new(n, d),
            xz: Rows::new(n, 2 * di),
            xc: Rows::new(n, di),
            inner: Rows::new(n, di),
            model: Rows::new(n, d),
            acc: Rows::new(n, d),
            hidden: Rows::new(0, 1),
            route: Rows::new(0, 1),
        };
        for (layer, (ssm, ff)) in self.layers.iter().enumerate() {
            ssm.step_many(layer, states, &mut bt);
            ff.step_many(states, &mut bt);
        }
        for (i, st) in states.iter_mut().enumerate() {
            st.pos += 1;
            self.norm_f.apply(&st.x, bt.normed.row_mut(i));
        }
        let logits = match &self.head {
            Some(q) => q.matmul_t(&bt.normed.v, n),
            None => {
                let mut out = vec![0.0; n * self.vocab];
                super::matmul_rows(&self.embed, d, &bt.normed.v, n, &mut out);
                out
            }
        };
        Ok(logits.chunks_exact(self.vocab).map(<[f32]>::to_vec).collect())
    }
}
