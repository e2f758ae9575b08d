"""The report's tree view: a few logged rollout trees drawn as inline SVG.

The trainer writes RUN_DIR/trees/step_XXXXXX.jsonl (one tree per line) every
`trainer.tree_log_every` steps. The report picks a handful of prompts from one such step (the
latest unless told otherwise; the choice is a fixed-seed sample, so re-rendering gives the same
page) and draws every tree of each picked prompt, depth growing left to right:

* each node is a box labelled with its action (`search: <query>`, `answer: <text>`,
  `invalid (<error>)`), shortened, the full turn text in an SVG <title> tooltip;
* a leaf is green when its reward is > 0 and red otherwise, with its reward and the advantage it
  was trained with printed below it;
* an inner node shows its success rate below it (successes / leaves);
* a mixed anchor (an inner node with at least two leaves below, both outcomes among them: the
  nodes that give tree-based estimators their contrast) gets an orange outline and a diamond.

Everything written into the page is model output or task text and is escaped; nothing in the
view is scripted. Every node is a `<g class="tree-node" data-node-id=...>` so tests and users can
find them.
"""

from __future__ import annotations

import html
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tracerl.errors import TracerlError
from tracerl.tree import RolloutTree, TreeNode, read_jsonl

DEFAULT_PROMPTS = 4

# geometry (px): depth d is column d; every leaf (or childless node) gets its own row
COL_W, BOX_W, BOX_H = 196, 176, 22
ROW_H = 44
MARGIN_X, MARGIN_Y = 10, 10
CHAR_W = 6.1  # rough width of one 11px character, to shorten labels to the box

SUCCESS = ("#d7f0d7", "#2ca02c")  # (fill, stroke)
FAILURE = ("#f7d9d9", "#d62728")
INNER = ("#f3f3f3", "#8a8a8a")
ROOT = ("#e4ebf6", "#1f77b4")
MIXED = "#ff7f0e"

TREE_STYLE = """
.tree-prompt { margin: 18px 0 26px; }
.tree-q { margin: 4px 0; font-size: 14px; } .tree-q .gold { color: #2a7a2a; }
.tree-caption { color: #666; font-size: 12px; margin: 2px 0 4px; }
.tree-scroll { overflow-x: auto; border: 1px solid #eee; background: #fff; }
svg.tree text { font: 11px system-ui, sans-serif; fill: #222; }
svg.tree text.stat { font-size: 10px; fill: #555; }
.swatch { display: inline-block; width: 11px; height: 11px; border: 2px solid; vertical-align: -2px; margin: 0 3px 0 10px; }
"""

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TAGGED = re.compile(r"<(search|answer)>(.*?)(?:</\1>|$)", re.S)


def clean(text: object) -> str:
    """Text that is safe to escape into a page: valid UTF-8, control characters made visible."""
    text = "" if text is None else str(text)
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from JSON escapes
    return _CONTROL.sub("\N{REPLACEMENT CHARACTER}", text)


def esc(text: object) -> str:
    return html.escape(clean(text), quote=True)


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "\N{HORIZONTAL ELLIPSIS}"


def _action_arg(node: TreeNode, action: str) -> str | None:
    """The query or answer of a search / answer turn: from the environment's state history if it
    recorded one, else from the tags in the turn text."""
    history = node.state.get("history") if isinstance(node.state, dict) else None
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        last = history[-1]
        if last.get("action") == action:
            value = last.get("query" if action == "search" else "answer")
            if isinstance(value, str):
                return value
    found = [arg for tag, arg in _TAGGED.findall(str(node.turn.get("text") or "")) if tag == action]
    return found[-1] if found else None


def action_label(node: TreeNode) -> str:
    """`search: <query>`, `answer: <text>`, `invalid (<format error>)`; the root is the prompt."""
    if node.parent is None:
        return "prompt"
    action = node.turn.get("action")
    if action in ("search", "answer"):
        arg = _action_arg(node, action)
        return f"{action}: {arg.strip()}" if arg is not None else str(action)
    if action == "invalid":
        error = node.turn.get("format_error")
        return f"invalid ({error})" if error else "invalid"
    text = " ".join(str(node.turn.get("text") or "").split())
    return text or "(empty turn)"


