"""sft.rl_share: SFT demonstrations and RL prompts come from disjoint parts of the train split."""
import pytest

from tracerl.config import load_config
from tracerl.envs import make_env
from tracerl.errors import DataError
from tracerl.sft import _demos, sft_key, split_train


@pytest.fixture(scope="module")
def train_tasks():
    return make_env("multihop", seed=0, max_turns=4, top_k=2).tasks("train")


def test_split_is_a_seeded_partition(train_tasks):
    sft, rl = split_train(train_tasks, 0.25, seed=0)
    assert len(rl) == round(0.25 * len(train_tasks))
    assert {t.id for t in sft}.isdisjoint(t.id for t in rl)
    assert {t.id for t in sft} | {t.id for t in rl} == {t.id for t in train_tasks}
    again = split_train(train_tasks, 0.25, seed=0)
    assert [t.id for t in again[1]] == [t.id for t in rl]
    assert [t.id for t in split_train(train_tasks, 0.25, seed=1)[1]] != [t.id for t in rl]
    # order of the split is kept
    pos = {t.id: i for i, t in enumerate(train_tasks)}
    assert [pos[t.id] for t in rl] == sorted(pos[t.id] for t in rl)


def test_zero_share_keeps_everything_for_both(train_tasks):
    sft, rl = split_train(train_tasks, 0.0, seed=0)
    assert sft is train_tasks and rl is train_tasks


def test_share_that_empties_a_side_is_a_clear_error(train_tasks):
    with pytest.raises(DataError, match="sft.rl_share"):
        split_train(train_tasks[:2], 0.9, seed=0)


def test_demos_only_use_sft_questions_and_the_cache_key_tracks_the_share(train_tasks):
    cfg = load_config(None, ["sft.rl_share=0.5", "sft.demos=400"])
    env = make_env("multihop", seed=0, max_turns=4, top_k=2)
    _, rl = split_train(train_tasks, 0.5, seed=0)
    rl_ids = {t.id for t in rl}
    demos = _demos(env, cfg)
    assert len(demos) == 400 and not any(task.id in rl_ids for task, _, _ in demos)
    base = load_config(None, [])
    assert sft_key(cfg) != sft_key(base)
    assert sft_key(load_config(None, ["sft.rl_share=0"])) == sft_key(base)


def test_trainer_draws_rl_prompts_only_from_the_held_out_share(tmp_path):
    from conftest import TINY_RUN

    from tracerl.train import Trainer

    cfg = load_config(None, [*TINY_RUN, "sft.rl_share=0.5", f"run.out_dir={tmp_path}", "trainer.steps=1",
                             "trainer.eval_at_start=false", "trainer.tensorboard=false"])
    tr = Trainer(cfg, log=lambda *a: None)
    tr.setup()
    all_train = tr.env.tasks("train")
    _, rl = split_train(all_train, 0.5, cfg.env.seed)
    assert [t.id for t in tr.train_tasks] == [t.id for t in rl] and len(rl) < len(all_train)
    trees, _ = tr.rollout(0)
    assert {t.task.id for t in trees} <= {t.id for t in rl}



def test_teacher_share_demos_carry_the_private_note_and_the_right_answer():
    from tracerl.distill.teacher import NotedEnv, TeacherNoteDemos
    from tracerl.rollout import replay_turns

    env = make_env("multihop", seed=0, max_turns=4, top_k=2)
    cfg = load_config(None, ["sft.teacher_share=0.3", "sft.demos=300", "sft.wrong_answer=1.0"])
    with pytest.raises(ValueError, match="note demos"):  # the recipe never draws notes of its own
        _demos(env, cfg)
    demos = _demos(env, cfg, TeacherNoteDemos())
    noted = [d for d in demos if d[2] is not None]
    assert 0.2 < len(noted) / len(demos) < 0.4
    for task, turns, note in noted:  # wrong_answer=1 makes every plain demo wrong, never a noted one
        assert note.startswith("Private reference") and task.answers[0] in note
        assert turns[-1].endswith(f"<answer>{task.answers[0]}</answer>")
    assert all(not turns[-1].endswith(f"<answer>{task.answers[0]}</answer>") for task, turns, note in demos if note is None)
    # the note reaches the tokens the model is trained on; the response part is unchanged
    from tracerl.models.tiny import train_tokenizer
    from tracerl.sft import _corpus

    tok = train_tokenizer(_corpus(env, demos[:60]), vocab_size=600)
    task, turns, note = noted[0]
    plain, with_note = replay_turns(tok, env, task, turns, "auto"), replay_turns(tok, NotedEnv(env, note), task, turns, "auto")
    assert len(with_note.token_ids) > len(plain.token_ids) and note in tok.decode(with_note.token_ids)
    assert with_note.token_ids[-sum(plain.loss_mask):] == plain.token_ids[-sum(plain.loss_mask):]
    # the neutral value leaves the cache key (and so every existing warm start) alone
    assert sft_key(load_config(None, ["sft.teacher_share=0"])) == sft_key(load_config(None, []))
    assert sft_key(cfg) != sft_key(load_config(None, ["sft.demos=300", "sft.wrong_answer=1.0"]))


def test_the_key_follows_the_contents_of_files_named_by_path(tmp_path, monkeypatch):
    """A regenerated train file or an edited environment file gets a new warm start, not the cached one;
    validation rows and built-in environments leave the key alone."""
    import shutil
    from pathlib import Path

    from tracerl.sft import named_contents

    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "calculator", tmp_path / "examples" / "calculator")
    monkeypatch.chdir(tmp_path)  # the example's paths are relative to the working directory
    example = tmp_path / "examples" / "calculator"

    def key() -> str:
        return sft_key(load_config(str(example / "config.yaml"), []))

    k0 = key()
    assert key() == k0
    validation = example / "data" / "validation.jsonl"
    validation.write_text("".join(validation.read_text().splitlines(True)[1:]))
    assert key() == k0  # SFT demos come from the train split only
    train = example / "data" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(True)[1:]))
    k1 = key()
    assert k1 != k0
    (example / "env.py").write_text((example / "env.py").read_text() + "\n# edited\n")
    k2 = key()
    assert k2 not in (k0, k1)
    (example / "reward.py").write_text((example / "reward.py").read_text() + "\n# edited\n")
    assert key() == k2  # the demos' text does not depend on the reward function
    assert named_contents(load_config(None, [])) == {}
    import json

    from tracerl.registry import reference_source

    assert reference_source("json:loads") == Path(json.__file__)  # an import path: the module's file
    assert reference_source("no_such_module_here:X") is None
