"""The pass contract, the stages of the pipeline as data, and a small pass manager.

A pass is any callable ``pass_(gm: torch.fx.GraphModule) -> PassResult`` (a
pass may also rewrite ``gm`` in place and return None, meaning "changed").
The pipeline's stages are the list :data:`STAGES` (print it with
:func:`describe_stages`); every stage has a point before and after it
(:data:`POINTS`), where users add their own passes::

    def log_sites(gm):
        for node in adapter_nodes(gm, role="out"):
            print(node.meta["surgeon"]["site"])
        return PassResult(gm, modified=False)

    surgeon.compile(model, rules, passes={"after_insert": [log_sites]})

A :class:`Pipeline` is a list of named stages, each a list of passes, built by
:meth:`Pipeline.with_points` from the core passes of each stage and the user's
passes at each point. After every pass the manager lints the graph
(``graph.lint()``) and recompiles it; a pass that raises, or leaves an invalid
graph, is reported as a :class:`PassError` that names it and the passes that
ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from surgeon.diagnostics import SurgeryError

__all__ = ["PassResult", "PassError", "Stage", "STAGES", "POINTS", "describe_stages", "Pipeline", "run_passes"]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: what it does, and to which graphs."""

    name: str
    does: str
    runs_on: str


# The stages, in order. insert and lower make every graph a compiled model runs; fold has a run of its own.
STAGES = (
    Stage("insert", "puts every adapter's branch into the graph at its sites (passes/insert.py), and gates "
          "the train modules' copies", "each graph a compiled model captures"),
    Stage("lower", "rewrites the branches a method's lowering pattern recognises into fused kernel calls "
          "(passes/lower.py)", "those graphs, where the compiled model's kernels lower"),
    Stage("fold", "merges every adapter into its base weights and takes its nodes out (passes/fold.py), "
          "giving back the base graph", "fold(): a copy of the graph"),
)

# Where a user's passes can go, in pipeline order: before and after each stage.
POINTS = tuple(f"{when}_{stage.name}" for stage in STAGES for when in ("before", "after"))


def describe_stages() -> str:
    """The pipeline as text: each point and stage in order, what each stage does and to which graphs."""
    lines = []
    for stage in STAGES:
        lines += [f"  before_{stage.name}", f"{stage.name}: {stage.does}; on {stage.runs_on}", f"  after_{stage.name}"]
    return "\n".join(lines)


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
        """``core``: stage name (of STAGES) -> its passes; ``user``: point (of POINTS) -> passes.

        The stages run in STAGES order, each between its two points; a stage given with no passes still has
        its points, and the points of a stage not in ``core`` are not part of this pipeline.
        """
        user = dict(user or {})
        unknown = sorted(set(user) - set(POINTS))
        if unknown:
            raise PassError(
                f"unknown pass point{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                hint=f"passes can go at: {', '.join(POINTS)}",
            )
        order = [stage.name for stage in STAGES]
        strange = sorted(set(core) - set(order))
        if strange:
            raise PassError(f"unknown pipeline stage{'s' if len(strange) > 1 else ''}: {', '.join(strange)}",
                            hint=f"the stages: {', '.join(order)}")
        for point, passes in user.items():
            if callable(passes):
                user[point] = [passes]
        stages = []
        for stage in sorted(core, key=order.index):
            stages.append((f"before_{stage}", list(user.get(f"before_{stage}", []))))
            stages.append((stage, list(core[stage])))
            stages.append((f"after_{stage}", list(user.get(f"after_{stage}", []))))
        return Pipeline([(n, p) for n, p in stages if p or n in core])

    def run(self, gm, *, lint: bool = True) -> PassResult:
        return run_passes(gm, [p for _, passes in self.stages for p in passes], lint=lint)

    def __str__(self) -> str:
        return "\n".join(f"{name}: {', '.join(map(_name, passes)) or '-'}" for name, passes in self.stages)
