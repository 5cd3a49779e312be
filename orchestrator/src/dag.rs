//! The stage graph: edges from producer to consumer, cycle reports, topological order.

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::diag::Diagnostic;
use crate::pipeline::Pipeline;

pub struct Dag {
    pub graph: DiGraph<usize, String>,
    /// Stage indices (into `Pipeline::stages`) in a topological order that keeps file order
    /// where the graph allows.
    pub order: Vec<usize>,
}

impl Dag {
    pub fn build(p: &Pipeline) -> Result<Dag, Diagnostic> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..p.stages.len()).map(|i| graph.add_node(i)).collect();
        for (i, s) in p.stages.iter().enumerate() {
            for (input, r) in &s.inputs {
                // Names were checked by the resolver; a miss here would be a bug, not bad input.
                for stage in r.stages() {
                    if let Some(j) = p.index_of(stage) {
                        graph.add_edge(nodes[j], nodes[i], input.clone());
                    }
                }
            }
        }
        if let Err(cycle) = toposort(&graph, None) {
            return Err(cycle_error(p, &graph, cycle.node_id()));
        }
        // Kahn's algorithm, always taking the ready stage that comes first in the file.
        let mut indeg: Vec<usize> =
            nodes.iter().map(|n| graph.edges_directed(*n, Direction::Incoming).count()).collect();
        let mut ready: std::collections::BTreeSet<usize> = (0..nodes.len()).filter(|&i| indeg[i] == 0).collect();
        let mut order = Vec::with_capacity(nodes.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for e in graph.edges_directed(nodes[i], Direction::Outgoing) {
                let j = graph[e.target()];
                indeg[j] -= 1;
                if indeg[j] == 0 {
                    ready.insert(j);
                }
            }
        }
        Ok(Dag { graph, order })
    }

    /// Stage indices this stage reads from.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> =
            self.graph.neighbors_directed(NodeIndex::new(i), Direction::Incoming).map(|n| self.graph[n]).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn downstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> =
            self.graph.neighbors_directed(NodeIndex::new(i), Direction::Outgoing).map(|n| self.graph[n]).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Every stage reachable downstream of `i` (not including `i`).
    pub fn all_downstream(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.graph.node_count()];
        let mut stack = self.downstream(i);
        let mut out = Vec::new();
        while let Some(j) = stack.pop() {
            if !std::mem::replace(&mut seen[j], true) {
                out.push(j);
                stack.extend(self.downstream(j));
            }
        }
        out.sort_unstable();
        out
    }

    /// `i` and everything it needs, transitively.
    pub fn with_upstream(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.graph.node_count()];
        let mut stack = vec![i];
        let mut out = Vec::new();
        while let Some(j) = stack.pop() {
            if !std::mem::replace(&mut seen[j], true) {
                out.push(j);
                stack.extend(self.upstream(j));
            }
        }
        out.sort_unstable();
        out
    }

    pub fn to_dot(&self, p: &Pipeline) -> String {
        let mut s = format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n", p.name);
        for &i in &self.order {
            let st = &p.stages[i];
            s.push_str(&format!("  \"{}\" [label=\"{}\\n({})\"];\n", st.name, st.name, st.kind));
        }
        for e in self.graph.edge_references() {
            let (a, b) = (&p.stages[self.graph[e.source()]].name, &p.stages[self.graph[e.target()]].name);
            s.push_str(&format!("  \"{a}\" -> \"{b}\" [label=\"{}\"];\n", e.weight()));
        }
        s.push_str("}\n");
        s
    }

    pub fn to_mermaid(&self, p: &Pipeline) -> String {
        // Mermaid ids cannot hold `@` or `.`; label with the real name.
        let id = |i: usize| format!("s{i}");
        let mut s = String::from("flowchart LR\n");
        for &i in &self.order {
            let st = &p.stages[i];
            s.push_str(&format!("  {}[\"{} ({})\"]\n", id(i), st.name, st.kind));
        }
        for e in self.graph.edge_references() {
            s.push_str(&format!(
                "  {} -->|{}| {}\n",
                id(self.graph[e.source()]),
                e.weight(),
                id(self.graph[e.target()])
            ));
        }
        s
    }
}