def is_success(node: TreeNode) -> bool:
    return (node.reward or 0.0) > 0


def is_mixed_anchor(node: TreeNode) -> bool:
    return not node.done and node.leaves >= 2 and node.mixed


def _tooltip(tree: RolloutTree, node: TreeNode) -> str:
    if node.parent is None:
        lines = [f"prompt ({len(node.obs_ids)} tokens)", f"question: {tree.task.question}"]
    else:
        lines = [f"node {node.id} (depth {node.depth}) · {action_label(node)}", "", str(node.turn.get("text") or "")]
        observation = node.turn.get("observation")
        if observation:
            lines += ["", "observation: " + shorten(str(observation), 400)]
    if node.done:
        adv = "-" if node.advantage is None else f"{node.advantage:+.4f}"
        lines += ["", f"reward {node.reward} · advantage {adv}"]
        info = {k: v for k, v in node.info.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if info:
            lines.append(", ".join(f"{k}={v}" for k, v in info.items()))
    else:
        lines += ["", f"{node.successes}/{node.leaves} leaves below succeeded"
                  + (" · mixed anchor" if is_mixed_anchor(node) else "")]
    return "\n".join(lines)


def _stat(node: TreeNode) -> str:
    if node.done:
        adv = "A -" if node.advantage is None else f"A {node.advantage:+.2f}"
        return f"R {node.reward:.2f} · {adv}"
    rate = f"{node.successes}/{node.leaves}"
    return f"\N{BLACK DIAMOND} {rate} mixed" if is_mixed_anchor(node) else rate


@dataclass
class Placed:
    node: TreeNode
    x: float  # left edge of the box
    y: float  # vertical centre of the box


def layout(tree: RolloutTree) -> list[Placed]:
    """Layered layout of the nodes reachable from the root: x from depth, leaves on successive
    rows in depth-first order, an inner node centred on its first and last child."""
    rows: dict[int, float] = {}
    next_row = 0

    def place(node_id: int) -> float:
        nonlocal next_row
        node = tree.nodes[node_id]
        kids = [c for c in node.children if c in tree.nodes]
        if not kids:
            rows[node_id] = next_row
            next_row += 1
        else:
            ys = [place(c) for c in kids]
            rows[node_id] = (ys[0] + ys[-1]) / 2
        return rows[node_id]

    place(tree.root.id)
    return [Placed(tree.nodes[i], MARGIN_X + tree.nodes[i].depth * COL_W, MARGIN_Y + BOX_H / 2 + r * ROW_H)
            for i, r in sorted(rows.items())]


def svg_tree(tree: RolloutTree) -> str:
    placed = layout(tree)
    by_id = {p.node.id: p for p in placed}
    width = MARGIN_X * 2 + max(p.x for p in placed) - MARGIN_X + BOX_W
    height = MARGIN_Y * 2 + max(p.y for p in placed) - MARGIN_Y + BOX_H / 2 + 14
    out = [
        f'<svg class="tree" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}"'
        f' viewBox="0 0 {width:.0f} {height:.0f}" role="img" data-group="{tree.group}"'
        f' data-tree="{tree.index}" aria-label="rollout tree {tree.index} of prompt {tree.group}">'
    ]
    for p in placed:  # edges first, so boxes sit on top of them
        parent = by_id.get(p.node.parent) if p.node.parent is not None else None
        if parent is None:
            continue
        x0, y0, x1, y1 = parent.x + BOX_W, parent.y, p.x, p.y
        mid = (x0 + x1) / 2
        out.append(f'<path class="tree-edge" d="M{x0:.1f},{y0:.1f} C{mid:.1f},{y0:.1f} {mid:.1f},{y1:.1f}'
                   f' {x1:.1f},{y1:.1f}" fill="none" stroke="#9a9a9a" stroke-width="1.3"/>')
    limit = int((BOX_W - 10) / CHAR_W)
    for p in placed:
        node = p.node
        if node.done:
            kind, (fill, stroke) = ("leaf success", SUCCESS) if is_success(node) else ("leaf failure", FAILURE)
        elif node.parent is None:
            kind, (fill, stroke) = "root", ROOT
        else:
            kind, (fill, stroke) = "inner", INNER
        width_px = 1.2
        if is_mixed_anchor(node):
            kind, stroke, width_px = kind + " mixed", MIXED, 2.6
        top = p.y - BOX_H / 2
        out.append(
            f'<g class="tree-node {kind}" data-node-id="{node.id}" transform="translate({p.x:.1f},{top:.1f})">'
            f"<title>{esc(_tooltip(tree, node))}</title>"
            f'<rect width="{BOX_W}" height="{BOX_H}" rx="4" fill="{fill}" stroke="{stroke}"'
            f' stroke-width="{width_px}"/>'
            f'<text x="6" y="15">{esc(shorten(action_label(node), limit))}</text>'
            f'<text class="stat" x="6" y="{BOX_H + 11}">{esc(_stat(node))}</text>'
            "</g>"
        )
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Choosing what to draw


def pick_groups(trees: list[RolloutTree], n: int, step: int) -> list[int]:
    """`n` prompt indices of a step, sampled with the step as seed (the same page every time)."""
    groups = sorted({t.group for t in trees})
    if len(groups) <= n:
        return groups
    return sorted(random.Random(step).sample(groups, n))


def _legend() -> str:
    def swatch(colors: tuple[str, str], label: str) -> str:
        return (f'<span class="swatch" style="background:{colors[0]};border-color:{colors[1]}"></span>'
                f"{esc(label)}")

    return ('<p class="note">' + swatch(SUCCESS, "leaf, reward > 0") + swatch(FAILURE, "leaf, reward ≤ 0")
            + swatch(INNER, "turn") + swatch((INNER[0], MIXED), "mixed anchor ◆ (both outcomes below)")
            + ". Below a leaf: R reward · A advantage it was trained with; below a turn: successes/leaves."
            " Hover a node for its full text.</p>")


def tree_section(tree_files: dict[int, Path], step: int | None = None, prompts: int = DEFAULT_PROMPTS) -> str:
    """The report's "Rollout trees" section. `tree_files` maps step -> trees/step_XXXXXX.jsonl."""
    head = "<h2>Rollout trees</h2>"
    if not tree_files:
        if step is not None:
            raise TracerlError(f"no trees logged, so there is no step {step} to show")
        return head + ('<p class="note">No trees logged (the trainer writes RUN_DIR/trees/ every '
                       "trainer.tree_log_every steps).</p>")
    logged = sorted(tree_files)
    if step is None:
        step = logged[-1]
    elif step not in tree_files:
        raise TracerlError(f"no trees logged at step {step}; logged steps: {', '.join(map(str, logged))}")
    path = tree_files[step]
    try:
        trees = read_jsonl(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return head + f'<p class="note">Could not read {esc(path.name)}: {esc(err)}</p>'
    if not trees:
        return head + f'<p class="note">{esc(path.name)} holds no trees.</p>'
    for tree in trees:  # the counts shown are those of the tree as drawn
        tree.update_stats()
    groups = pick_groups(trees, max(prompts, 0), step)
    total = len({t.group for t in trees})
    parts = [head, f'<p class="meta">Step {step} (trees logged at steps {esc(", ".join(map(str, logged)))}):'
                   f" {len(groups)} of {total} prompts, {len(trees)} trees in all.</p>", _legend()]
    for group in groups:
        group_trees = sorted((t for t in trees if t.group == group), key=lambda t: t.index)
        task = group_trees[0].task
        gold = task.answers[0] if task.answers else "(none)"
        parts.append(f'<div class="tree-prompt" data-group="{group}">'
                     f'<p class="tree-q"><b>Prompt {group}</b> · {esc(task.question)}'
                     f' · gold: <span class="gold">{esc(gold)}</span></p>')
        for tree in group_trees:
            root = tree.root
            mixed = sum(1 for n in tree.nodes.values() if is_mixed_anchor(n))
            parts.append(f'<p class="tree-caption">tree {tree.index}: {len(tree.nodes)} nodes, {root.leaves} leaves,'
                         f" {root.successes} succeeded, {mixed} mixed anchors</p>")
            parts.append(f'<div class="tree-scroll">{svg_tree(tree)}</div>')
        parts.append("</div>")
    return "\n".join(parts)
