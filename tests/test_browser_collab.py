"""End-to-end: JupyterLab's collaborative frontends run cells on the server, tabs closed mid-run.

The frontend extensions (`jupyter-docprovider` 3.0.4, and the `jupyter-server-nbmodel` 0.2.9
labextension on top) are what the `collab` and `nbmodel` extras install. Installed in the test
environment itself they would turn every other browser test's JupyterLab collaborative, so this
test gets their wheels with pip (`pip download --no-deps`, no Python code of theirs is run) and
serves JupyterLab from an overlay prefix: a venv of its own (jupyverse reads labextensions from
`sys.prefix`) that imports everything from the test environment and holds the extensions next to
the environment's own. It needs the network for the two wheels (cached for the session).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from . import browser_support
from .browser_support import Server

# On a loaded machine an assertion waits as long as an action does (5 s by default).
expect.set_options(timeout=30_000)

WHEELS = {
    "docprovider": ("jupyter-docprovider==3.0.4", "@jupyter/docprovider-extension"),
    "nbmodel": ("jupyter-server-nbmodel==0.2.9", "@datalayer/jupyter-server-nbmodel"),
}
CLEANUP_DELAY = 3  # yjs.document_cleanup_delay: the room closes 3 s after the last page left
TIMEOUT = 60_000  # ms
PRINTER = "import time\nfor i in range(100, 116):\n    print(i, flush=True)\n    time.sleep(0.5)"
LINES = "".join(f"{i}\n" for i in range(100, 116))
CODE_CELL = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell.jp-CodeCell"


def _wheel(spec: str, cache: Path) -> Path:
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    found = sorted(cache.glob(f"{name}-*.whl"))
    if result.returncode != 0 or not found:
        pytest.fail(f"could not download {spec} (network?):\n{result.stdout}\n{result.stderr}")
    return found[0]


def _unpack_labextension(wheel: Path, package: str, target: Path) -> None:
    marker = f"/share/jupyter/labextensions/{package}/"
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if marker in member and not member.endswith("/"):
                path = target / package / member.split(marker, 1)[1]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))


def overlay_prefix(root: Path, frontends: list[str], cache: Path) -> Path:
    """A venv whose share/jupyter holds the test environment's files plus the extensions."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python*/site-packages"))
    main_site = next(Path(sys.prefix).glob("lib/python*/site-packages"))
    (site / "zz_test_env.pth").write_text(f"import site; site.addsitedir({str(main_site)!r})\n")
    share, main_share = root / "share" / "jupyter", Path(sys.prefix) / "share" / "jupyter"
    labextensions = share / "labextensions"
    labextensions.mkdir(parents=True)
    for entry in main_share.iterdir():
        if entry.name != "labextensions":
            (share / entry.name).symlink_to(entry)
    for entry in (main_share / "labextensions").iterdir():
        (labextensions / entry.name).symlink_to(entry)
    for frontend in frontends:
        spec, package = WHEELS[frontend]
        _unpack_labextension(_wheel(spec, cache), package, labextensions)
    return root


def start_server(prefix: Path, tmp: Path) -> Server:
    root = tmp / "root"
    root.mkdir()
    log_path = tmp / "server.log"
    command = [
        str(prefix / "bin" / "python"),
        # The `jupyverse` command, with a start timeout fit for a loaded machine.
        str(Path(__file__).parent / "support" / "jupyverse_cli.py"),
        "--port",
        str(browser_support.free_port()),
        "--host",
        "127.0.0.1",
    ]
    port = command[-3]
    for option in (
        "frontend.collaborative=true",
        "jupyterlab.server_side_execution=true",
        "kernels.require_yjs=true",
        f"yjs.document_cleanup_delay={CLEANUP_DELAY}",
    ):
        command += ["--set", option]
    env = browser_support.server_env(tmp / "state")
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server("jupyverse", f"http://127.0.0.1:{port}", root, log_path, process, command)
    deadline = time.monotonic() + browser_support.SERVER_START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if browser_support._answers_http(server.base_url + "/lab"):
            return server
        time.sleep(0.25)
    browser_support.stop_process(process)
    pytest.fail(f"jupyverse did not start:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("frontend-wheels")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = browser_support.require_chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium), args=browser_support.CHROMIUM_ARGS
        )
        yield launched
        launched.close()


def collab_server(frontends: list[str], cache: Path, tmp: Path) -> Iterator[Server]:
    prefix = overlay_prefix(tmp / "prefix", frontends, cache)
    server = start_server(prefix, tmp)
    try:
        yield server
    finally:
        browser_support.stop_process(server.process)


def new_notebook(page: Page, server: Server) -> Locator:
    page.goto(server.base_url + "/lab")
    page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click(timeout=TIMEOUT)
    cell = page.locator(CODE_CELL).first
    expect(cell).to_be_visible(timeout=TIMEOUT)
    expect(page.locator(".jp-Notebook-ExecutionIndicator").first).to_have_attribute(
        "data-status", "idle", timeout=TIMEOUT
    )
    return cell


