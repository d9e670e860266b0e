"""Semantic roles: what each adaptable site does, read from the captured graph's dataflow.

Module names differ per architecture (``q_proj``, ``query``, ``c_attn``,
``query_key_value``); what a projection computes does not. The analysis runs on
the exported graph (one node per aten op, edges from producers to consumers, in
a networkx DiGraph) and labels sites as follows. "Nearest sites" of a node are
the sites reached from it against (or along) the dataflow without passing
through another site.

- Attention is ``aten.scaled_dot_product_attention`` or, written out, a
  ``softmax`` between two ``matmul``\\s (scores = q k^T, out = p v). The nearest
  sites above its query, key and value inputs are ``attn.q``, ``attn.k`` and
  ``attn.v`` (through reshapes, transposes, rotary embeddings, norms); one site
  above all three is a fused ``attn.qkv``. The nearest site below its output is
  ``attn.out``. When the key's projection reads another tensor than the
  query's (an encoder's output), the roles are ``cross_attn.*``.
- An MLP is a site D whose output joins the residual stream (an ``add`` with
  an ancestor of D's inputs' projections) fed by projections through an
  activation (silu, gelu, relu, tanh, sigmoid): two projections multiplied
  after one of them went through the activation are ``mlp.gate`` (that one)
  and ``mlp.up``; one projection through the activation is ``mlp.up``, or a
  fused ``mlp.gate_up`` when its halves are multiplied; D is ``mlp.down``.
- An embedding (or patch convolution) reading a model input is ``embed``; other
  embeddings (positions, token types, relative biases) are ``embed.extra``.
- A linear outside the numbered layers with no attention after it is ``lm_head``
  when it maps to the token embedding's vocabulary, else ``head`` (classifiers, poolers).
- Modules that normalize (layer_norm, or an rsqrt of a mean of squares) are ``norm``.

Anything else is ``unknown``: the analysis says so rather than guess.
"""

from __future__ import annotations

from collections import deque

import networkx as nx

from surgeon.grammar.vocabulary import ROLES

__all__ = ["ROLES", "UNKNOWN", "site_roles", "norm_modules"]

UNKNOWN = "unknown"

_ACTIVATIONS = {"silu", "gelu", "relu", "tanh", "sigmoid", "mish", "hardswish", "leaky_relu", "elu", "softplus"}
_SPLITS = {"split", "split_with_sizes", "chunk", "slice", "unbind", "narrow", "select"}


def _op(node) -> str:
    """The aten op's name without overload or trailing underscore: ``aten.silu.default`` -> ``silu``."""
    target = getattr(node.target, "__name__", str(node.target))
    return target.split(".")[0].rstrip("_")


def _dataflow(graph):
    flow = nx.DiGraph()
    for node in graph.nodes:
        flow.add_node(node)
        for source in node.all_input_nodes:
            flow.add_edge(source, node)
    return flow


def _reach(flow, start, site_of: dict, upstream: bool) -> tuple:
    """(non-site nodes, sites) reached from ``start`` against (``upstream``) or along the dataflow, stopping at sites."""
    step = flow.predecessors if upstream else flow.successors
    seen, inside, sites, queue = {start}, set(), set(), deque([start])
    while queue:
        for nxt in step(queue.popleft()):
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in site_of:
                sites.add(nxt)
            else:
                inside.add(nxt)
                queue.append(nxt)
    return inside, sites


def _nearest(flow, start, site_of: dict, upstream: bool) -> set:
    """Sites reached from ``start`` against (``upstream``) or along the dataflow, stopping at each site."""
    return _reach(flow, start, site_of, upstream)[1]


