"""Routed self-distillation with a real model: teacher alignment, and training steps on the multi-hop
world and the arithmetic environment (chains and trees, per leaf)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from conftest import SMALL_WORLD
from tracerl.config import load_config
from tracerl.distill.teacher import privileged_note, teacher_logprobs, teacher_sequence
from tracerl.models.io import atomic_save_pretrained
from tracerl.packing import build_batch
from tracerl.rollout import encode_prompt, replay_turns, turn_records
from tracerl.train import Trainer
from tracerl.tree import RolloutTree


@pytest.fixture(scope="module")
def model_dir(tiny_policy, tmp_path_factory):
    """The tiny random policy as a model directory (model.preset=path: no SFT in these tests)."""
    return atomic_save_pretrained(tiny_policy.model, tiny_policy.tokenizer, tmp_path_factory.mktemp("m") / "tiny")


def test_teacher_logprobs_align_with_direct_scoring_of_the_privileged_sequence(tiny_policy, small_env):
    tok, model = tiny_policy.tokenizer, tiny_policy.model
    rng = random.Random(0)
    tasks = small_env.tasks("train")[:2]
    trajs = [replay_turns(tok, small_env, t, small_env.oracle_turns(t, rng, {"useless_search": float(i)}), "auto")
             for i, t in enumerate(tasks)]
    seqs = []
    for task, traj in zip(tasks, trajs):
        note = privileged_note(small_env, task, "solution", "wrong_final")
        seq = teacher_sequence(tok, small_env, task, traj.token_ids, traj.prompt_len, note)
        head = tok.decode(seq.ids[: traj.prompt_len + seq.offset])
        assert task.answers[0] in head and "wrong final" in head and task.question in head
        assert seq.ids[traj.prompt_len + seq.offset:] == traj.token_ids[traj.prompt_len:]  # same ids, no re-tokenisation
        seqs.append(seq)
    length = max(len(t.token_ids) for t in trajs) - 1
    out = teacher_logprobs(model, seqs, length, pad_id=tiny_policy.pad_id)
    V = out.shape[-1]
    assert out.shape == (2, length, V)
    for r, (traj, seq) in enumerate(zip(trajs, seqs)):
        with torch.no_grad():
            direct = torch.log_softmax(model(input_ids=torch.tensor([seq.ids])).logits[0].float(), -1)
        gen = [t for t in range(len(traj.token_ids) - 1) if traj.loss_mask[t + 1]]  # targets sampled by the policy
        assert gen and gen[0] >= traj.prompt_len - 1
        assert torch.allclose(out[r, gen], direct[[t + seq.offset for t in gen]], atol=1e-5)
        student_tokens = torch.tensor([traj.token_ids[t + 1] for t in gen])
        teacher_tokens = torch.tensor([seq.ids[t + seq.offset + 1] for t in gen])
        assert torch.equal(student_tokens, teacher_tokens)
        # prompt positions (never routed) hold the uniform distribution
        assert torch.allclose(out[r, : traj.prompt_len - 1], torch.full((traj.prompt_len - 1, V), -torch.log(torch.tensor(float(V)))))


def _trainer(tmp_path, model_dir, extra, env="multihop"):
    env_args = ([f"env.options.{k}={v}" for k, v in SMALL_WORLD.items()] if env == "multihop" else
                ["env.name=arith", "env.max_turns=1", "env.options={train_size: 60, validation_size: 4}"])
    cfg = load_config(None, [*env_args, "model.preset=path", f"model.path={model_dir}", "model.max_context=512",
                             "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_turn_tokens=16",
                             "trainer.micro_batch_size=4", "trainer.progress=false", "trainer.warmup_steps=0",
                             "trainer.tensorboard=false", "algo.skip_uniform_groups=false", "run.threads=1",
                             f"run.dir={tmp_path / 'run'}", *extra])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    return tr


def _demos(tr, n_tasks=2, noise=("wrong_answer",)):
    """Replayed oracle chains: per task one tree holding a success and a failure (a known wrong answer),
    both hanging from the root, with advantages +1 / −1 -> [(tree, {leaf: A})]."""
    rng = random.Random(0)
    out = []
    tasks = [t for t in tr.train_tasks if t.meta.get("hops", 1) <= 2][:n_tasks]
    for g, task in enumerate(tasks):
        tree = RolloutTree(task, g, 0, encode_prompt(tr.tokenizer, tr.env, task, "auto"), tr.env.initial_state(task))
        adv = {}
        for wrong in (0.0, 1.0):
            t = replay_turns(tr.tokenizer, tr.env, task, tr.env.oracle_turns(task, rng, {k: wrong for k in noise}),
                             "auto", tr.cfg.model.max_context)
            assert t.token_ids[: t.prompt_len] == tree.root.obs_ids
            leaf = tree.attach(0, turn_records(t, 0), done=True, reward=t.reward, info=t.info)
            assert tree.prefix(leaf)[:2] == (t.token_ids, t.loss_mask)  # the tree holds the replayed chain exactly
            adv[leaf] = 1.0 if t.reward > 0 else -1.0
        tree.update_stats()
        out.append((tree, adv))
    assert [tree.nodes[leaf].reward for tree, adv in out for leaf in sorted(adv)] == [1.0, 0.0] * n_tasks
    return out


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("env", ["multihop", "arith"])
def test_routed_update_on_annotated_rollouts(tmp_path, model_dir, env):
    tr = _trainer(tmp_path, model_dir, ["distill.mode=routed", "distill.reverse_kl_on_errors=true",
                                        "distill.warmup_steps=0", "distill.max_span_frac=0.5"], env)
    before = _params(tr.model)
    out = tr.update(build_batch(_demos(tr), tr.layout()), 0)
    assert out["distill_weight"] == 1.0 and out["annotator_invalid_rate"] == 0.0
    assert out["kl_key"] > 0 and out["kl_error"] > 0 and out["teacher_s"] > 0 and out["teacher_rows"] == 4
    assert 0 < out["key_token_frac"] < 0.5 and 0 < out["error_token_frac"] < 0.5
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_kl_weight_zero_step_equals_the_plain_grpo_step(tmp_path, model_dir):
    tr = _trainer(tmp_path, model_dir, ["distill.mode=routed", "distill.kl_weight=0", "distill.reverse_kl_on_errors=true"])
    demos = _demos(tr)
    state, opt = copy.deepcopy(tr.model.state_dict()), copy.deepcopy(tr.optimizer.state_dict())
    before = _params(tr.model)
    routed = tr.update(build_batch(demos, tr.layout()), 0)
    after_routed = _params(tr.model)
    assert any(not torch.equal(a, b) for a, b in zip(after_routed, before))
    tr.model.load_state_dict(state)
    tr.optimizer.load_state_dict(opt)
    tr.distiller = None  # the same forward (one objective): bit-equal steps
    plain = tr.update(build_batch(demos, tr.layout()), 0)
    assert routed["distill_weight"] == 0.0 and routed["teacher_s"] == 0.0 and "kl_key" not in routed
    assert routed["loss"] == plain["loss"] and routed["grad_norm"] == plain["grad_norm"]
    assert all(torch.equal(a, b) for a, b in zip(after_routed, tr.model.parameters()))


def test_routed_update_is_the_same_on_both_layouts(tmp_path, model_dir):
    """algo.dedup_prefix=true (packed trees, the prompt once per tree) trains routed distillation too:
    from the same state its step, loss and KL terms are those of one row per leaf."""
    tr = _trainer(tmp_path, model_dir, ["distill.mode=routed", "distill.reverse_kl_on_errors=true",
                                        "distill.warmup_steps=0", "distill.max_span_frac=0.5",
                                        "algo.dedup_prefix=true"])
    assert tr.layout() == "trees"
    demos = _demos(tr)
    state = copy.deepcopy(tr.model.state_dict())
    tr.cfg.trainer.lr = 1.0  # SGD at lr 1: the step is the clipped gradient itself
    out, steps, packs = {}, {}, {}
    for layout in ("rows", "trees"):
        tr.model.load_state_dict(state)
        tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)
        batch = build_batch(demos, layout)
        packs[layout] = len(batch.packs)
        out[layout] = tr.update(batch, 0)
        steps[layout] = {k: v - state[k] for k, v in tr.model.state_dict().items()}
    tr.model.load_state_dict(state)
    assert packs == {"rows": 4, "trees": 2}
    r, t = out["rows"], out["trees"]
    assert r["kl_key"] > 0 and r["kl_error"] > 0 and r["teacher_rows"] == t["teacher_rows"] == 4
    for k in ("key_token_frac", "error_token_frac", "distill_weight", "annotator_invalid_rate"):
        assert t[k] == r[k], k
    for k in ("loss", "kl_key", "kl_error", "logp_drift"):
        assert t[k] == pytest.approx(r[k], abs=1e-5), k
    assert t["train_tokens"] < r["train_tokens"]  # the prompt runs once per tree
    scale = max(float(v.abs().max()) for v in steps["rows"].values())
    assert scale > 0
    for k in steps["rows"]:
        torch.testing.assert_close(steps["trees"][k], steps["rows"][k], atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize("env,extra", [
    ("multihop", ["distill.mode=routed", "distill.annotator=self", "distill.annotator_max_tokens=4",
                  "distill.reverse_kl_on_errors=true"]),
    ("multihop", ["distill.mode=all_tokens", "rollout.allocator=tree_grpo", "algo.advantage=tree_grpo",
                  "rollout.trees_per_prompt=2", "rollout.expansions=1", "rollout.rounds=1"]),
    ("arith", ["distill.mode=all_tokens", "distill.topk=8"]),
], ids=["chains-self-annotator", "trees-all-tokens", "arith-all-tokens-topk"])
def test_train_step_with_real_rollouts(tmp_path, model_dir, env, extra):
    tr = _trainer(tmp_path, model_dir, [*extra, "distill.warmup_steps=0", "rollout.group_size=2",
                                        "rollout.max_turn_tokens=8", "algo.entropy_coef=0.01"], env)
    before = [p.detach().clone() for p in tr.model.parameters()]
    m = tr.train_step(0)
    assert m["grad_norm"] > 0 and any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    assert m["distill_weight"] == 1.0 and all(k in m for k in ("teacher_s", "key_token_frac", "annotator_invalid_rate"))
    if "distill.annotator=self" in extra:  # a random model writes no valid JSON: counted, never a crash
        assert m["annotated_leaves"] > 0 and m["annotator_invalid_rate"] == 1.0 and m["teacher_rows"] == 0
    else:  # every generated token goes to the teacher
        assert m["key_token_frac"] == 1.0 and m["teacher_rows"] == m["trained_trajectories"] and m["kl_key"] > 0


def test_unknown_annotator_is_one_line_naming_the_valid_ones(tmp_path, model_dir):
    from tracerl.config import ConfigError

    with pytest.raises(ConfigError, match="'distill.annotator': unknown name 'magic'; valid: external, none, rule, self"):
        _trainer(tmp_path, model_dir, ["distill.mode=routed", "distill.annotator=magic"])
