"""The documentation site builds with strict warnings, and its generated pages are complete.

`mkdocs build --strict` fails on any warning: a broken link between pages, a page missing from the
nav's files, an API reference to a module or member that no longer exists, a docstring mkdocstrings
cannot render. The config reference is generated at build time (scripts/mkdocs_hooks.py), so it cannot
go stale; the second test checks it lists every key of the typed schema."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", REPO / "scripts" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                          "--site-dir", str(site)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stderr, out.stderr[-3000:]
    config_page = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    for key in ("trainer.lr", "rollout.allocator", "env.options.retriever", "env.options.n_entities"):
        assert key in config_page, key
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "tracerl.tools.dense.DenseSearch" in api and "tracerl.registry.Registry" in api
    assert "Benchmarks" in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert (site / "overview" / "index.html").is_file() and not (site / "README" / "index.html").exists()


def test_config_reference_lists_every_key():
    from tracerl.config import describe_fields
    from tracerl.envs import ENVIRONMENTS, options_model

    page = _hooks().config_reference()
    keys = [k for k, _, _ in describe_fields()]
    keys += [k for env in ENVIRONMENTS.names() if options_model(env)
             for k, _, _ in describe_fields(options_model(env), "env.options.")]
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert not missing, missing
    assert "| `trainer.lr` | float (> 0) | `0.0001` |" in page
    assert "| `model.preset` | 'tiny' or 'smollm2-135m' or 'path' | `\"tiny\"` |" in page
    assert "| `run.threads` | int or null (≥ 1) | `null` |" in page
