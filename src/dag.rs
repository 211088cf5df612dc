//! The stage graph: which stage runs after which. Built once when a plan is compiled (petgraph), it
//! answers ordering, readiness, ancestors and descendants, names cycles (`a -> b -> a`) and draws
//! itself as DOT or Mermaid. It knows stages only as indices.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use petgraph::Direction;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

/// A stage's index in the compiled plan.
pub type NodeId = usize;

#[derive(Debug, Clone)]
pub struct Dag {
    graph: DiGraph<NodeId, ()>,
    nodes: Vec<NodeIndex>,
}

impl Dag {
    /// `deps[i]` lists the stages that stage `i` runs after.
    pub fn new(deps: &[Vec<NodeId>]) -> Dag {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..deps.len()).map(|i| graph.add_node(i)).collect();
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                if d < nodes.len() {
                    graph.update_edge(nodes[d], nodes[i], ());
                }
            }
        }
        Dag { graph, nodes }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The stages `i` runs after.
    pub fn deps(&self, i: NodeId) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .graph
            .neighbors_directed(self.nodes[i], Direction::Incoming)
            .map(|n| self.graph[n])
            .collect();
        v.sort_unstable();
        v
    }

    /// The stages that run after `i`.
    pub fn dependents(&self, i: NodeId) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .graph
            .neighbors_directed(self.nodes[i], Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect();
        v.sort_unstable();
        v
    }

    fn closure(&self, i: NodeId, dir: Direction) -> BTreeSet<NodeId> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![self.nodes[i]];
        while let Some(n) = stack.pop() {
            for m in self.graph.neighbors_directed(n, dir) {
                if seen.insert(self.graph[m]) {
                    stack.push(m);
                }
            }
        }
        seen
    }

    /// Everything `i` depends on, directly or not.
    pub fn ancestors(&self, i: NodeId) -> BTreeSet<NodeId> {
        self.closure(i, Direction::Incoming)
    }

    /// Everything that depends on `i`, directly or not.
    pub fn descendants(&self, i: NodeId) -> BTreeSet<NodeId> {
        self.closure(i, Direction::Outgoing)
    }

    /// Every cycle, each as the list of stages along it, starting and ending with the same stage,
    /// read as "runs after": `[a, b, a]` means a runs after b, which runs after a.
    pub fn cycles(&self) -> Vec<Vec<NodeId>> {
        let mut out = Vec::new();
        for scc in tarjan_scc(&self.graph) {
            let members: BTreeSet<NodeId> = scc.iter().map(|n| self.graph[*n]).collect();
            let Some(&start) = members.iter().next() else {
                continue;
            };
            if members.len() == 1 && !self.deps(start).contains(&start) {
                continue;
            }
            // Walk "runs after" edges inside the component until we are back at the start.
            let mut path = vec![start];
            let mut cur = start;
            let mut visited = BTreeSet::from([start]);
            loop {
                let next = self
                    .deps(cur)
                    .into_iter()
                    .filter(|d| members.contains(d))
                    .find(|d| *d == start || !visited.contains(d));
                match next {
                    Some(n) if n == start => {
                        path.push(start);
                        break;
                    }
                    Some(n) => {
                        visited.insert(n);
                        path.push(n);
                        cur = n;
                    }
                    None => {
                        // Dead end inside the component: restart from the smallest reachable member.
                        path.push(start);
                        break;
                    }
                }
            }
            out.push(path);
        }
        out.sort();
        out
    }

    /// A topological order; among stages that could go in either order, the lower index first.
    /// Assumes no cycles (compile rejects them).
    pub fn order(&self) -> Vec<NodeId> {
        let mut indeg: Vec<usize> = (0..self.len()).map(|i| self.deps(i).len()).collect();
        let mut ready: BTreeSet<NodeId> = (0..self.len()).filter(|i| indeg[*i] == 0).collect();
        let mut out = Vec::with_capacity(self.len());
        while let Some(i) = ready.pop_first() {
            out.push(i);
            for d in self.dependents(i) {
                indeg[d] -= 1;
                if indeg[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        out
    }

    /// Each node's topological level: 0 without dependencies, else one more than its deepest
    /// dependency (how `pgferry report` lays the DAG out in columns).
    pub fn levels(&self) -> Vec<usize> {
        let mut level = vec![0; self.len()];
        for i in self.order() {
            level[i] = self
                .deps(i)
                .iter()
                .map(|&d| level[d] + 1)
                .max()
                .unwrap_or(0);
        }
        level
    }

    /// Graphviz DOT. `label(i)` names a node; `state(i)`, when given, colours it; an edge `d -> i`
    /// for which `overlaps(d, i)` holds (i starts while d still runs) is dashed and labelled.
    pub fn to_dot(
        &self,
        label: &dyn Fn(NodeId) -> String,
        state: &dyn Fn(NodeId) -> Option<String>,
        overlaps: &dyn Fn(NodeId, NodeId) -> bool,
    ) -> String {
        let mut out = String::from(
            "digraph pgferry {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fillcolor=\"#ffffff\", fontname=\"Helvetica\"];\n",
        );
        for i in self.order() {
            let mut text = label(i);
            let mut fill = "#ffffff";
            if let Some(s) = state(i) {
                fill = state_colour(&s);
                text.push_str(&format!("\n[{s}]"));
            }
            let _ = writeln!(
                out,
                "  n{i} [label=\"{}\", fillcolor=\"{fill}\"];",
                dot_escape(&text)
            );
        }
        for i in self.order() {
            for d in self.dependents(i) {
                if overlaps(i, d) {
                    let _ = writeln!(out, "  n{i} -> n{d} [style=dashed, label=\"overlaps\"];");
                } else {
                    let _ = writeln!(out, "  n{i} -> n{d};");
                }
            }
        }
        out.push_str("}\n");
        out
    }

    /// Mermaid flowchart (edges as in [`Dag::to_dot`]).
    pub fn to_mermaid(
        &self,
        label: &dyn Fn(NodeId) -> String,
        state: &dyn Fn(NodeId) -> Option<String>,
        overlaps: &dyn Fn(NodeId, NodeId) -> bool,
    ) -> String {
        let mut out = String::from("flowchart LR\n");
        let mut classes: HashMap<&'static str, Vec<NodeId>> = HashMap::new();
        for i in self.order() {
            let mut text = label(i);
            if let Some(s) = state(i) {
                text.push_str(&format!("<br/>[{s}]"));
                classes.entry(state_class(&s)).or_default().push(i);
            }
            let _ = writeln!(out, "  n{i}[\"{}\"]", mermaid_escape(&text));
        }
        for i in self.order() {
            for d in self.dependents(i) {
                if overlaps(i, d) {
                    let _ = writeln!(out, "  n{i} -. overlaps .-> n{d}");
                } else {
                    let _ = writeln!(out, "  n{i} --> n{d}");
                }
            }
        }
        let mut names: Vec<_> = classes.keys().copied().collect();
        names.sort_unstable();
        for class in names {
            let _ = writeln!(out, "  classDef {class} fill:{}", state_colour(class));
            let ids: Vec<String> = classes[class].iter().map(|i| format!("n{i}")).collect();
            let _ = writeln!(out, "  class {} {class}", ids.join(","));
        }
        out
    }
}

fn state_class(state: &str) -> &'static str {
    match state {
        "done" => "done",
        "running" => "running",
        "ready" => "ready",
        "failed" => "failed",
        _ => "pending",
    }
}

fn state_colour(state: &str) -> &'static str {
    match state_class(state) {
        "done" => "#c8e6c9",
        "running" => "#fff59d",
        "ready" => "#b3e5fc",
        "failed" => "#ffcdd2",
        _ => "#eeeeee",
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;").replace('\n', "<br/>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_closures() {
        // 0 <- 1 <- 2, 0 <- 3
        let dag = Dag::new(&[vec![], vec![0], vec![1], vec![0]]);
        assert_eq!(dag.order(), vec![0, 1, 2, 3]);
        assert_eq!(dag.ancestors(2), BTreeSet::from([0, 1]));
        assert_eq!(dag.descendants(0), BTreeSet::from([1, 2, 3]));
        assert!(dag.cycles().is_empty());
    }

    #[test]
    fn levels_are_one_more_than_the_deepest_dependency() {
        // 0 <- 1 <- 2, 0 <- 3, 4 after 2 and 3, 5 alone
        let dag = Dag::new(&[vec![], vec![0], vec![1], vec![0], vec![3, 2], vec![]]);
        assert_eq!(dag.levels(), vec![0, 1, 2, 1, 3, 0]);
    }

    #[test]
    fn names_cycles() {
        // a(0) after c(2), b(1) after a, c after b; d(3) after itself
        let dag = Dag::new(&[vec![2], vec![0], vec![1], vec![3]]);
        assert_eq!(dag.cycles(), vec![vec![0, 2, 1, 0], vec![3, 3]]);
    }

    #[test]
    fn draws() {
        let dag = Dag::new(&[vec![], vec![0], vec![1]]);
        let overlaps = |d: usize, i: usize| (d, i) == (1, 2);
        let m = dag.to_mermaid(
            &|i| format!("s{i}"),
            &|i| (i == 0).then(|| "done".to_string()),
            &overlaps,
        );
        assert!(m.contains("n0 --> n1"));
        assert!(m.contains("n1 -. overlaps .-> n2"));
        assert!(m.contains("class n0 done"));
        let d = dag.to_dot(&|i| format!("s{i}"), &|_| None, &overlaps);
        assert!(d.contains("n0 -> n1;"));
        assert!(d.contains("n1 -> n2 [style=dashed, label=\"overlaps\"];"));
    }
}
