"""The report's tree view: the SVG markup, and the page as headless Chromium draws it."""

import io
import os
import re
import shutil

import pytest

from tracerl.envs.base import Task
from tracerl.errors import TracerlError
from tracerl.report import write_report
from tracerl.report.trees import FAILURE, SUCCESS, pick_groups, svg_tree
from tracerl.tree import RolloutTree, TurnRecord, read_jsonl, write_jsonl

EVIL = "<script>document.title='pwned'</script>"
STEP = 6


def record(action, arg=None, text=None, error=None):
    """One turn; the state records it the way the multi-hop environment does."""
    entry = {"action": action}
    if action == "search":
        entry["query"] = arg
    elif action == "answer":
        entry["answer"] = arg
    else:
        entry["format_error"] = error
    if text is None:
        text = f"<think>hm</think><{action}>{arg}</{action}>" if arg is not None else "???"
    turn = {"text": text, "action": action, "format_error": error, "tool_call": action == "search",
            "observation": "<information>doc</information>" if action == "search" else None}
    return TurnRecord([5, 6, 7], [-0.5, -0.4, -0.3], [8, 9], turn, {"history": [entry]})


def branching_tree(group, index=0, question="Who founded Acme?", gold="Ada"):
    """root -> 2 seed turns -> two answers (right, wrong); the first seed turn also branches into
    an invalid turn carrying a script, then a wrong answer."""
    tree = RolloutTree(Task(f"t{group}", question, (gold, "alias")), group, index, [1, 2, 3], {"history": []})
    seed = tree.attach(0, [record("search", "Acme founder"), record("search", "Ada Lovelace")], done=False)
    tree.attach(seed, [record("answer", gold)], done=True, reward=1.0, info={"em": 1.0})
    tree.attach(seed, [record("answer", "Bob")], done=True, reward=0.0, info={"em": 0.0})
    tree.attach(1, [record("invalid", text=EVIL, error="no_action"), record("answer", "Eve")], done=True, reward=0.0)
    _finish(tree)
    return tree


def chain_tree(group, n=3, length=2):
    """The uniform allocator's shape: n independent chains under the root, none successful."""
    tree = RolloutTree(Task(f"c{group}", f"Question {group}?", ("x",)), group, 0, [1, 2], {"history": []})
    for _ in range(n):
        tree.attach(0, [record("search", "q")] * (length - 1) + [record("answer", "y")], done=True, reward=0.0)
    _finish(tree)
    return tree


def _finish(tree):
    tree.update_stats()
    for leaf in tree.leaf_ids():
        node = tree.nodes[leaf]
        node.advantage = 0.75 if node.reward > 0 else -0.25


def make_run(run_dir, trees, step=STEP):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("run: {name: trees, seed: 0}\n")
    write_jsonl(trees, run_dir / "trees" / f"step_{step:06d}.jsonl", {"step": step})
    return run_dir


def small_trees():
    return [branching_tree(0, 0), branching_tree(0, 1), chain_tree(1)]


def node_groups(markup):
    return re.findall(r'<g class="tree-node[^"]*" data-node-id="\d+"', markup)


# ---------------------------------------------------------------------------------------------
# markup


def test_one_marked_group_per_node_and_leaf_colours():
    tree = branching_tree(0)
    svg = svg_tree(tree)
    assert len(node_groups(svg)) == len(tree.nodes) == 7
    assert sorted(int(i) for i in re.findall(r'data-node-id="(\d+)"', svg)) == sorted(tree.nodes)
    leaves = re.findall(r'<g class="tree-node (leaf \w+)[^"]*".*?<rect[^>]*fill="([^"]+)" stroke="([^"]+)"', svg, re.S)
    assert sorted(kind for kind, _, _ in leaves) == ["leaf failure", "leaf failure", "leaf success"]
    for kind, fill, stroke in leaves:
        assert (fill, stroke) == (SUCCESS if kind == "leaf success" else FAILURE)
    # edges parent -> child, one per non-root node
    assert svg.count('class="tree-edge"') == len(tree.nodes) - 1
    # labels, success rates, rewards and signed advantages
    assert "search: Acme founder" in svg and "answer: Ada" in svg and "invalid (no_action)" in svg
    assert "R 1.00 · A +0.75" in svg and "R 0.00 · A -0.25" in svg
    assert "1/3" in svg and "1/2" in svg  # root (and seed turn 1), seed turn 2
    # both seed turns are mixed anchors (>= 2 leaves, both outcomes); the root too
    assert len(re.findall(r'class="tree-node [a-z]+ mixed"', svg)) == 3


def test_action_text_is_escaped_and_shown_in_full_in_the_tooltip():
    svg = svg_tree(branching_tree(0))
    assert "<script" not in svg
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in svg  # inside a <title>
    long = branching_tree(0, question="q")
    long.nodes[1].state["history"][-1]["query"] = "a very long query " * 10 + "\x00\ud800 & end"
    svg = svg_tree(long)
    label = re.search(r'data-node-id="1".*?<text x="6" y="15">([^<]*)</text>', svg, re.S).group(1)
    assert label.startswith("search: a very long query") and label.endswith("…") and len(label) < 40
    assert "\x00" not in svg and "&amp; end" in svg  # the tooltip holds the whole query


