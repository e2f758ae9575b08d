"""The `tracerl` command: train, sft, eval, export-data, report.

    tracerl train [--config configs/quickstart.yaml] [section.key=value ...]
    tracerl train --resume runs/quickstart
    tracerl sft [--config ...]                      # SFT warm start (cached; pretrained: sft.pretrained=true)
    tracerl eval runs/quickstart --split test       # run dir, checkpoint dir or model dir
    tracerl eval preset --config configs/real_qa_smollm2.yaml --split test --out runs/base  # before RL
    tracerl export runs/quickstart [--out DIR]      # the trained policy as one HF model directory (LoRA merged)
    tracerl export-data --split train --out train.parquet [--config ...]  # a split in Search-R1 / verl parquet
    tracerl serve-retriever --corpus corpus.jsonl   # Search-R1-compatible BM25 server on 127.0.0.1:8000 (--dense, --hybrid)
    tracerl report runs/quickstart                  # writes runs/quickstart/report.html
    tracerl compare runs/a runs/b --out cmp.html    # methods side by side, seeds pooled
    tracerl calibrate [--steps 3]                   # measured chain / continuation cost -> equal-cost tree sizes
    tracerl sim --allocator all [alloc.epsilon=0]   # the shipped allocators at equal token budget on simulated prompts
    tracerl predictor-eval runs/b --train runs/a    # success predictors vs baselines and the Monte-Carlo ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tracerl import __version__
from tracerl.errors import TracerlError
from tracerl.task import SPLITS  # every environment's splits


def _config_path(arg: str | None) -> str | None:
    """The user's YAML, or None: the typed defaults *are* the embedded quickstart (configs/quickstart.yaml
    spells them out; a test keeps the two equal). A path that does not exist but names a config shipped
    in the package (`smollm2`, `smollm2.yaml`, `configs/smollm2.yaml`) is that shipped file, so the
    README's commands also work from an installed wheel, outside the repository."""
    if not arg or Path(arg).exists():
        return arg or None
    shipped = shipped_config(arg)
    return str(shipped) if shipped is not None else arg


def shipped_config(name: str) -> Path | None:
    """The config of the package's `configs/` directory that `name` names, if any."""
    rel = name.removeprefix("./").removeprefix("configs/")
    rel = rel if rel.endswith(".yaml") else f"{rel}.yaml"
    root = Path(__file__).resolve().parent / "configs"
    path = (root / rel).resolve()
    return path if path.is_file() and root.resolve() in path.parents else None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    hf_logging.set_verbosity_error()


def _preflight(cfg, model_dir: Path | None = None) -> None:
    from tracerl.setup import preflight  # imported here: `tracerl --help` stays fast

    preflight(cfg, model_dir)