def _attentions(graph, flow) -> list:
    """(query, key, value, output) nodes of every attention in the graph."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if _op(node) in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"):
            found.append((node.args[0], node.args[1], node.args[2], node))
        elif _op(node) in ("softmax", "_softmax"):
            scores = _closest(flow, node, {"matmul", "bmm", "einsum"}, upstream=True)
            mixing = _closest(flow, node, {"matmul", "bmm", "einsum"}, upstream=False)
            if scores is None or mixing is None or len(scores.args) < 2 or len(mixing.args) < 2:
                continue
            first, second = _operands(scores), _operands(mixing)
            if len(first) != 2 or len(second) != 2:
                continue
            (q, k), (_, v) = first, second
            found.append((q, k, v, mixing))
    return found


def _operands(node) -> tuple:
    """The two tensors a matmul, bmm or einsum multiplies (einsum takes its equation first)."""
    operands = node.args[1] if _op(node) == "einsum" else node.args[:2]
    return tuple(operands) if isinstance(operands, (list, tuple)) else ()


def _closest(flow, start, ops: set, upstream: bool, limit: int = 12):
    """The nearest node doing one of ``ops``, within ``limit`` steps (masks, scales and casts in between)."""
    step = flow.predecessors if upstream else flow.successors
    frontier, seen = [start], {start}
    for _ in range(limit):
        nxt = []
        for node in frontier:
            for other in step(node):
                if other in seen or other.op != "call_function":
                    continue
                if _op(other) in ops:
                    return other
                seen.add(other)
                nxt.append(other)
        frontier = nxt
    return None


def site_roles(program, sites: dict) -> dict:
    """Site path -> role (one of ROLES, or UNKNOWN) for the sites of a captured program."""
    graph = program.graph
    flow = _dataflow(graph)
    by_name = {node.name: node for node in graph.nodes}
    site_of = {}  # graph node -> site path
    for path, site in sites.items():
        for name in site.nodes:
            if name in by_name:
                site_of[by_name[name]] = path
    roles: dict = {}

    def label(nodes, role):
        for node in nodes:
            roles.setdefault(site_of[node], role)

    def reads(node):  # the activation a site's op reads
        return _reads(node, sites[site_of[node]].kind)

    attention_outputs = []
    for q, k, v, out in _attentions(graph, flow):
        qs, ks, vs = (_nearest(flow, t, site_of, upstream=True) if hasattr(t, "op") else set() for t in (q, k, v))
        if not (qs and ks and vs):
            continue
        # through casts and views: a quantized stand-in or a Conv1D reshapes its own copy of the shared input
        cross = {_through_casts(reads(n)) for n in qs}.isdisjoint({_through_casts(reads(n)) for n in ks})
        prefix = "cross_attn" if cross else "attn"
        if qs == ks == vs:
            label(qs, f"{prefix}.qkv")
        elif ks == vs and qs.isdisjoint(ks):
            label(qs, f"{prefix}.q")
            label(ks, f"{prefix}.kv")
        elif qs.isdisjoint(ks) and qs.isdisjoint(vs) and ks.isdisjoint(vs):
            label(qs, f"{prefix}.q")
            label(ks, f"{prefix}.k")
            label(vs, f"{prefix}.v")
        else:
            continue  # shared in a way no known layout shares: leave them unknown
        label(_nearest(flow, out, site_of, upstream=False), f"{prefix}.out")
        attention_outputs.append(out)

    # MLPs: a down projection fed through an activation by one or two projections, joining the residual stream
    for node, path in site_of.items():
        if path in roles or sites[path].kind not in ("linear", "hf_conv1d"):
            continue
        inputs = [t for t in node.all_input_nodes if t not in site_of and t.op == "call_function"]
        feeding = set()
        for t in inputs:
            feeding |= _nearest(flow, t, site_of, upstream=True)
        feeding = {f for f in feeding if site_of[f] not in roles or roles[site_of[f]].startswith("mlp.")}
        sources = [reads(f) for f in feeding]
        if not feeding or len(feeding) > 2 or not _joins_residual(flow, node, sources, site_of, nx):
            continue
        between = _between(flow, feeding, node, site_of)
        activated = {f for f in feeding if any(_op(b) in _ACTIVATIONS for b in between.get(f, ()))}
        if not activated:
            continue
        if len(feeding) == 2 and len(activated) == 1:
            (gate,) = activated
            (up,) = feeding - activated
            label([gate], "mlp.gate")
            label([up], "mlp.up")
        elif len(feeding) == 1:
            (up,) = feeding
            halves = any(_op(b) in _SPLITS for b in between.get(up, ()))
            label([up], "mlp.gate_up" if halves and _multiplies_itself(between.get(up, ()), up, nx, flow) else "mlp.up")
        else:
            continue
        label([node], "mlp.down")

    # Embeddings first (the token embedding's vocabulary tells an LM head), then heads
    user_inputs = _user_inputs(program, {n for n in graph.nodes if n.op == "placeholder"})
    for node, path in site_of.items():
        kind = sites[path].kind
        if path not in roles and (kind == "embedding" or kind.startswith("conv")):
            if _through_casts(reads(node)) in user_inputs:
                roles[path] = "embed"
            elif kind == "embedding":
                roles[path] = "embed.extra"
    vocab = {sites[p].in_features for p, r in roles.items() if r == "embed" and sites[p].kind == "embedding"}
    for node, path in site_of.items():
        if path in roles or sites[path].kind not in ("linear", "hf_conv1d") or not attention_outputs:
            continue
        numbered = any(part.isdigit() for part in path.split("."))  # inside a layer: not a head, whatever it is
        if not numbered and not any(nx.has_path(flow, node, out) for out in attention_outputs):
            roles[path] = "lm_head" if sites[path].out_features in vocab else "head"
    return {path: roles.get(path, UNKNOWN) for path in sites}


def _reads(node, kind: str):
    """The activation a site's op reads: addmm(bias, x, W) reads x, embedding(W, ids) reads ids."""
    index = 1 if kind in ("hf_conv1d", "embedding") else 0
    return node.args[index] if len(node.args) > index else None


