"""End-to-end test: a user drives JupyterLab in chromium against the server.

Run against the reference server while developing:

    FPS_BROWSER_SERVER=jupyter-server pytest tests/test_browser.py -v

Default server is jupyverse (with fps_kernels).  See tests/browser_support.py
for the environment variables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    Response,
    ViewportSize,
    WebSocket,
    expect,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

from . import browser_support
from .browser_support import Server
from .gateway_support import KernelGateway

# On a loaded machine an assertion waits as long as an action does (5 s by default).
expect.set_options(timeout=30_000)

KERNEL_DISPLAY_NAME = "Python 3 (ipykernel)"
GATEWAY_DISPLAY_NAME = "Python 3 (ipykernel) (gateway)"
KERNEL_START_TIMEOUT = 60_000  # ms; the first kernel start includes imports
OUTPUT_TIMEOUT = 20_000  # ms
UI_TIMEOUT = 15_000  # ms
INTERRUPT_ATTEMPTS = 3
TEXT_LIMIT = 4000
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}  # wide enough: no toolbar overflow menu

HTML_CODE = """from IPython.display import HTML; HTML("<b id='fps-html'>bold</b>")"""

NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
CODE_CELLS = f"{NOTEBOOK} .jp-Notebook .jp-Cell.jp-CodeCell"
EXECUTION_INDICATOR = f"{NOTEBOOK} .jp-Notebook-ExecutionIndicator"


class BrowserLog:
    """Browser-side problems worth showing when a step fails."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def attach(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)
        page.on("requestfailed", self._on_request_failed)
        page.on("response", self._on_response)
        page.on("websocket", self._on_websocket)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.entries.append(f"console.{message.type}: {message.text}")

    def _on_page_error(self, error: PlaywrightError) -> None:
        self.entries.append(f"pageerror: {error}")

    def _on_request_failed(self, request: Request) -> None:
        self.entries.append(f"requestfailed: {request.method} {request.url} {request.failure}")

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.entries.append(f"http {response.status}: {response.request.method} {response.url}")

    def _on_websocket(self, websocket: WebSocket) -> None:
        # A kernel websocket closing mid-test is the usual cause of a hang.
        self.entries.append(f"websocket opened: {websocket.url}")
        websocket.on("close", lambda ws: self.entries.append(f"websocket closed: {ws.url}"))

    def text(self) -> str:
        return "\n".join(self.entries[-60:]) or "<none>"


class Session:
    """The page, the server and what is needed to explain a failure."""

    def __init__(self, page: Page, server: Server, log: BrowserLog, out_dir: Path) -> None:
        self.page = page
        self.server = server
        self.log = log
        self.out_dir = out_dir

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        # Turns a timeout deep inside Playwright into a message saying which
        # user action failed, with what the user would have seen.
        try:
            yield
        except (AssertionError, PlaywrightError) as exc:
            # "from None": the report already quotes the Playwright error.
            raise pytest.fail.Exception(self.failure_report(name, exc), pytrace=False) from None

    def failure_report(self, name: str, exc: BaseException) -> str:
        screenshot = self.out_dir / f"failure-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.png"
        try:
            self.page.screenshot(path=str(screenshot), full_page=True)
            shot = str(screenshot)
        except PlaywrightError as shot_exc:
            shot = f"<screenshot failed: {shot_exc}>"
        try:
            visible = self.page.locator("body").inner_text(timeout=5000)[:TEXT_LIMIT]
        except PlaywrightError as text_exc:
            visible = f"<cannot read page text: {text_exc}>"
        return (
            f"step {name!r} failed against {self.server.kind} at {self.server.base_url}\n"
            f"{type(exc).__name__}: {exc}\n"
            f"screenshot: {shot}\n"
            f"--- visible page text ---\n{visible}\n"
            f"--- browser console / network problems ---\n{self.log.text()}\n"
            f"--- server log tail ({self.server.log_path}) ---\n{self.server.log_tail()}"
        )


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    # Checked before the server starts so a missing browser fails fast.
    return browser_support.require_chromium()