def test_report_draws_every_node_of_the_sampled_prompts(tmp_path):
    trees = small_trees()
    page = write_report(make_run(tmp_path / "run", trees)).read_text()
    assert len(node_groups(page)) == sum(len(t.nodes) for t in trees) == 7 + 7 + 7
    assert "Who founded Acme?" in page and "gold: <span class=\"gold\">Ada</span>" in page
    assert page.count('<svg class="tree"') == 3 and "<script" not in page

    many = [branching_tree(g) if g % 2 else chain_tree(g) for g in range(7)]
    run = make_run(tmp_path / "many", many)
    page = write_report(run).read_text()
    groups = sorted(int(g) for g in re.findall(r'<div class="tree-prompt" data-group="(\d+)"', page))
    assert len(groups) == 4 and groups == pick_groups(many, 4, STEP)
    assert write_report(run).read_text().count("data-node-id") == page.count("data-node-id")  # same choice
    assert len(node_groups(page)) == sum(len(t.nodes) for t in many if t.group in groups)
    assert page.count('class="tree-prompt"') == 4
    two = write_report(run, tree_prompts=2).read_text()
    assert two.count('class="tree-prompt"') == 2


def test_step_choice_and_runs_without_trees(tmp_path):
    run = make_run(tmp_path / "run", [chain_tree(0, n=2)], step=2)
    write_jsonl([chain_tree(0, n=5)], run / "trees" / "step_000004.jsonl", {"step": 4})
    latest = write_report(run).read_text()
    assert "Step 4 " in latest and len(node_groups(latest)) == 1 + 5 * 2
    older = write_report(run, tree_step=2).read_text()
    assert "Step 2 " in older and len(node_groups(older)) == 1 + 2 * 2
    with pytest.raises(TracerlError, match="logged steps: 2, 4"):
        write_report(run, tree_step=3)

    bare = tmp_path / "bare"
    bare.mkdir()
    page = write_report(bare).read_text()
    assert "No trees logged" in page and not node_groups(page)


def test_round_trip_keeps_the_advantages(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(small_trees(), path, {"step": 1})
    back = read_jsonl(path)
    assert [n.advantage for n in back[0].nodes.values() if n.done] == [0.75, -0.25, -0.25]


# ---------------------------------------------------------------------------------------------
# the page in a real browser


def _browser_paths():
    chromium = os.environ.get("TRACERL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("TRACERL_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"headless Chromium is needed for this test but {', '.join(missing)} is missing: "
                    "run `make setup-browser` (apt-get install -y chromium chromium-driver)", pytrace=False)
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--window-size=1200,1200", "--force-device-scale-factor=1",
                "--force-color-profile=srgb", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _near(pixel, color, tol=6):
    rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    return all(abs(a - b) <= tol for a, b in zip(pixel[:3], rgb))


@pytest.mark.slow
def test_chromium_draws_the_trees(tmp_path, browser):
    from PIL import Image
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    trees = small_trees()
    report = write_report(make_run(tmp_path / "run", trees))
    browser.get(report.resolve().as_uri())
    assert browser.title.endswith("tracerl report")  # the script in the action text did not run
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018
    assert browser.execute_script("return document.scripts.length") == 0

    nodes = browser.find_elements(By.CSS_SELECTOR, ".tree-node")
    assert len(nodes) == sum(len(t.nodes) for t in trees)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".tree-node.leaf.success")) == 2
    # the escaped script is plain text in a tooltip
    titles = browser.execute_script(
        "return Array.from(document.querySelectorAll('.tree-node title'), t => t.textContent)")
    assert any(EVIL in t for t in titles)

    svg = browser.find_element(By.CSS_SELECTOR, "svg.tree")
    assert svg.size["width"] > 500 and svg.size["height"] > 100  # laid out, not collapsed
    region = browser.find_element(By.CSS_SELECTOR, ".tree-prompt")  # question, captions and trees
    browser.execute_script("arguments[0].scrollIntoView()", region)  # a screenshot is cut to the viewport
    assert region.size["height"] < browser.execute_script("return window.innerHeight")
    box = browser.execute_script(
        "const r = document.querySelector('.tree-node[data-node-id=\"3\"] rect').getBoundingClientRect();"
        " return [r.width, r.height]")
    assert box[0] > 100 and box[1] > 10
    image = Image.open(io.BytesIO(region.screenshot_as_png)).convert("RGB")
    image.save(tmp_path / "tree.png")
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20, f"the tree screenshot looks blank: {len(colours)} colours"
    pixels = [c for _, c in colours]
    assert any(_near(p, SUCCESS[0]) for p in pixels), "no green (successful) leaf drawn"
    assert any(_near(p, FAILURE[0]) for p in pixels), "no red (failed) leaf drawn"