def cmd_train(args) -> int:
    if args.help_config:
        from tracerl.config import describe_fields

        from tracerl.envs import ENVIRONMENTS, options_model

        for key, default, doc in describe_fields():
            print(f"{key:34s} {default:>16s}  {doc}")
        for env in ENVIRONMENTS.names():  # each environment's typed env.options
            if options_model(env) is not None:
                print(f"\nenv.options of env.name={env}:")
                for key, default, doc in describe_fields(options_model(env), "env.options."):
                    print(f"{key:34s} {default:>16s}  {doc}")
        return 0
    if args.resume and (args.overwrite or args.auto_resume):
        raise TracerlError(f"--resume continues {args.resume}; it cannot be combined with "
                           f"{'--overwrite' if args.overwrite else '--auto-resume'}")
    if args.resume and args.config:
        raise TracerlError("--resume reads the run's own config.yaml; drop --config (change keys with overrides)")
    from tracerl.train import train  # checks the config before it builds or writes anything (setup.preflight)

    _quiet_transformers()
    run_dir, result = train(None if args.resume else _config_path(args.config), args.overrides,
                            resume=args.resume, overwrite=args.overwrite, auto_resume=args.auto_resume,
                            allow_change=args.allow_change)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 reports
        print(f"run directory: {run_dir}")
        print("final validation: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float))))
    if distributed:
        # The run is complete and on disk; leave without the interpreter's teardown, in which the
        # process group's native threads can abort the process (seen with gloo) and fail the launch.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _model_config(path, overrides, saved=None):
    """The config of a command that runs the model (`saved`: a run's, `resume_rules.SavedConfig`), with
    run.threads applied as `tracerl train` applies it."""
    from tracerl.config import load_config
    from tracerl.setup import apply_threads

    cfg = saved.config(overrides) if saved is not None else load_config(path, overrides)
    apply_threads(cfg)
    return cfg


def _nonneg(text: str) -> int:
    return _int_at_least(text, 0)


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _port(text: str) -> int:
    value = _nonneg(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value}")
    return value


def _fraction(text: str, upper_open: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be in [0, 1{')' if upper_open else ']'}, got {value}")
    return value


def _unit_interval(text: str) -> float:
    return _fraction(text)


def _probability_below_one(text: str) -> float:
    return _fraction(text, upper_open=True)


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def cmd_sft(args) -> int:
    from tracerl.setup import warm_start

    cfg = _model_config(_config_path(args.config), args.overrides)
    _preflight(cfg)
    _quiet_transformers()
    print(f"SFT model: {warm_start(cfg, force=args.force)}")
    return 0


def _resolve_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(model dir, run dir or None) from a run dir, a checkpoint dir or a plain model dir."""
    from tracerl.checkpoint import latest_checkpoint
    from tracerl.rundir import CHECKPOINT_DIR, CHECKPOINT_MODEL_DIR, CONFIG_FILE

    if not path.exists():
        raise TracerlError(f"checkpoint path {path} does not exist")
    if (path / CONFIG_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir():
        ckpt = latest_checkpoint(path / CHECKPOINT_DIR)
        if ckpt is None:
            raise TracerlError(f"run directory {path} has no complete checkpoint")
        return ckpt / CHECKPOINT_MODEL_DIR, path
    if (path / CHECKPOINT_MODEL_DIR / "config.json").is_file() or (path / CHECKPOINT_MODEL_DIR / "adapter_config.json").is_file():
        run = path.parent.parent
        return path / CHECKPOINT_MODEL_DIR, run if (run / CONFIG_FILE).is_file() else None
    return path, None


def cmd_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tracerl.envs.answers import set_em_mode
    from tracerl.evaluate import breakdown, evaluate, squad_scores
    from tracerl.models.io import load_policy
    from tracerl.rundir import BREAKDOWN_FILE, CONFIG_FILE, EVAL_CLI_FILE
    from tracerl.setup import build_backend, build_env, resolve_model_path

    _quiet_transformers()
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise TracerlError(f"--out {args.out} is a file; give a directory")
    if args.checkpoint == "preset":  # the config's initial policy, before any RL
        if not args.config:
            raise TracerlError("`tracerl eval preset` evaluates the model of --config; pass --config FILE.yaml")
        cfg = _model_config(args.config, args.overrides)
        _preflight(cfg)
        model_dir, run_dir = resolve_model_path(cfg), None
    else:
        model_dir, run_dir = _resolve_checkpoint(Path(args.checkpoint))
        saved = None
        if run_dir is not None and not args.config:  # the run's config, or the evaluated checkpoint's copy
            from tracerl.resume_rules import read_with_copy

            copy = model_dir.parent / CONFIG_FILE
            saved = read_with_copy(run_dir / CONFIG_FILE, copy if copy.is_file() else None,
                                   lambda line: print(line, file=sys.stderr))
        cfg = _model_config(_config_path(args.config), args.overrides, saved)
        _preflight(cfg, model_dir)
    if args.out:
        run_dir = Path(args.out)
        run_dir.mkdir(parents=True, exist_ok=True)
    set_em_mode(cfg.eval.em)  # em / f1: the reward's matching, as in training
    env = build_env(cfg)
    tasks = env.tasks(args.split)
    if args.n:
        tasks = tasks[: args.n]
    model, tok = load_policy(model_dir)
    policy = build_backend(cfg, model, tok, model_dir, cfg.run.device)
    res, trajs = evaluate(policy, env, tasks, cfg.rollout.max_turn_tokens, cfg.model.chat_template, cfg.rollout.batch_size)
    res = {**res, **squad_scores(trajs), "em_mode": cfg.eval.em}  # em_squad / f1_squad: Search-R1's matching
    table = Table(title=f"{env.name} / {args.split} — {model_dir}")
    for col in ("n", f"EM ({cfg.eval.em})", f"F1 ({cfg.eval.em})", "EM (squad)", "F1 (squad)", "mean turns",
                "format-error rate", "tool calls / episode"):
        table.add_column(col, justify="right")
    table.add_row(str(res["n"]), f"{res['em']:.3f}", f"{res['f1']:.3f}", f"{res['em_squad']:.3f}", f"{res['f1_squad']:.3f}",
                  f"{res['mean_turns']:.2f}", f"{res['format_error_rate']:.3f}", f"{res['tool_calls_per_episode']:.2f}")
    console = Console() if Console().is_terminal else Console(width=150)
    console.print(table)
    rows = breakdown(trajs)
    if rows:
        console.print(breakdown_table(rows, f"by dataset and question type ({args.split})"))
    if args.json:
        print(json.dumps({"split": args.split, **res, **({"breakdown": rows} if rows else {})}))
    if run_dir is not None:
        with open(run_dir / EVAL_CLI_FILE, "a") as f:
            f.write(json.dumps({"model": str(model_dir), "split": args.split, **res}) + "\n")
        if rows:
            from tracerl.report import write_report

            with open(run_dir / BREAKDOWN_FILE, "a") as f:
                f.write(json.dumps({"model": str(model_dir), "split": args.split, "rows": rows}) + "\n")
            print(f"report: {write_report(run_dir)}")
    return 0


def cmd_export(args) -> int:
    from tracerl.models.export import export_policy

    _quiet_transformers()
    model_dir, run_dir = _resolve_checkpoint(Path(args.run_dir))
    if args.out is None and run_dir is None:
        raise TracerlError(f"{args.run_dir} is a model directory, not a run; pass --out DIR")
    out = Path(args.out) if args.out else run_dir / "export"
    record = export_policy(model_dir, out, {"source": str(model_dir)})
    what = "base + LoRA adapter, merged" if record["kind"] == "lora-merged" else "full weights, copied"
    print(f"exported {model_dir} ({what}) to {out}")
    return 0


def cmd_export_data(args) -> int:
    from tracerl.config import load_config
    from tracerl.export_data import export_split

    cfg = load_config(_config_path(args.config), args.overrides)
    n = export_split(cfg, args.split, args.out, args.ability)
    print(f"wrote {n} {cfg.env.name} {args.split} tasks to {args.out}")
    return 0


def breakdown_table(rows: list[dict], title: str):
    """The rich table of `evaluate.breakdown` rows."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("dataset", "type", "hops", "n", "EM", "F1", "EM (squad)", "F1 (squad)", "mean turns", "format-error rate",
                "gold recall"):
        table.add_column(col, justify="left" if col in ("dataset", "type") else "right")
    for r in rows:
        recall = "-" if r.get("gold_recall") is None else f"{r['gold_recall']:.3f}"
        table.add_row(str(r["dataset"]), str(r["type"]), str(r["hops"]), str(r["n"]), f"{r['em']:.3f}",
                      f"{r['f1']:.3f}", f"{r['em_squad']:.3f}", f"{r['f1_squad']:.3f}", f"{r['mean_turns']:.2f}",
                      f"{r['format_error_rate']:.3f}", recall)
    return table


def cmd_serve_retriever(args) -> int:
    from tracerl.envs.qa_data import load_corpus
    from tracerl.tools.dense import make_search
    from tracerl.tools.retrieval_server import RetrievalServer

    docs = load_corpus(args.corpus)
    kind = "dense" if args.dense else "hybrid" if args.hybrid else "bm25"
    if kind != "bm25":
        _quiet_transformers()
    search = make_search(kind, docs, args.top_k)  # dense: embedded once, then read from the index cache
    try:
        server = RetrievalServer(docs, args.host, args.port, args.top_k, verbose=args.verbose, search=search)
    except (OSError, OverflowError) as e:
        raise TracerlError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"serving {len(docs)} documents from {args.corpus} ({kind}) at {server.url}/retrieve "
          f"(top-k {args.top_k}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()  # SIGTERM stops it too (the server's own handler)
    except KeyboardInterrupt:
        print("retrieval server stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def cmd_report(args) -> int:
    from tracerl.report import write_report
    from tracerl.rundir import CONFIG_FILE, METRICS_FILE

    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS_FILE).is_file() and not (run_dir / CONFIG_FILE).is_file():
        raise TracerlError(f"{run_dir} is not a run directory (no config.yaml or metrics.jsonl)")
    print(f"report: {write_report(run_dir, args.tree_step, args.tree_prompts)}")
    return 0


def cmd_compare(args) -> int:
    from tracerl.report.compare import write_comparison

    print(f"comparison: {write_comparison(args.run_dirs, args.out, args.label_key)}")
    return 0


def cmd_calibrate(args) -> int:
    from tracerl.calibrate import calibrate, overrides_for

    cfg = _model_config(_config_path(args.config), args.overrides)
    _preflight(cfg)
    _quiet_transformers()
    res = calibrate(cfg, args.steps)
    print(f"chains: G = {res['group_size']}, {res['mean_chain_tokens']:.1f} generated tokens per chain "
          f"-> {res['token_budget']} per prompt")
    print(f"measured continuation fraction f = {res['continuation_fraction']:.3f}")
    print(f"equal-cost Tree-GRPO: M={res['trees_per_prompt']} N={res['expansions']} L={res['rounds']} "
          f"K={res['leaves_per_tree']} (expected {res['expected_cost_chains']:.2f} chain-equivalents, "
          f"{res['leaves']} leaves per prompt)")
    print("overrides: " + " ".join(overrides_for(res)))
    if args.json:
        print(json.dumps(res))
    return 0


def cmd_sim(args) -> int:
    from dataclasses import fields

    from rich.console import Console

    from tracerl.sim import SimConfig, simulate, summary_table

    options = {f.name: getattr(args, f.name) for f in fields(SimConfig) if hasattr(args, f.name)}
    cfg = SimConfig(**options)  # options the command does not expose keep their SimConfig defaults
    result = simulate(cfg, args.overrides, args.allocator, seed=args.seed, seeds=args.seeds, batches=args.batches)
    console = Console()
    # a pipe or file gets the full table rather than rich's 80-column fallback
    (console if console.is_terminal else Console(width=150)).print(summary_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


# ---- predictor-eval (issue 18 item 2; the logic lives in tracerl.predeval) ----
def cmd_predictor_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tracerl.predeval import PREDICTORS, EvalOptions, evaluate_predictors, markdown, summary, table_rows

    _quiet_transformers()
    predictors = tuple(PREDICTORS if args.predictors == "all" else (p.strip() for p in args.predictors.split(",")))
    opts = EvalOptions(train_steps=args.train_steps, eval_steps=args.eval_steps, mc=args.mc, bootstrap=args.bootstrap,
                       predictors=predictors, value_epochs=args.value_epochs, seed=args.seed)
    result = evaluate_predictors(args.run_dir, args.train, opts, args.overrides)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.markdown:
        print(markdown(result))
    else:
        head, rows = table_rows(result)
        table = Table(title=f"success predictors on the prefixes of {args.run_dir} (AUROC with 95% bootstrap interval)")
        for col in head:
            table.add_column(col, justify="left" if col == "predictor" else "right")
        for row in rows:
            table.add_row(*row)
        console = Console()
        (console if console.is_terminal else Console(width=220)).print(table)
    print(summary(result))
    if args.json:
        print(json.dumps(result))
    return 0
# ---- end predictor-eval ----


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (`error: tracerl eval: argument --split: ...`)
    instead of the usage block; `--help` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")

    def add_command(self, sub, name: str, **kwargs) -> "Parser":
        c = sub.add_parser(name, **kwargs)
        # also after the subcommand; SUPPRESS keeps `tracerl --debug train` from being reset by the default
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        return c


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tracerl", description="RL of LLM agents with verifiable rewards.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--version", action="version", version=f"tracerl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = p.add_command(sub, "train", help="train a policy (default: the embedded quickstart)")
    t.add_argument("--config", help="YAML config (default: the embedded quickstart config)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--auto-resume", action="store_true",
                   help="resume the config's run directory from its last complete checkpoint if it has one, else "
                        "start it (for torchrun --max-restarts)")
    t.add_argument("--allow-change", action="store_true",
                   help="let --resume change result-changing keys (seed, lr, …); changes go to config_history.jsonl")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5")
    t.set_defaults(fn=cmd_train)

    s = p.add_command(sub, "sft", help="build the SFT warm start (tiny preset; pretrained ones with sft.pretrained=true), cached")
    s.add_argument("--config")
    s.add_argument("--force", action="store_true", help="retrain even if cached")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_sft)

    e = p.add_command(sub, "eval", help="greedy evaluation of a run, checkpoint or model directory")
    e.add_argument("checkpoint", help="run dir, checkpoint dir, model dir, or 'preset' (the --config model before RL)")
    e.add_argument("--split", default="validation", choices=SPLITS, help="train, validation, test or heldout")
    e.add_argument("--config", help="config for the environment (default: the run's)")
    e.add_argument("--n", type=_nonneg, default=0, help="evaluate only the first N tasks (0: all)")
    e.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    e.add_argument("--out", metavar="DIR", help="log the result and write report.html here (default: the run dir, if any)")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=cmd_eval)

    xm = p.add_command(sub, "export", help="write a run's trained policy as one Hugging Face model directory (LoRA merged)")
    xm.add_argument("run_dir", metavar="RUN_DIR", help="run dir (its latest intact checkpoint) or checkpoint dir")
    xm.add_argument("--out", metavar="DIR", default=None, help="where to write it (default: RUN_DIR/export)")
    xm.set_defaults(fn=cmd_export)

    x = p.add_command(sub, "export-data", help="write a split of the config's environment as Search-R1 / verl parquet")
    x.add_argument("--split", default="train", choices=SPLITS, help="train, validation, test or heldout (default train)")
    x.add_argument("--out", required=True, metavar="FILE.parquet", help="where to write the parquet file")
    x.add_argument("--config", help="config of the environment (default: the embedded quickstart)")
    x.add_argument("--ability", default=None, help="the ability column (default: fact-reasoning, math for arith)")
    x.add_argument("overrides", nargs="*", help="dotted overrides, e.g. env.name=arith")
    x.set_defaults(fn=cmd_export_data)

    v = p.add_command(sub, "serve-retriever", help="serve BM25 (or dense / hybrid) retrieval over a corpus with Search-R1's HTTP API")
    v.add_argument("--corpus", required=True, metavar="FILE.jsonl",
                   help="Search-R1 corpus (id, contents), documents (title, text) or real-QA question files")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    v.add_argument("--top-k", type=_positive, default=3, help="documents per query when a request gives no topk (default 3)")
    v.add_argument("--verbose", action="store_true", help="log every request")
    kind = v.add_mutually_exclusive_group()  # default: BM25
    kind.add_argument("--dense", action="store_true",
                      help="all-MiniLM-L6-v2 embeddings in a faiss index, cached under $TRACERL_CACHE (needs tracerl[dense])")
    kind.add_argument("--hybrid", action="store_true", help="BM25 and dense rankings fused by reciprocal rank")
    v.set_defaults(fn=cmd_serve_retriever)

    r = p.add_command(sub, "report", help="write RUN_DIR/report.html")
    r.add_argument("run_dir")
    r.add_argument("--tree-step", type=_nonneg, default=None,
                   help="show the rollout trees logged at this step (default: the latest logged)")
    r.add_argument("--tree-prompts", type=_nonneg, default=4, help="how many prompts' trees to draw (default 4)")
    r.set_defaults(fn=cmd_report)

    c = p.add_command(sub, "compare", help="write one HTML page comparing runs, seeds of a method pooled")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page")
    c.add_argument("--label-key", default=None, metavar="KEY[,KEY...]",
                   help="config key(s) naming a run's method (default: rollout.allocator,algo.advantage)")
    c.set_defaults(fn=cmd_compare)

    k = p.add_command(sub, "calibrate", help="measure chain and continuation cost; print equal-cost tree sizes")
    k.add_argument("--config")
    k.add_argument("--steps", type=_positive, default=3, help="rollout batches to measure (no training)")
    k.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    k.add_argument("overrides", nargs="*")
    k.set_defaults(fn=cmd_calibrate)

    m = p.add_command(sub, "sim", help="run the shipped allocators at equal token budget on simulated prompts (no model)")
    m.add_argument("--allocator", default="all",
                   help="a shipped allocator (uniform, tree_grpo, dapo, pcl, knapsack, trace), or all (default: all, side by side)")
    m.add_argument("--difficulty", default="beta:0.5,0.5", help="v0 distribution: beta:A,B, uniform or point:V")
    m.add_argument("--turns", type=_positive, default=3, help="T: turns of a full trajectory (default 3)")
    m.add_argument("--turn-tokens", default="20-60", help="tokens of one turn: LO-HI or N (default 20-60)")
    m.add_argument("--turn-strength", type=_unit_interval, default=0.3,
                   help="share of the remaining outcome variance one turn resolves, 0..1 (default 0.3)")
    m.add_argument("--early-stop", type=_probability_below_one, default=0.0, help="chance a trajectory ends after a turn (default 0)")
    m.add_argument("--predictor-noise", type=_nonneg_float, default=0.5, help="sigma on the predicted logit (default 0.5)")
    m.add_argument("--oracle", action="store_true", help="the predictor returns the true success probability")
    m.add_argument("--batches", type=_positive, default=10, help="batches per seed (default 10)")
    m.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    m.add_argument("--seeds", type=_positive, default=1, help="number of seeds, from --seed on (default 1)")
    m.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    m.add_argument("overrides", nargs="*",
                   help="the training config's rollout.* / alloc.* keys, as for tracerl train (e.g. alloc.epsilon=0 "
                        "rollout.token_budget=1200); simulator defaults: rollout.prompts_per_step=64, "
                        "alloc.pool_factor=4, rollout.token_budget = G chains per prompt in expectation (null: none)")
    m.set_defaults(fn=cmd_sim)
    # ---- predictor-eval ----
    q = p.add_command(sub, "predictor-eval", help="score success predictors on a run's logged prefixes against baselines and "
                                                    "the Monte-Carlo ceiling")
    q.add_argument("run_dir", help="the evaluated run (trees logged with trainer.tree_log_every=1)")
    q.add_argument("--train", metavar="RUN_DIR", default=None,
                   help="the run whose logged trees train the predictors (default: RUN_DIR, with disjoint --train-steps)")
    q.add_argument("--train-steps", default=None, metavar="A-B", help="logged steps of the training run (default: all)")
    q.add_argument("--eval-steps", default=None, metavar="A-B", help="logged steps of the evaluated run (default: all)")
    q.add_argument("--mc", type=_nonneg, default=8, help="continuations per held-out prefix for the ceiling (default 8; 0: none)")
    q.add_argument("--bootstrap", type=_positive, default=1000, help="bootstrap resamples of the prompts (default 1000)")
    q.add_argument("--predictors", default="all", help="comma-separated predictors to score (default all; names in docs/trace.md §12)")
    q.add_argument("--value-epochs", type=_positive, default=1, help="value model: passes over the training prefixes (default 1)")
    q.add_argument("--seed", type=int, default=0, help="seed of the continuations, bootstrap and fitted predictors (default 0)")
    q.add_argument("--out", metavar="FILE.json", help="also write the full result here")
    q.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    q.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    q.add_argument("overrides", nargs="*", help="dotted keys for both runs' configs, e.g. run.threads=1 predictor.head=logistic")
    q.set_defaults(fn=cmd_predictor_eval)
    # ---- end predictor-eval ----
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot give a trailing positional list (the overrides) items that follow an option
    # (`tracerl eval RUN --split test env.options.x=1`): collect them here
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (TracerlError, OSError) as e:
        # OSError: the machine refused (a permission, a full disk, a missing folder); anything else is a bug
        if getattr(args, "debug", False):
            raise
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error{f' (rank {rank})' if rank is not None else ''}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
