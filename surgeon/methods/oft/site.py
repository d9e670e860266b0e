"""OFT on a site (torch; config.py holds the config and the math).

``oft_R`` is stored as PEFT stores ``oft_R.weight`` (``oft_embedding_R.weight``
on an embedding): (r, or 1 with block_share; b (b - 1) / 2), the packed strict
upper triangles. The rotation is written once, as a sequence of aten ops run
by a ``run(op, *args, **kwargs)`` callable: eagerly (fold, hooks) or as graph
nodes (branch), so the three ways compute the same thing, in PEFT's order.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.methods import node_roles as roles
from surgeon.methods.adapter import SiteAdapter
from surgeon.methods.oft.config import OftConfig
from surgeon.methods.oft.peft import OftPeft

__all__ = ["OftWeights", "coft_project_"]

aten = torch.ops.aten


def _eager(op, *args, **kwargs):
    return op(*args, **kwargs)


def _skew(run, packed, slots, rows: int, size: int):
    """Q = U - U^T, U (rows, b, b) holding ``packed`` in its strict upper triangle."""
    flat = run(aten.index_copy.default, run(aten.new_zeros.default, packed, [rows, size * size]), 1, slots, packed)
    upper = run(aten.view.default, flat, [rows, size, size])
    return run(aten.sub.Tensor, upper, run(aten.transpose.int, upper, -2, -1))


def coft_project_(packed, slots, size: int, eps: float):
    """COFT's projection, in place (as PEFT, which overwrites its parameter before each use); returns ``packed``.

    Q_i stays when ||Q_i||_F <= eps / sqrt(rows), else becomes Q_i * (eps / sqrt(rows)) / ||Q_i||_F.
    """
    with torch.no_grad():
        q = _skew(_eager, packed, slots, packed.shape[0], size)
        radius = eps / torch.sqrt(torch.tensor(packed.shape[0]))  # a float32 scalar, as PEFT's
        norm = torch.norm(q, dim=(1, 2), keepdim=True)
        q = torch.where(norm <= radius, q, radius * (q / norm))
        packed.copy_(q.flatten(1)[:, slots])
    return packed


def rotation(run, packed, slots, config, rows: int, blocks: int, size: int, dtype):
    """The (blocks, b, b) rotation blocks R_i from the packed parameter (see config.py)."""
    q = _skew(run, packed, slots, rows, size)
    if config.neumann:
        r = run(aten.diag_embed.default, run(aten.new_ones.default, packed, [rows, size]))
        terms = config.neumann_terms
        if terms > 1:
            r = run(aten.add.Tensor, r, q, alpha=2.0)
        if terms > 2:  # PEFT's series: 2 Q^k up to Q^(n-2), then Q^(n-1) once (n = 3 like n = 4)
            power = run(aten.bmm.default, q, q)
            r = run(aten.add.Tensor, r, power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = run(aten.bmm.default, power, q)
                r = run(aten.add.Tensor, r, power, alpha=2.0)
            r = run(aten.add.Tensor, r, run(aten.bmm.default, power, q))
    else:  # R (I + Q) = I - Q, solved in at least float32 (PEFT's identity is float32), back to dtype
        wide = torch.promote_types(dtype, torch.float32)
        eye = run(aten.diag_embed.default, run(aten.new_ones.default, packed, [rows, size], dtype=wide))
        if wide != dtype:
            q = run(aten._to_copy.default, q, dtype=wide)
        r = run(aten.linalg_solve.default, run(aten.add.Tensor, eye, q), run(aten.sub.Tensor, eye, q), left=False)
        if wide != dtype:
            r = run(aten._to_copy.default, r, dtype=dtype)
    if rows != blocks:  # block_share: one block for all
        r = run(aten.expand.default, r, [blocks, size, size])
    return r


class OftWeights(SiteAdapter):
    method = OftConfig.method_name
    peft_format = OftPeft

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        # the rotated dimension: a linear layer's input, an embedding's output
        self.dimension = out_features if kind == "embedding" else in_features
        self.blocks, self.size = config.blocks(self.dimension)
        self.rows = 1 if config.block_share else self.blocks
        self.oft_R = nn.Parameter(torch.zeros(self.rows, self.size * (self.size - 1) // 2, dtype=dtype, device=device))
        upper = torch.triu_indices(self.size, self.size, 1, device=device)
        self.register_buffer("slots", upper[0] * self.size + upper[1], persistent=False)

    def _rotate(self, run, x, packed, slots, x_dtype):
        """x R (x in its dtype ``x_dtype``; computed in the parameter's dtype, as PEFT does)."""
        dtype = self.oft_R.dtype
        if self.config.coft:
            packed = run(coft_project_, packed, slots, self.size, self.config.eps)
        r = rotation(run, packed, slots, self.config, self.rows, self.blocks, self.size, dtype)
        if x_dtype != dtype:
            x = run(aten._to_copy.default, x, dtype=dtype)
        parts = run(aten.unflatten.int, x, -1, [self.blocks, self.size])
        turned = run(aten.einsum.default, "...rk,rkc->...rc", [parts, r])
        turned = run(aten.flatten.using_ints, turned, -2, -1)
        if x_dtype != dtype:
            turned = run(aten._to_copy.default, turned, dtype=x_dtype)
        return turned

    def matrix(self) -> torch.Tensor:
        """The whole block-diagonal R (dimension x dimension), in the parameter's dtype."""
        r = rotation(_eager, self._packed(), self.slots, self.config, self.rows, self.blocks, self.size, self.oft_R.dtype)
        return torch.block_diag(*r.unbind(0))

    def _packed(self):
        if self.config.coft:
            return coft_project_(self.oft_R, self.slots, self.size, self.config.eps)
        return self.oft_R

    def branch(self, graph, x, y):
        # A linear site rotates its input (nodes before the base op); an embedding, its output.
        before = self.kind != "embedding"
        put = graph.call_before if before else graph.call

        def run(op, *args, **kwargs):
            return put(op, args, roles.ROTATION, kwargs or None)

        target = x if before else y
        dtype = graph.dtype_of(target) or graph.dtype_of(graph.base)
        turned = self._rotate(run, target, graph.param("oft_R"), graph.param("slots"), dtype)
        # the joint: the rotated values in place of the input (or output), which it takes as first argument
        joint = put(aten.slice_scatter.default, (target, turned, -1), roles.IN if before else roles.OUT)
        return (joint, None) if before else (None, joint)

    def fold(self, weight, bias, kind: str):
        with torch.no_grad():
            r = self.matrix().to(weight.dtype)
        if kind == "embedding":
            return weight @ r, bias
        return (r @ weight.T).T, bias  # W R^T, the order PEFT merges in

    def eager(self, module, x, y):
        if self.kind == "embedding":
            return self._rotate(_eager, y, self._packed(), self.slots, y.dtype)
        return torch.nn.functional.linear(self._rotate(_eager, x, self._packed(), self.slots, x.dtype), module.weight, module.bias)

    def hook(self):
        if self.kind == "embedding":
            return super().hook()

        def pre_hook(module, args):
            return (self._rotate(_eager, args[0], self._packed(), self.slots, args[0].dtype),) + tuple(args[1:])

        pre_hook.is_pre_hook = True
        return pre_hook

    def peft_state(self) -> dict:
        return {("oft_embedding_R" if self.kind == "embedding" else "oft_R") + ".weight": self.oft_R}