@pytest.fixture(scope="module")
def lab_server(chromium_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from browser_support.run_server(tmp_path_factory.mktemp("lab-server"))


@pytest.fixture(scope="module")
def kernel_gateway(
    chromium_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KernelGateway]:
    if browser_support.server_kind() != "jupyverse":
        pytest.skip("kernel gateway next to local kernels: a jupyverse feature")
    gateway = KernelGateway(tmp_path_factory.mktemp("lab-kernel-gateway"))
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def gateway_lab_server(
    kernel_gateway: KernelGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    # Its kernels next to the local ones ("merged" mode), as `gw-…` kernelspecs.
    options = [
        "kernels.providers=[spec,gateway]",
        f"kernels.gateway.url={kernel_gateway.url}",
        f"kernels.gateway.auth_token={kernel_gateway.token}",
    ]
    yield from browser_support.run_server(tmp_path_factory.mktemp("gateway-lab"), options)


@pytest.fixture(scope="module")
def browser_context(
    chromium_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrowserContext]:
    profile = tmp_path_factory.mktemp("chromium-profile")  # fresh and empty
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(chromium_path),
            headless=True,
            args=browser_support.CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        try:
            yield context
        finally:
            context.close()


def _session(context: BrowserContext, server: Server, out_dir: Path) -> Iterator[Session]:
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT)
    log = BrowserLog()
    log.attach(page)
    try:
        yield Session(page, server, log, out_dir)
    finally:
        page.close()


@pytest.fixture
def session(
    browser_context: BrowserContext, lab_server: Server, tmp_path: Path
) -> Iterator[Session]:
    yield from _session(browser_context, lab_server, tmp_path)


@pytest.fixture
def gateway_session(
    browser_context: BrowserContext, gateway_lab_server: Server, tmp_path: Path
) -> Iterator[Session]:
    yield from _session(browser_context, gateway_lab_server, tmp_path)


# ------------------------------------------------------------ user actions


def open_lab(s: Session) -> None:
    s.page.goto(s.server.base_url + "/lab")
    # Launcher cards appear once the kernelspecs have been fetched.
    expect(notebook_launcher_card(s.page)).to_be_visible(timeout=KERNEL_START_TIMEOUT)


def notebook_launcher_card(page: Page, display_name: str = KERNEL_DISPLAY_NAME) -> Locator:
    return page.locator(f'.jp-LauncherCard[data-category="Notebook"][title="{display_name}"]')


def create_notebook(s: Session, display_name: str = KERNEL_DISPLAY_NAME) -> None:
    notebook_launcher_card(s.page, display_name).click()
    choose_kernel(s, display_name)


def open_launcher_from_file_menu(s: Session) -> None:
    s.page.locator(".lm-MenuBar-item", has_text=re.compile(r"^File$")).click()
    s.page.locator('.lm-Menu-item[data-command="launcher:create"]').click()


def show_notebook(s: Session, name: str) -> None:
    s.page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=name).click()
    expect(s.page.locator(f"{NOTEBOOK} .jp-Notebook")).to_be_visible()


def choose_kernel(s: Session, display_name: str = KERNEL_DISPLAY_NAME) -> None:
    """Wait for the notebook's kernel; answer the "Select Kernel" dialog if any.

    The launcher card names the kernel, so no dialog is expected there; File >
    New > Notebook (or a missing default kernel) asks for one.
    """
    kernel_name = s.page.locator(f"{NOTEBOOK} .jp-KernelName")
    dialog = s.page.locator(".jp-Dialog")
    either = kernel_name.filter(has_text=display_name).or_(dialog).first
    expect(either).to_be_visible(timeout=KERNEL_START_TIMEOUT)
    if dialog.is_visible():
        dialog.locator("select").select_option(label=display_name)
        dialog.locator(".jp-Dialog-button.jp-mod-accept").click()  # "Select"
        expect(dialog).to_have_count(0)
    expect(s.page.locator(CODE_CELLS).first).to_be_visible()
    expect(kernel_name).to_have_text(display_name)


def wait_kernel_idle(s: Session, timeout: float = KERNEL_START_TIMEOUT) -> None:
    expect(s.page.locator(EXECUTION_INDICATOR)).to_have_attribute(
        "data-status", "idle", timeout=timeout
    )


def run_cell(s: Session, code: str) -> Locator:
    """Type ``code`` into the last (empty) cell, Shift+Enter; return that cell."""
    cells = s.page.locator(CODE_CELLS)
    # A fixed index: Shift+Enter appends a new cell, which ".last" would follow.
    cell = cells.nth(cells.count() - 1)
    editor = cell.locator(".jp-InputArea-editor .cm-content")
    editor.click()
    s.page.keyboard.type(code)
    # Catches auto-closed brackets/quotes or a completer eating keystrokes.
    expect(editor).to_have_text(code)
    s.page.keyboard.press("Shift+Enter")
    return cell