def _execute_posts(server: Server) -> int:
    log = server.log_path.read_text(errors="replace")
    return len(re.findall(r'"POST /api/kernels/[^/ ]+/execute[^"]*" 202', log))


def type_and_run(page: Page, cell: Locator, code: str, server: Server) -> None:
    editor = cell.locator(".jp-InputArea-editor .cm-content")
    editor.click()
    # Filled, not typed: typed, the editor's auto-indent and bracket closing depend on when
    # its language support has loaded.
    last_line = code.splitlines()[-1].strip()
    for attempt in range(3):
        editor.fill(code)
        try:
            # A fill made while the editor still sets itself up can be lost: fill again.
            expect(editor).to_contain_text(last_line, timeout=10_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    posts = _execute_posts(server)
    page.keyboard.press("Shift+Enter")
    for _attempt in range(2):
        # JupyterLab drops a run asked for while it still sets up the notebook's session
        # (it sends nothing, the prompt stays `[ ]:`, on any server): run it again then,
        # which the server's log shows to be safe (no request reached it).
        deadline = time.monotonic() + 20
        while _execute_posts(server) == posts and time.monotonic() < deadline:
            time.sleep(0.25)
        if _execute_posts(server) > posts:
            return
        editor.click()
        page.keyboard.press("Control+Enter")


def reopen(page: Page, server: Server) -> Locator:
    page.goto(server.base_url + "/lab")
    cell = page.locator(CODE_CELL).first
    try:
        expect(cell).to_be_visible(timeout=20_000)  # the workspace reopens the notebook
    except AssertionError:
        page.locator(".jp-DirListing-item", has_text="Untitled.ipynb").dblclick()
        expect(cell).to_be_visible(timeout=TIMEOUT)
    return cell


def saved_notebook(server: Server) -> dict[str, object]:
    text = (server.root / "Untitled.ipynb").read_text()
    nbformat.validate(nbformat.reads(text, as_version=4))
    return json.loads(text)


def server_tracebacks(server: Server) -> list[str]:
    log = server.log_path.read_text(errors="replace")
    return [line for line in log.splitlines() if "Traceback" in line or "BrokenResource" in line]


@pytest.mark.browser
@pytest.mark.parametrize("frontends", [["docprovider"], ["docprovider", "nbmodel"]])
def test_every_tab_closed_while_a_cell_prints(
    frontends: list[str], browser: Browser, wheel_cache: Path, tmp_path: Path
) -> None:
    for server in collab_server(frontends, wheel_cache, tmp_path):
        context = browser.new_context()
        page = context.new_page()
        cell = new_notebook(page, server)
        type_and_run(page, cell, PRINTER, server)
        prompt = cell.locator(".jp-InputPrompt")
        expect(prompt).to_have_text("[*]:", timeout=TIMEOUT)
        expect(cell.locator(".jp-OutputArea-output").first).to_contain_text("101", timeout=TIMEOUT)
        context.close()  # every tab closed mid-run
        # Away longer than the room's cleanup delay: the server keeps the room open.
        time.sleep(CLEANUP_DELAY + 3)
        context = browser.new_context()
        page = context.new_page()
        cell = reopen(page, server)
        expect(cell.locator(".jp-InputPrompt")).to_have_text("[1]:", timeout=TIMEOUT)
        output = cell.locator(".jp-OutputArea-output")
        expect(output).to_have_count(1)
        assert output.first.inner_text() == LINES
        context.close()
        saved = saved_notebook(server)
        first = saved["cells"][0]  # type: ignore[index]
        assert first["execution_count"] == 1 and "execution_state" not in first
        assert "".join(o["text"] for o in first["outputs"]) == LINES
        assert not server_tracebacks(server), server.log_tail()


@pytest.mark.browser
def test_input_with_the_nbmodel_frontend(
    browser: Browser, wheel_cache: Path, tmp_path: Path
) -> None:
    for server in collab_server(["docprovider", "nbmodel"], wheel_cache, tmp_path):
        context = browser.new_context()
        page = context.new_page()
        cell = new_notebook(page, server)
        type_and_run(page, cell, "x = input()\nprint(x * 2)", server)
        box = cell.locator(".jp-Stdin-input")
        try:
            expect(box).to_be_visible(timeout=TIMEOUT)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- server log ---\n{server.log_tail()}") from None
        box.fill("ab")
        box.press("Enter")
        expect(cell.locator(".jp-OutputArea-output").last).to_contain_text(
            re.compile(r"^abab$", re.MULTILINE), timeout=TIMEOUT
        )
        expect(cell.locator(".jp-InputPrompt")).to_have_text("[1]:", timeout=TIMEOUT)
        context.close()
        assert not server_tracebacks(server), server.log_tail()
