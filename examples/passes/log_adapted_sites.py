"""A user pass: log every adapted site's shapes, at the 'after_insert' point of the pipeline.

    python examples/passes/log_adapted_sites.py

A pass is a plain function from a torch.fx GraphModule to a PassResult (the
module, and whether it changed it). This one only reads the graph: the nodes
the insert pass added carry ``meta["surgeon"]`` = {adapter, site, role}.
"""

import surgeon
from surgeon.passes import PassResult, adapter_nodes


def log_adapted_sites(gm):
    for node in adapter_nodes(gm, role="shrink"):
        record = node.meta["surgeon"]
        a = gm.get_parameter(node.args[1].target)
        expand = adapter_nodes(gm, role="expand", site=record["site"], adapter=record["adapter"])[0]
        b = gm.get_parameter(expand.args[1].target)
        print(f"{record['adapter']:>8}  {record['site']:<34} A {tuple(a.shape)}  B {tuple(b.shape)}")
    return PassResult(gm, modified=False)


if __name__ == "__main__":
    compiled = surgeon.compile(
        "demo:llama", 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)', passes={"after_insert": [log_adapted_sites]}
    )
    compiled.eval()
    compiled(**compiled.example_kwargs)  # the first call captures the graph and runs the pipeline
