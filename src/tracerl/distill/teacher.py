"""The privileged teacher: the policy itself, shown the reference solution, scoring the student's tokens.

The teacher sequence is the privileged prompt (a note with the reference answer / solution and the
leaf's coarse diagnostic type, ahead of the task's own prompt) followed by the student's response
token ids unchanged: no re-tokenisation, so response token j of the student is token j of the
teacher's response and the two distributions compare position by position (docs/distillation.md §2).
Observations stay in the sequence as context; they are never scored or trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from tracerl.distill.annotate import ERROR_LABELS, KEY_LABELS
from tracerl.envs.base import Environment, Task
from tracerl.padding import right_pad
from tracerl.rollout import encode_prompt

def privileged_note(env: Environment, task: Task, level: str = "solution", diag_type: str | None = None) -> str:
    """The note placed ahead of the prompt: the gold answer — with level "solution" also the environment's
    `reference_solution` — then the diagnosis (never span text)."""
    reference = f"The correct answer is {task.answers[0]}."
    solution = env.reference_solution(task) if level == "solution" else None
    note = f"Private reference (not shown to the solver). {reference}" + (f" {solution}" if solution else "")
    if diag_type:
        note += f" Assessment of this attempt: {diag_type.replace('_', ' ')}."
    return note


class NotedEnv:
    """The environment with the note ahead of the user message (everything else delegated)."""

    def __init__(self, env: Environment, note: str):
        self.env, self.note = env, note

    def __getattr__(self, name: str):
        return getattr(self.env, name)

    def system_prompt(self) -> str | None:
        return self.env.system_prompt()

    def user_prompt(self, task: Task) -> str:
        return f"{self.note}\n{self.env.user_prompt(task)}"


class TeacherNoteDemos:
    """SFT demos shown with this teacher's note (`sft.teacher_share`), so that the warm start learns to
    use it and can later serve as its own privileged teacher. `tracerl.setup` hands it to the SFT recipe
    (as its `tracerl.sft.NoteDemos`)."""

    def draw(self, env: Environment, task: Task, rng: random.Random) -> str:
        """The reference at either level, and an assessment label of either outcome or none."""
        label = rng.choice([None, "success", "failure", *KEY_LABELS, *ERROR_LABELS])
        return privileged_note(env, task, rng.choice(["solution", "answer"]), label)

    def show(self, env: Environment, note: str) -> Environment:
        return NotedEnv(env, note)


@dataclass
class TeacherSequence:
    ids: list[int]  # privileged prompt ids + the student's response ids (token_ids[prompt_len:])
    offset: int  # teacher position = student position + offset
    prompt_len: int  # the student's prompt length
    student_len: int  # the student's full length


def teacher_sequence(tokenizer, env: Environment, task: Task, token_ids: list[int], prompt_len: int, note: str,
                     chat_template: str = "auto") -> TeacherSequence:
    """Privileged prompt (same template as the student's) + the student's exact response ids."""
    prompt = encode_prompt(tokenizer, NotedEnv(env, note), task, chat_template)
    return TeacherSequence(prompt + list(token_ids[prompt_len:]), len(prompt) - prompt_len, prompt_len, len(token_ids))


@torch.no_grad()
def teacher_logprobs(model, seqs: list[TeacherSequence], length: int, *, pad_id: int, temperature: float = 1.0,
                     device: str | torch.device = "cpu", bf16: bool = False) -> Tensor:
    """Teacher log-probs aligned to the student's target positions: (R, length, V) float32.

    Row r, position t is `log softmax(teacher logits / T)` at teacher position `t + offset_r`, i.e. the
    teacher's distribution for the student's token `t + 1`, for every response target
    `prompt_len_r − 1 ≤ t < student_len_r − 1`; other positions (prompt, padding) hold the uniform
    distribution and must not be routed. Right padding needs no attention mask (causal model)."""
    ids = right_pad([s.ids for s in seqs], pad_id)
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids.to(dev)).logits
    if was_training:
        model.train()
    V = logits.shape[-1]
    out = torch.full((len(seqs), length, V), -torch.log(torch.tensor(float(V))).item(), device=dev)
    for r, s in enumerate(seqs):
        a, b = s.prompt_len - 1, min(s.student_len - 1, length)
        if b > a:
            out[r, a:b] = torch.log_softmax(logits[r, a + s.offset:b + s.offset].float() / temperature, dim=-1)
    return out
