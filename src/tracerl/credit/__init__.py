"""Token-level credit: per-token weights on the advantage (FlowTracer, docs/flowtracer.md).

    attention.py  head-averaged attention maps of a few layers (hooks, no eager switch, no grad)
    flow.py       question-to-answer flow on the attention DAG: reachability, reach, throughput
    regions.py    source (question) and sink (answer) tokens of a trajectory
    weights.py    CREDIT registry: none, flowtracer, random, bottom
    tracer.py     TokenCredit: the trainer's entry point (regions -> attention -> flow -> weights)
"""

from tracerl.credit.flow import Flow, throughput
from tracerl.credit.tracer import CreditHook, CreditResult, CreditStep, TokenCredit, read_samples, write_samples
from tracerl.credit.weights import CREDIT

__all__ = ["CREDIT", "CreditHook", "CreditResult", "CreditStep", "Flow", "TokenCredit", "read_samples", "throughput", "write_samples"]
