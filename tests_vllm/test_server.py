"""The server backend against a real vLLM OpenAI-compatible server on 127.0.0.1 (and one that is down)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tracerl.backends.base import SamplingParams
from tracerl.backends.server import ServerError, ServerPolicy
from tracerl.config import EngineConfig
from tracerl.rollout import encode_prompt

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_dir, port: int) -> list[str]:
    """How tracerl's server backend expects vLLM's server to be started (docs/engines.md §6)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
            "--enforce-eager", "--enable-prefix-caching", "--logprobs-mode", "processed_logprobs",
            "--enable-prompt-tokens-details", "--kv-cache-memory-bytes", str(64 * 2**20),
            "--worker-extension-cls", "tracerl.backends.vllm_worker.TracerlWeightSync"]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": str(REPO / "src")}
    with open(log, "w") as out:
        proc = subprocess.Popen(server_command(tiny_dir, port), stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the vLLM server did not answer within 300 s: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _client(url, hf, **kw) -> ServerPolicy:
    return ServerPolicy(url, hf.tokenizer, 1024, EngineConfig(name="server", url=url, timeout_s=60, **kw))


def test_server_tokens_logprobs_and_weight_sync(server, hf, small_env):
    from conftest import trained_copy

    client = _client(server, hf)
    prompts = [encode_prompt(hf.tokenizer, small_env, t, "none") for t in small_env.tasks("train")[:4]]
    greedy = SamplingParams(16, 0.0, 1.0, ())
    ref, _ = hf.generate(prompts, greedy)
    got, _ = client.generate(prompts, greedy)
    assert [g.token_ids for g in got] == [g.token_ids for g in ref]
    assert max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g.logprobs, r.logprobs)) < 1e-5
    # seeded sampling repeats; log-probs are the tempered ones
    sampled = SamplingParams(16, 0.7, 1.0, ())
    a, _ = client.generate(prompts, sampled, torch.Generator().manual_seed(5))
    b, _ = client.generate(prompts, sampled, torch.Generator().manual_seed(5))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for p, g in zip(prompts, a):
        with torch.no_grad():
            lp = torch.log_softmax(hf.model(torch.tensor([p + g.token_ids])).logits[0] / 0.7, -1)[len(p) - 1:-1]
        assert (lp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0] - torch.tensor(g.logprobs)).abs().max() < 1e-5
    # weights pushed through /collective_rpc + /reset_prefix_cache: the server now samples the new policy
    new = trained_copy(hf, prompts)
    want, _ = new.generate(prompts, greedy)
    assert [g.token_ids for g in want] != [g.token_ids for g in ref]
    client.load_weights(new.model.state_dict(), 1)
    got, _ = client.generate(prompts, greedy)
    assert [g.token_ids for g in got] == [g.token_ids for g in want] and {g.version for g in got} == {1}
    assert client.last_sync_s > 0


def test_server_down_is_one_line_after_bounded_retries(hf):
    port = _free_port()  # nothing listens there
    t0 = time.time()
    with pytest.raises(ServerError, match=rf"127.0.0.1:{port} is not reachable .*2 attempts"):
        ServerPolicy(f"http://127.0.0.1:{port}", hf.tokenizer, 1024,
                     EngineConfig(name="server", timeout_s=2, retries=1, served_model=None))
    assert time.time() - t0 < 10
