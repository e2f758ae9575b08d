"""The tiny preset: world-fitted BPE tokenizer, Qwen3 policy, atomic save / load_policy."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported

import pytest
import torch

from tracerl.models import AGENT_TAGS, PRESETS, atomic_save_pretrained, build_tiny_model, cache_dir, load_policy
from tracerl.models.tiny import CHATML_TEMPLATE, train_tokenizer


def world_texts(seed: int = 0, n_entities: int = 300) -> list[str]:
    """Invented entities and questions shaped like the synthetic search world's."""
    rng = random.Random(seed)
    syllables = ["ka", "lor", "ven", "dra", "mi", "tho", "sel", "ur", "bex", "nal", "qui", "zor", "es", "tam"]
    names = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(n_entities)]
    texts = []
    for name in names:
        texts.append(f"{name} was born in {rng.choice(names)}. {name} founded {rng.choice(names)} Works in {rng.randint(1800, 2000)}.")
        texts.append(f"Question: Where was the founder of {rng.choice(names)} Works born?")
    return texts


TRAJECTORY = (
    "<think>I need the founder first.</think>\n<search> founder of Kalor Works </search>"
    "\n\n<information>Doc 1 (Kalor Works): Venmi founded Kalor Works in 1901.\n"
    "Doc 2: ...</information>\n<answer>Draurtho</answer>"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(world_texts())


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok)


@pytest.mark.parametrize(
    "text",
    [
        TRAJECTORY,
        "  leading spaces,\ttabs\nand  double  spaces  ",
        "unseen bytes: é ß 東京 🙂 \x00 \\ {braces}",
        "<search>no spaces</search><answer>x</answer>",
        "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n<answer>Ur</answer><|im_end|>",
    ],
)
def test_encode_decode_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_skip_special_tokens_keeps_agent_tags(tok):
    ids = tok.encode("<|im_start|>assistant\n" + TRAJECTORY + "<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n" + TRAJECTORY


def test_tags_and_specials_are_single_tokens(tok):
    for tag in (*AGENT_TAGS, "<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tok.encode(tag)
        assert len(ids) == 1, tag
        assert tok.convert_ids_to_tokens(ids[0]) == tag
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert not set(AGENT_TAGS) & set(tok.all_special_tokens)


def test_vocab_size_counts_everything(tok):
    assert len(tok) == 1024
    small = train_tokenizer(world_texts(), vocab_size=300)
    assert len(small) == 300
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


@pytest.mark.slow
def test_tokenizer_is_deterministic_across_processes(tok, tmp_path):
    # Rust hash maps are seeded per process, so a second process is the real test.
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(world_texts()))
    code = (
        "import json, sys; from tracerl.models.tiny import train_tokenizer;"
        "print(train_tokenizer(json.load(open(sys.argv[1]))).backend_tokenizer.to_str())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(texts)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == json.loads(tok.backend_tokenizer.to_str())


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "Answer with <answer>."},
        {"role": "user", "content": "Where was Venmi born?"},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nAnswer with <answer>.<|im_end|>\n"
        "<|im_start|>user\nWhere was Venmi born?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False)
    assert no_prompt == prompt.removesuffix("<|im_start|>assistant\n")

    full = messages + [{"role": "assistant", "content": "<answer>Kalor</answer>"}]
    enc = tok.apply_chat_template(full, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(trained) == "<answer>Kalor</answer><|im_end|>"


def test_param_count_matches_calibration(tok, model):
    n = sum(p.numel() for p in model.parameters())
    assert 0.85e6 < n < 1.0e6, n
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config._attn_implementation == "sdpa"


def test_init_is_seeded_and_leaves_global_rng_alone(tok, model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    same = build_tiny_model(tok, seed=0)
    assert torch.equal(torch.rand(3), expected)
    other = build_tiny_model(tok, seed=1)
    for (name, a), b, c in zip(model.state_dict().items(), same.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_forward_backward(tok):
    model = build_tiny_model(tok)
    ids = torch.tensor([tok.encode(TRAJECTORY)] * 2)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(len(tok))).item()) < 1.0  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_save_load_round_trip_gives_identical_logits(tok, model, tmp_path):
    out = tmp_path / "policy"
    atomic_save_pretrained(model, tok, out)
    atomic_save_pretrained(model, tok, out)  # overwriting an existing directory works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temporaries left behind
    assert (out / "model.safetensors").is_file()

    loaded, loaded_tok = load_policy(out)
    ids = torch.tensor([tok.encode(TRAJECTORY)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.dtype == torch.float32
    assert loaded_tok.encode(TRAJECTORY) == tok.encode(TRAJECTORY)
    assert loaded_tok.chat_template == CHATML_TEMPLATE
    assert loaded_tok.decode(ids[0], skip_special_tokens=True) == TRAJECTORY
    assert (loaded_tok.eos_token, loaded_tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_failed_save_leaves_nothing(tok, tmp_path):
    class Broken:
        def save_pretrained(self, path):
            os.makedirs(path, exist_ok=True)  # as transformers does
            (path / "config.json").write_text("{}")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save_pretrained(Broken(), tok, tmp_path / "policy")
    assert list(tmp_path.iterdir()) == []


def test_load_policy_errors(tok, model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_policy(tmp_path / "file.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(tmp_path)

    saved = atomic_save_pretrained(model, tok, tmp_path / "policy")
    (saved / "tokenizer.json").unlink()
    (saved / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_policy(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_policy(saved)


def test_cache_dir_and_presets(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACERL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TRACERL_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "tracerl")
    assert set(PRESETS) == {"tiny", "smollm2-135m"}
