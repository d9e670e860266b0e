"""Planning: rules x captured sites -> a Plan, computed without touching weights.

``select`` matches selectors against sites, ``plan`` builds the plan and its checks (each method's own,
read from the registry: surgeon/methods/).
"""

__all__: list = []