def expect_output(cell: Locator, pattern: str | re.Pattern[str]) -> None:
    expect(cell.locator(".jp-OutputArea-output").first).to_contain_text(
        pattern, timeout=OUTPUT_TIMEOUT
    )


def expect_prompt(cell: Locator, prompt: str) -> None:
    expect(cell.locator(".jp-InputPrompt")).to_have_text(prompt, timeout=OUTPUT_TIMEOUT)


def interrupt_from_toolbar(s: Session, cell: Locator) -> None:
    button = s.page.locator(f'{NOTEBOOK} jp-button[data-command="notebook:interrupt-kernel"]')
    output = cell.locator(".jp-OutputArea-output")
    for attempt in range(1, INTERRUPT_ATTEMPTS + 1):
        button.click()
        try:
            expect(output.first).to_contain_text("KeyboardInterrupt", timeout=5000)
            return
        except AssertionError:
            # A SIGINT landing before ipykernel started running the cell is
            # lost; a user would click again.
            if attempt == INTERRUPT_ATTEMPTS:
                raise


def restart_from_kernel_menu(s: Session) -> None:
    s.page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Kernel$")).click()
    s.page.locator('.lm-Menu-item[data-command="kernelmenu:restart"]').click()
    dialog = s.page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Restart")
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
    expect(dialog).to_have_count(0)


# -------------------------------------------------------------------- test


def notebook_steps(s: Session, display_name: str = KERNEL_DISPLAY_NAME) -> None:
    """The user's steps on a new notebook, from the launcher card of `display_name`."""
    with s.step(f"create notebook from launcher ({display_name})"):
        create_notebook(s, display_name)
        wait_kernel_idle(s)

    with s.step("run print(6*7)"):
        cell = run_cell(s, "print(6*7)")
        expect_output(cell, re.compile(r"^\s*42\s*$"))
        expect_prompt(cell, "[1]:")

    with s.step("interrupt time.sleep(60)"):
        cell = run_cell(s, "import time; time.sleep(60)")
        expect_prompt(cell, "[*]:")
        # Busy means ipykernel has picked up the request, so SIGINT will hit it.
        expect(s.page.locator(EXECUTION_INDICATOR)).to_have_attribute(
            "data-status", "busy", timeout=OUTPUT_TIMEOUT
        )
        interrupt_from_toolbar(s, cell)
        wait_kernel_idle(s, timeout=OUTPUT_TIMEOUT)
        expect_prompt(cell, "[2]:")

    with s.step("restart kernel from Kernel menu"):
        restart_from_kernel_menu(s)
        wait_kernel_idle(s)
        # A fresh kernel has no "time" from the previous cells and counts from 1.
        cell = run_cell(s, "print('time' in globals())")
        expect_output(cell, re.compile(r"^\s*False\s*$"))
        expect_prompt(cell, "[1]:")

    with s.step("render HTML output"):
        cell = run_cell(s, HTML_CODE)
        expect(cell.locator(".jp-OutputArea-output b#fps-html")).to_have_text(
            "bold", timeout=OUTPUT_TIMEOUT
        )
        expect_prompt(cell, "[2]:")


def final_screenshot(s: Session) -> None:
    # Kept for a look at what the user saw, even when everything passed
    # (shown with pytest -rP or -s).
    final = s.out_dir / "notebook-final.png"
    s.page.screenshot(path=str(final), full_page=True)
    print(f"final screenshot: {final}\nbrowser console / network problems:\n{s.log.text()}")


@pytest.mark.browser
def test_notebook_in_browser(request: pytest.FixtureRequest) -> None:
    # Fixtures are requested here rather than as arguments so that a missing
    # chromium or a server that does not start is a test FAILURE (call
    # phase), not a setup error.
    browser_support.require_chromium()
    s: Session = request.getfixturevalue("session")
    with s.step("open /lab"):
        open_lab(s)
    notebook_steps(s)
    final_screenshot(s)