/// Print the cycle as `a → b → c → a`, pointing at the input that closes it.
fn cycle_error(p: &Pipeline, graph: &DiGraph<usize, String>, start: NodeIndex) -> Diagnostic {
    let scc = tarjan_scc(graph).into_iter().find(|c| c.contains(&start)).unwrap_or_else(|| vec![start]);
    // Start the printed cycle at the stage that comes first in the file.
    let start = scc.iter().copied().min_by_key(|n| graph[*n]).unwrap_or(start);
    // Breadth-first search inside the component from `start` back to `start`.
    let mut prev: std::collections::HashMap<NodeIndex, NodeIndex> = std::collections::HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut closing = None;
    'search: while let Some(n) = queue.pop_front() {
        for m in graph.neighbors_directed(n, Direction::Outgoing) {
            if m == start {
                closing = Some(n);
                break 'search;
            }
            if scc.contains(&m) && !prev.contains_key(&m) {
                prev.insert(m, n);
                queue.push_back(m);
            }
        }
    }
    let mut path = vec![start];
    if let Some(mut n) = closing {
        let mut back = vec![n];
        while n != start {
            match prev.get(&n) {
                Some(&m) => {
                    n = m;
                    back.push(n);
                }
                None => break,
            }
        }
        back.reverse();
        path = back;
    }
    path.push(start);
    let names: Vec<&str> = path.iter().map(|n| p.stages[graph[*n]].name.as_str()).collect();
    // The edge last → start is an input of `start`; point at it.
    let last = path[path.len() - 2];
    let consumer = &p.stages[graph[start]];
    let producer = &p.stages[graph[last]].name;
    let input = consumer
        .inputs
        .iter()
        .find(|(_, r)| r.stages().any(|s| s == producer))
        .map(|(n, _)| n.clone())
        .unwrap_or_default();
    let pos = consumer.node.locate(&format!("inputs.{input}"));
    p.diag(
        Diagnostic::new("E-CYCLE", format!("the stages form a cycle: {}", names.join(" → ")))
            .at(if pos == Default::default() { consumer.pos } else { pos })
            .help("a stage cannot depend on its own output, directly or through others; break one of these inputs"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn pipeline(src: &str) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, src).unwrap();
        crate::pipeline::load(&f, &[], &Registry::builtin()).unwrap()
    }

    #[test]
    fn cycle_is_printed_in_order() {
        let p = pipeline(
            "stages:\n  a: {kind: command, cmd: x, inputs: {i: c.o}, outputs: [o]}\n  b: {kind: command, cmd: x, inputs: {i: a.o}, outputs: [o]}\n  c: {kind: command, cmd: x, inputs: {i: b.o}, outputs: [o]}\n",
        );
        let e = Dag::build(&p).err().unwrap();
        assert_eq!(e.code, "E-CYCLE");
        assert!(e.message.contains("a → b → c → a"), "{}", e.message);
        assert_eq!(e.pos.unwrap().line, 2);
    }

    #[test]
    fn self_loop() {
        let p = pipeline("stages:\n  a: {kind: command, cmd: x, inputs: {i: a.o}, outputs: [o]}\n");
        assert!(Dag::build(&p).err().unwrap().message.contains("a → a"));
    }

    #[test]
    fn order_and_reachability() {
        let p = pipeline(
            "stages:\n  z: {kind: command, cmd: x, inputs: {i: a.o}, outputs: [o]}\n  a: {kind: command, cmd: x, outputs: [o]}\n  b: {kind: command, cmd: x, outputs: [o]}\n",
        );
        let d = Dag::build(&p).unwrap();
        let names: Vec<&str> = d.order.iter().map(|&i| p.stages[i].name.as_str()).collect();
        assert_eq!(names, ["a", "z", "b"]);
        assert_eq!(d.all_downstream(1), vec![0]);
        assert_eq!(d.with_upstream(0), vec![0, 1]);
        assert!(d.to_dot(&p).contains("\"a\" -> \"z\""));
        assert!(d.to_mermaid(&p).contains("s1 -->|i| s0"));
    }
}
