"""Token-routed self on-policy distillation (docs/distillation.md): annotators, the privileged teacher, routing.

The pure tensor parts (KL, routes, λ schedule, routed loss) live in `tracerl.algos.distill`.
"""

from tracerl.distill.annotate import ANNOTATORS, RULES, Annotation, AnnotationItem, parse_annotation
from tracerl.distill.distiller import Distiller
from tracerl.distill.spans import ResponseText, response_text, spans_to_tokens, token_char_ranges
from tracerl.distill.teacher import (TeacherNoteDemos, TeacherSequence, privileged_note,
                                    teacher_logprobs, teacher_sequence)

__all__ = ["ANNOTATORS", "RULES", "Annotation", "AnnotationItem", "Distiller", "ResponseText",
           "TeacherNoteDemos", "TeacherSequence", "parse_annotation", "privileged_note", "response_text", "spans_to_tokens",
           "teacher_logprobs", "teacher_sequence", "token_char_ranges"]