def _through_casts(node):
    while getattr(node, "op", None) == "call_function" and _op(node) in ("to", "_to_copy", "type_as", "contiguous", "view", "reshape"):
        node = node.args[0]
    return node


def _user_inputs(program, placeholders) -> set:
    try:
        names = set(program.graph_signature.user_inputs)
    except AttributeError:
        names = set()
    return {p for p in placeholders if p.name in names}


def _between(flow, feeding, target, site_of) -> dict:
    """For each feeding site, the non-site nodes on its paths to ``target``."""
    behind = _reach(flow, target, site_of, upstream=True)[0]
    return {f: _reach(flow, f, site_of, upstream=False)[0] & behind for f in feeding}


def _multiplies_itself(between, source, nx, flow) -> bool:
    """Does a ``mul`` on these nodes take two operands that both come from ``source`` (halves of one projection)?"""
    for node in between:
        if _op(node) == "mul" and len(node.all_input_nodes) == 2:
            a, b = node.all_input_nodes
            if nx.has_path(flow, source, a) and nx.has_path(flow, source, b):
                return True
    return False


def _joins_residual(flow, down, sources, site_of, nx, limit: int = 8) -> bool:
    """Is ``down``'s output added to a tensor that ``sources`` (its feeding projections' inputs) come from?"""
    frontier, seen = [down], {down}
    for _ in range(limit):
        nxt = []
        for node in frontier:
            for user in flow.successors(node):
                if user in seen or user in site_of:
                    continue
                seen.add(user)
                if _op(user) == "add":
                    for other in user.all_input_nodes:
                        if other is not node and any(other is s or nx.has_path(flow, other, s) for s in sources):
                            return True
                nxt.append(user)
        frontier = nxt
    return False


def norm_modules(program, modules: dict) -> set:
    """Paths of modules whose own ops normalize: ``layer_norm``/``rms_norm``, or an ``rsqrt`` of a mean."""
    ops_of: dict = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            continue
        path = list(stack.values())[-1][0]
        ops_of.setdefault(path, set()).add(_op(node))
    found = set()
    for path, ops in ops_of.items():
        if path not in modules or ops & {"linear", "addmm", "embedding", "conv1d", "conv2d"}:
            continue
        if ops & {"layer_norm", "rms_norm", "group_norm"} or {"rsqrt", "mean"} <= ops:
            found.add(path)
    return found