@pytest.mark.browser
def test_gateway_notebook_next_to_a_local_one(request: pytest.FixtureRequest) -> None:
    """The same steps on a kernel that lives in a Kernel Gateway, with a notebook on a local
    kernel open in the same JupyterLab."""
    browser_support.require_chromium()
    s: Session = request.getfixturevalue("gateway_session")
    gateway: KernelGateway = request.getfixturevalue("kernel_gateway")
    with s.step("open /lab: local and gateway kernels"):
        open_lab(s)
        expect(notebook_launcher_card(s.page, GATEWAY_DISPLAY_NAME)).to_be_visible()
    with s.step("local notebook"):
        create_notebook(s)
        wait_kernel_idle(s)
        expect_output(run_cell(s, "print(6*7)"), re.compile(r"^\s*42\s*$"))
    with s.step("open a launcher from the File menu"):
        open_launcher_from_file_menu(s)
        expect(notebook_launcher_card(s.page, GATEWAY_DISPLAY_NAME)).to_be_visible()
    notebook_steps(s, GATEWAY_DISPLAY_NAME)
    with s.step("the gateway notebook's kernel runs in the gateway"):
        sessions = httpx.get(f"{s.server.base_url}/api/sessions", timeout=10).json()
        kernels = {x["kernel"]["name"]: x["kernel"]["id"] for x in sessions}
        assert set(kernels) == {"python3", "gw-python3"}, sessions
        on_gateway = [k["id"] for k in gateway.kernels()]
        assert kernels["gw-python3"] in on_gateway and kernels["python3"] not in on_gateway
    with s.step("back to the local notebook"):
        show_notebook(s, "Untitled.ipynb")
        expect(s.page.locator(f"{NOTEBOOK} .jp-KernelName")).to_have_text(KERNEL_DISPLAY_NAME)
        cell = run_cell(s, "print('still local')")
        expect_output(cell, "still local")
        expect_prompt(cell, "[2]:")
    final_screenshot(s)


INSTANT_RUNS = 4
# The notebook's kernel status while JupyterLab has no kernel for it (before and while its
# POST /api/sessions and the two PATCHes that follow are answered).
NO_KERNEL_YET = "initializing"


def open_notebook_and_run_at_once(s: Session, code: str) -> Locator:
    """Click the launcher card, type `code` in the first cell as soon as its editor takes
    clicks, and Shift+Enter as soon as JupyterLab has a kernel for the notebook, while that
    kernel still starts; return the cell."""
    notebook_launcher_card(s.page).click()
    cell = s.page.locator(CODE_CELLS).first
    editor = cell.locator(".jp-InputArea-editor .cm-content")
    editor.click()  # waits only until the editor is there and takes clicks
    s.page.keyboard.type(code)
    expect(s.page.locator(EXECUTION_INDICATOR)).to_have_attribute(
        "data-status", re.compile(rf"^(?!{NO_KERNEL_YET}$).+"), timeout=KERNEL_START_TIMEOUT
    )
    s.page.keyboard.press("Shift+Enter")
    expect(editor).to_have_text(code)
    return cell


@pytest.mark.browser
def test_cell_run_the_instant_a_notebook_opens(request: pytest.FixtureRequest) -> None:
    """A cell run the instant a new notebook has a kernel, which is still starting, runs.

    JupyterLab 4.6 drops a cell run (clears it without sending it) while it has no kernel for
    the notebook: from its POST /api/sessions to the answer of the second PATCH after it. The
    server used to answer that POST once the kernel replied to kernel_info (0.3 to 1.2 s); it
    now answers at launch (`starting`, see test_instant_start.py and bench/session_post.py),
    and what JupyterLab sends meanwhile waits for the kernel. The window left is JupyterLab's
    own (its three requests, and its page work between them: 0.1 to 0.7 s on a loaded
    2-core machine, for any server), so the test presses Shift+Enter as soon as it is over,
    not at a random point in it."""
    browser_support.require_chromium()
    s: Session = request.getfixturevalue("session")
    with s.step("open /lab (fresh workspace)"):
        # ?reset: no notebook of an earlier test restored over the launcher
        s.page.goto(s.server.base_url + "/lab?reset")
        expect(notebook_launcher_card(s.page)).to_be_visible(timeout=KERNEL_START_TIMEOUT)
    with s.step("first notebook of the page, run once its kernel is idle"):
        # The first notebook of a page makes JupyterLab fetch GET /api/nbconvert, which
        # fps-nbconvert 0.6.4 answers on the event loop (it blocks every request for up to
        # seconds under load; see README, Kernel lifecycle): not what is tested here.
        create_notebook(s)
        wait_kernel_idle(s)
        expect_output(run_cell(s, "print(6*7)"), re.compile(r"^\s*42\s*$"))
    for run in range(1, INSTANT_RUNS + 1):
        with s.step(f"new notebook {run}: run a cell at once"):
            open_launcher_from_file_menu(s)
            cell = open_notebook_and_run_at_once(s, f"print('instant', {run} * 7)")
            expect_output(cell, re.compile(rf"^\s*instant {run * 7}\s*$"))
            expect_prompt(cell, "[1]:")
    final_screenshot(s)
