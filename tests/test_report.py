"""`robust report`: one self-contained report.html, rendered in a real headless Chromium when one is installed
(scripts/test.sh installs Debian's chromium-headless-shell where it can)."""

import re
import shutil
import subprocess

import pytest

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")


def _browser():
    for name in BROWSERS:
        path = shutil.which(name) or (f"/usr/lib/chromium/{name}" if shutil.os.path.exists(f"/usr/lib/chromium/{name}") else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def quickstart_report(tmp_path_factory):
    """An attack sweep over two defenses (which trains their checkpoints first), with its audit, and a sweep whose
    job fails, reported."""
    import os
    import sys

    root = tmp_path_factory.mktemp("report")
    env = {**os.environ, "COLUMNS": "200"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "robust_cli", *a], cwd=root, capture_output=True, text=True, env=env)
    assert run("attack", "--multirun", "defense=none,fgsm_at", "attack=pgd", "eps=[0,0.1,0.3]", "train.epochs=1", "data.n_test=60").returncode == 0
    bad = run("attack", "--multirun", "attack=pgd", "attack.steps=-1", "train.epochs=1", "data.n_test=30")
    assert bad.returncode == 1  # one job of this sweep fails: the report lists it
    proc = run("report", "outputs")
    assert proc.returncode == 0, proc.stderr
    path = root / "outputs" / "collected" / "report.html"
    return root, path, path.read_text()


def test_report_is_self_contained_with_every_section(quickstart_report):
    _, path, page = quickstart_report
    headings = ("Summary", "Figures", "Failures and warnings", "What was run", "Tables")
    positions = [page.index(f"<h2>{heading}</h2>") for heading in headings]
    assert positions == sorted(positions)  # the summary and the figures first, the raw tables last
    assert "<code>robust attack</code>" in page and "swept <code>defense</code>: fgsm_at, none" in page
    assert "swept <code>eps</code>" not in page  # the failed job has no eps: that is not a second value of it
    assert page.count('src="data:image/png;base64,') >= 2  # collected figures, embedded
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network
    assert "audit monotone" in page or "audit " in page  # the attack runs' audit rows
    assert "attack.steps=-1" in page and "user_error" in page  # the failed job
    assert "robust_accuracy" in page and "train_log" in page
    summary = page[page.index("<table class='summary'") : page.index("</table>", page.index("<table class='summary'"))]
    assert "<th class=text>defense</th>" in summary and "fgsm_at" in summary and "none" in summary
    assert "<th>robust_accuracy@0.1</th>" in summary and re.search(
        r"0\.\d{3}(</b>)?<br><span class=ci>\[0\.\d+, 0\.\d+\]", summary
    )  # one seed: value, interval


def test_report_lists_each_problem_once_and_every_check_behind_a_toggle(quickstart_report):
    _, _, page = quickstart_report
    section = page[page.index("<h2>Failures and warnings</h2>") : page.index("<h2>What was run</h2>")]
    shown, _, everything = section.partition("<details>")
    assert "failed runs" in shown and "user_error" in shown
    assert "<td class='text ok'>" not in shown  # only warn / fail before the toggle
    assert everything.count("<td class='text ok'>") > 0  # the toggle shows the ok rows too
    details = [d for d in shown.split("<tr>")[1:] if "<td class='text warn'>" in d or "<td class='text fail'>" in d]
    assert len(details) == len(set(details))  # each problem once


def test_report_renders_in_headless_chromium_with_its_images(quickstart_report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install chromium-headless-shell; scripts/test.sh does it as root)")
    _, path, _ = quickstart_report
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", "--virtual-time-budget=10000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    total = re.search(r'data-images="(\d+)"', dom.stdout)
    assert loaded and total and int(total.group(1)) >= 2 and loaded.group(1) == total.group(1)  # every image decoded
    # at 1400 x 900 the first screen holds the summary table and the top of the first figure, drawn wide
    first = subprocess.run([browser, *flags, "--window-size=1400,900", "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    numbers = {k: int(v) for k, v in re.findall(r'data-(summary-bottom|figure-top|figure-width|page-width)="(\d+)"', first.stdout)}
    assert numbers["summary-bottom"] < 900 and numbers["figure-top"] < 900 and numbers["figure-width"] >= 800, numbers
    assert numbers["page-width"] <= 1400, numbers  # nothing wider than the window: no sideways scrolling
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1400,900", path.as_uri()], capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 900)
        colors = img.convert("L").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 20  # text, tables and figures: not a blank page
