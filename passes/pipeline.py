"""The pass contract and a small pass manager.

A pass is any callable ``pass_(gm: torch.fx.GraphModule) -> PassResult`` (a
pass may also rewrite ``gm`` in place and return None, meaning "changed").
A :class:`Pipeline` is a list of named stages; users add their own passes at
named points::

    def log_sites(gm):
        for node in adapter_nodes(gm, role="out"):
            print(node.meta["surgeon"]["site"])
        return PassResult(gm, modified=False)

    surgeon.compile(model, rules, passes={"after_insert": [log_sites]})

After every pass the manager lints the graph (``graph.lint()``) and recompiles
it; a pass that raises, or leaves an invalid graph, is reported as a
:class:`PassError` that names it and the passes that ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from surgeon.diagnostics import SurgeryError

__all__ = ["PassResult", "PassError", "Pipeline", "run_passes", "POINTS"]

# Where a user's passes can go, in pipeline order.
POINTS = ("before_insert", "after_insert", "before_fold", "after_fold")


@dataclass
class PassResult:
    graph_module: object  # torch.fx.GraphModule
    modified: bool


class PassError(SurgeryError):
    """A pass failed or left a graph that does not lint."""


def _name(pass_: Callable) -> str:
    return getattr(pass_, "__name__", None) or type(pass_).__name__


def run_passes(gm, passes: Iterable[Callable], *, lint: bool = True) -> PassResult:
    """Run ``passes`` in order on ``gm``; lint after each. Returns the final module and whether any changed it."""
    ran: list[str] = []
    modified = False
    for pass_ in passes:
        name = _name(pass_)
        before = f" (after {', '.join(ran)})" if ran else ""
        try:
            result = pass_(gm)
        except SurgeryError:
            raise
        except Exception as exc:
            raise PassError(f"pass '{name}' failed{before}: {type(exc).__name__}: {exc}") from exc
        if result is None:
            result = PassResult(gm, True)
        if not isinstance(result, PassResult):
            raise PassError(
                f"pass '{name}' returned {type(result).__name__}, not a PassResult",
                hint="a pass returns PassResult(graph_module, modified) (or None after changing the module in place)",
            )
        gm = result.graph_module
        if lint and result.modified:
            try:
                gm.graph.lint()
            except Exception as exc:
                raise PassError(f"pass '{name}' left an invalid graph{before}: {exc}") from exc
        if result.modified:
            gm.recompile()
        modified |= result.modified
        ran.append(name)
    return PassResult(gm, modified)


@dataclass
class Pipeline:
    """Named stages; each stage is a list of passes. User passes go at the points of POINTS."""

    stages: list = field(default_factory=list)  # [(name, [pass, ...])]

    @staticmethod
    def with_points(core: dict, user: dict | None) -> "Pipeline":
        """``core``: stage name -> passes (stages 'insert', 'fold'); ``user``: point -> passes."""
        user = dict(user or {})
        unknown = sorted(set(user) - set(POINTS))
        if unknown:
            raise PassError(
                f"unknown pass point{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                hint=f"passes can go at: {', '.join(POINTS)}",
            )
        for point, passes in user.items():
            if callable(passes):
                user[point] = [passes]
        stages = []
        for stage, passes in core.items():
            stages.append((f"before_{stage}", list(user.get(f"before_{stage}", []))))
            stages.append((stage, list(passes)))
            stages.append((f"after_{stage}", list(user.get(f"after_{stage}", []))))
        return Pipeline([(n, p) for n, p in stages if p or n in core])

    def run(self, gm, *, lint: bool = True) -> PassResult:
        return run_passes(gm, [p for _, passes in self.stages for p in passes], lint=lint)
