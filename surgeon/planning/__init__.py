"""Planning: rules x captured sites -> a Plan, computed without touching weights.

``select`` matches selectors against sites, ``plan`` builds the plan and its checks.
"""
