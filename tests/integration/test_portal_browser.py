"""
The operator portal in a real browser: Debian's headless chromium driven by
playwright (never ``playwright install``) against ``twistd -n piccolod`` on
loopback.

The journey: first-run setup shows the recovery key and then the dashboard
with storage ``unlocked``; a lock made by another client shows ``locked``
within a second (SSE, not polling); unlocking through the page's form; an
export job and an app install (``containers=fake``) appear live; the log
shows the lock events.  Also: the phone layout, login and logout, a wrong
password, and no Content-Security-Policy violation anywhere.

Screenshots go to ``artifacts/portal/`` (gitignored).  Skips when chromium
or playwright is missing, unless ``PICCOLOD_REQUIRE_INTEGRATION=1`` (then it
fails).
"""

from __future__ import annotations

import http.cookiejar
import json
import shutil
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support import REQUIRE, Daemon, poll

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "portal"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--headless",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"
IMAGE = "localhost/demo:1"
APP_SPEC = textwrap.dedent(
    f"""\
    name: demo
    image: {IMAGE}
    listeners:
      - name: web
        guest_port: 8080
        protocol: http
    """
)

#: Cheap key derivation (the defaults cost 64 MiB and about a second) and the
#: in-memory container runtime with the one image the app uses.
CONFIG = textwrap.dedent(
    f"""\
    [subsystems.persistence]
    argon2_time_cost = 1
    argon2_memory_kib = 8192

    [subsystems.containers]
    variant = "fake"
    images = ["{IMAGE}"]
    """
)

#: A drop-in ``api`` variant that mounts the portal on the API's router the
#: way the API service is to (``portal_routes(router, kernel)``), unless the
#: router already serves ``/``.  Used only while the default API lacks it.
DROPIN_MODULE = textwrap.dedent(
    """\
    from piccolod.api.portal import portal_routes
    from piccolod.api.service import APIService


    def build(ctx):
        service = APIService.from_context(ctx)
        if ("GET", "/") not in service.router.routes():
            portal_routes(service.router, ctx.kernel)
        return service
    """
)
DROPIN_PLUGIN = textwrap.dedent(
    """\
    from piccolod.kernel.plugins import SubsystemPlugin

    apiPortalTest = SubsystemPlugin(
        slot="api",
        variant="portal-test",
        description="The HTTP API with the operator portal mounted (test drop-in)",
        factory="piccolod_portal_test_dropin.build",
        config_keys="piccolod.api.service.CONFIG_DEFAULTS",
    )
    """
)


def _require_browser() -> Any:
    """The playwright sync API, or skip (fail when integration is required)."""
    missing = []
    if shutil.which(CHROMIUM) is None:
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    sync_api: Any = None
    try:
        from playwright import sync_api
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing:
        message = "missing: " + ", ".join(missing)
        if REQUIRE:
            pytest.fail(message + " (PICCOLOD_REQUIRE_INTEGRATION=1)")
        pytest.skip(message)
    return sync_api


# --------------------------------------------------------------------------
# Another client: the "someone else" whose changes the page must see live.


class Client:
    """A cookie-keeping JSON client with its own session and CSRF token."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf: str | None = None

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.csrf:
            request.add_header("X-CSRF-Token", self.csrf)
        try:
            with self.opener.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: {e.code} {e.read()!r}") from None
        return json.loads(raw) if raw else None

    def login(self, password: str = PASSWORD) -> Client:
        self.csrf = self.call("POST", "/api/v1/auth/login", {"password": password})["csrf_token"]
        return self


# --------------------------------------------------------------------------
# Fixtures


def _serves_portal(daemon: Daemon) -> bool:
    try:
        with urllib.request.urlopen(daemon.url + "/", timeout=5) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False


#: Whether the shipped API serves the portal (probed once per session).
_SHIPPED: dict[str, bool] = {}


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Any]:
    """
    Start a daemon serving the portal with extra config: the API as shipped
    when it mounts the portal, else the drop-in variant that mounts it.
    """
    _require_browser()
    started: list[Daemon] = []

    def start(name: str, args: list[str], env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(tmp_path / name, args, env=env).start()
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    def make(extra_config: str = "") -> Daemon:
        config = tmp_path / f"piccolod{len(started)}.toml"
        config.write_text(CONFIG + extra_config)
        if _SHIPPED.get("portal", True):
            daemon = start(f"state{len(started)}", ["--config", str(config)])
            if _serves_portal(daemon):
                _SHIPPED["portal"] = True
                return daemon
            _SHIPPED["portal"] = False
            daemon.stop()
        drop = tmp_path / "drop"
        if not drop.exists():
            (drop / "twisted" / "plugins").mkdir(parents=True)
            (drop / "piccolod_portal_test_dropin.py").write_text(DROPIN_MODULE)
            (drop / "twisted" / "plugins" / "piccolod_portal_test.py").write_text(DROPIN_PLUGIN)
        env = {"PYTHONPATH": f"{drop}:{ROOT}"}
        args = ["--config", str(config), "--use", "api=portal-test"]
        daemon = start(f"state{len(started)}", args, env)
        assert _serves_portal(daemon), daemon.log()
        return daemon

    yield make
    for daemon in started:
        daemon.kill()


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    """A daemon serving the portal, with cheap key derivation and fake containers."""
    result: Daemon = make_daemon()
    return result


@pytest.fixture
def browser_context(tmp_path: Path) -> Iterator[Any]:
    """A fresh chromium profile (Debian's chromium, launched by playwright)."""
    sync_api = _require_browser()
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


class PageWatch:
    """A page with its console errors, page errors and CSP violations collected."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.csp: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        if "Content Security Policy" in text or "Refused to" in text:
            self.csp.append(text)
        elif message.type == "error" and not text.startswith(
            # The API's refusals (401 wrong password, 429 back-off...) are
            # answers the page handles, but chromium logs each one.
            "Failed to load resource: the server responded with a status of 4"
        ):
            self.errors.append(text)

    def shot(self, name: str, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def check_clean(self) -> None:
        violations = self.page.evaluate("window.__cspViolations || []")
        assert self.csp == [] and violations == [], (self.csp, violations)
        assert self.errors == [], self.errors


def open_portal(context: Any, url: str) -> PageWatch:
    page = context.new_page()
    page.add_init_script(
        "window.__cspViolations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " e => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    watch = PageWatch(page)
    page.goto(url + "/")
    return watch


def setup_through_page(watch: PageWatch, prefix: str) -> list[str]:
    """First-run setup in the page; returns the recovery words shown."""
    page = watch.page
    page.wait_for_selector("#screen-setup:not([hidden])", timeout=10_000)
    watch.shot(f"{prefix}-setup")
    page.fill("#setup-password", PASSWORD)
    page.fill("#setup-confirm", PASSWORD)
    page.click("#setup-form button[type=submit]")
    page.wait_for_selector("#screen-recovery:not([hidden])", timeout=30_000)
    words = page.eval_on_selector_all(
        "#recovery-words li", "items => items.map(i => i.textContent)"
    )
    watch.shot(f"{prefix}-recovery-key")
    assert page.is_disabled("#recovery-done")
    page.check("#recovery-ack")
    page.click("#recovery-done")
    page.wait_for_selector("#screen-dashboard:not([hidden])")
    return list(words)


def wait_text(page: Any, selector: str, text: str, timeout: float = 10_000) -> None:
    page.wait_for_function(
        "([s, t]) => { const n = document.querySelector(s);"
        " return n && n.textContent.trim() === t; }",
        arg=[selector, text],
        timeout=timeout,
    )


# --------------------------------------------------------------------------
# Tests


def test_setup_lock_unlock_and_live_updates(daemon: Daemon, browser_context: Any) -> None:
    """Setup shows unlocked; another client's lock shows within 1 s; a job and an app show live."""
    watch = open_portal(browser_context, daemon.url)
    page = watch.page
    words = setup_through_page(watch, "01")
    assert len(words) == 24 and all(w.isalpha() for w in words)

    # The dashboard, live: storage unlocked, the stream connected, the views loaded.
    wait_text(page, "#lock-state", "unlocked")
    wait_text(page, "#storage-state", "unlocked")
    page.wait_for_selector("#link-state[data-state=live]", timeout=10_000)
    page.wait_for_selector('#children-table tr[data-child="persistence"]')
    page.wait_for_selector('#leader-table tr[data-resource="control-plane"]')
    page.wait_for_selector('#health-table tr[data-component="kernel"]')
    assert page.text_content('#leader-table tr[data-resource="control-plane"] .state') == "leader"
    assert page.text_content('#children-table tr[data-child="api"] .state') == "running"
    watch.shot("02-dashboard-unlocked")

    # Someone else locks storage: the page shows it through the event stream.
    other = Client(daemon.url).login()
    answer = other.call("POST", "/api/v1/storage/lock")
    locked_at = time.monotonic()
    assert answer["state"] == "locked"
    wait_text(page, "#lock-state", "locked", timeout=1_000)
    latency = time.monotonic() - locked_at
    wait_text(page, "#storage-state", "locked", timeout=1_000)
    assert page.is_visible("#unlock-form")
    assert not page.is_visible("#lock-button")
    print(f"lock shown {latency * 1000:.0f} ms after the lock request returned")
    watch.shot("03-locked")

    # A wrong password is refused in the page; the right one unlocks.
    page.fill("#unlock-password", "not the password")
    page.click("#unlock-form button[type=submit]")
    page.wait_for_selector("#unlock-error:not([hidden])")
    assert "Wrong password" in page.text_content("#unlock-error")
    # At once again: the unlock back-off answers 429, and the page says when to retry.
    page.fill("#unlock-password", PASSWORD)
    page.click("#unlock-form button[type=submit]")
    wait_text(page, "#unlock-error", "Too many attempts: try again in 1 s.", timeout=5_000)
    poll(
        lambda: True if other.call("GET", "/api/v1/storage/status")["retry_after"] == 0 else None,
        timeout=10,
        what="the unlock back-off to end",
    )
    page.fill("#unlock-password", PASSWORD)
    page.click("#unlock-form button[type=submit]")
    wait_text(page, "#lock-state", "unlocked", timeout=10_000)
    assert page.is_hidden("#unlock-error")
    assert page.is_visible("#lock-button")

    # A job started elsewhere shows with its progress bar.
    export = other.call("POST", "/api/v1/exports/control", timeout=60)
    assert export["kind"] == "control"
    job = '#jobs-list li[data-name="control export"]'
    page.wait_for_selector(job, timeout=5_000)
    wait_text(page, f"{job} .state", "succeeded", timeout=5_000)
    assert page.get_attribute(f"{job} progress", "value") == "1"
    assert page.text_content(f"{job} .progress .num") == "100 %"
    wait_text(page, "#lock-state", "unlocked", timeout=10_000)

    # An app installed elsewhere appears live, with a link to its proxied port.
    other.call("POST", "/api/v1/commands/apps.install", {"spec": APP_SPEC}, timeout=60)
    page.wait_for_selector('#apps-list li[data-app="demo"]', timeout=5_000)
    wait_text(page, '#apps-list li[data-app="demo"] .state', "running", timeout=15_000)
    link = page.wait_for_selector('#apps-list li[data-app="demo"] a', timeout=5_000)
    href = link.get_attribute("href")
    assert href is not None and href.startswith("http://127.0.0.1:"), href
    assert link.get_attribute("rel") == "noopener noreferrer"
    assert not page.is_visible("#apps-empty")

    # The log saw the lock and unlock.
    topics = page.eval_on_selector_all("#events-log li", "items => items.map(i => i.dataset.topic)")
    assert "persistence.lock_state" in topics
    assert "apps.state" in topics
    watch.shot("04-dashboard-app-and-job")

    # Locking through the page's own button and dialog.
    page.click("#lock-button")
    page.wait_for_selector("#lock-dialog[open]")
    watch.shot("05-lock-dialog", full_page=False)
    page.click("#lock-confirm")
    wait_text(page, "#lock-state", "locked", timeout=10_000)
    # The app stays listed while locked, stopped by the lock (its state event says so).
    wait_text(page, '#apps-list li[data-app="demo"] .state', "locked", timeout=15_000)
    watch.shot("06-locked-with-app")
    watch.check_clean()


def test_login_logout_and_filter(daemon: Daemon, browser_context: Any) -> None:
    """Login refuses a wrong password, takes the right one; the filter narrows the log; logout."""
    setup = Client(daemon.url)
    setup.csrf = setup.call("POST", "/api/v1/auth/setup", {"password": PASSWORD})["csrf_token"]
    watch = open_portal(browser_context, daemon.url)
    page = watch.page
    page.wait_for_selector("#screen-login:not([hidden])", timeout=10_000)
    page.fill("#login-password", "wrong password")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:not([hidden])")
    assert "Wrong password" in page.text_content("#login-error")
    watch.shot("10-login-error")
    poll(
        lambda: True if setup.call("GET", "/api/v1/storage/status")["retry_after"] == 0 else None,
        timeout=10,
        what="the password back-off to end",
    )
    page.fill("#login-password", PASSWORD)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#screen-dashboard:not([hidden])")
    wait_text(page, "#lock-state", "unlocked")
    page.wait_for_selector("#link-state[data-state=live]", timeout=10_000)

    # The filter: only lock-state events reach the log.
    page.fill("#events-topics", "persistence.lock_state")
    page.click("#events-form button[type=submit]")
    page.click("#events-clear")
    Client(daemon.url).login().call("POST", "/api/v1/storage/lock")
    page.wait_for_selector('#events-log li[data-topic="persistence.lock_state"]', timeout=5_000)
    wait_text(page, "#lock-state", "locked", timeout=1_000)
    topics = set(
        page.eval_on_selector_all("#events-log li", "items => items.map(i => i.dataset.topic)")
    )
    assert topics == {"persistence.lock_state"}, topics

    # A malformed filter is refused in the page, before any request.
    page.fill("#events-topics", "bad topic!")
    page.click("#events-form button[type=submit]")
    page.wait_for_selector("#events-error:not([hidden])")

    # Logout ends the session: the login screen again, and the session cookie is gone.
    page.click("#logout")
    page.wait_for_selector("#screen-login:not([hidden])", timeout=10_000)
    status = page.evaluate(
        "fetch('/api/v1/health/detail', {credentials: 'same-origin'}).then(r => r.status)"
    )
    assert status == 401
    watch.check_clean()


def test_forgotten_password_reset(daemon: Daemon, browser_context: Any) -> None:
    """From the login screen the recovery key sets a new password, which then logs in."""
    new_password = "a brand new passphrase"
    words = Client(daemon.url).call("POST", "/api/v1/auth/setup", {"password": PASSWORD})[
        "recovery_key"
    ]
    watch = open_portal(browser_context, daemon.url)
    page = watch.page
    page.wait_for_selector("#screen-login:not([hidden])", timeout=10_000)
    page.click("#forgot summary")
    page.fill("#reset-recovery", "only three words")
    page.fill("#reset-password", new_password)
    page.fill("#reset-confirm", new_password)
    page.click("#reset-form button[type=submit]")
    wait_text(page, "#reset-error", "The recovery key has 24 words.")
    page.fill("#reset-recovery", "  " + words.replace(" ", "\n") + " ")
    page.click("#reset-form button[type=submit]")
    page.wait_for_selector("#login-status:not([hidden])", timeout=30_000)
    assert not page.is_visible("#reset-form")
    watch.shot("11-password-reset")
    page.fill("#login-password", new_password)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#screen-dashboard:not([hidden])", timeout=30_000)
    wait_text(page, "#lock-state", "unlocked")
    watch.check_clean()


def test_backup_download_and_restore_a_fresh_box(
    make_daemon: Any, browser_context: Any, tmp_path: Path
) -> None:
    """
    Back up from the dashboard, download the bundle, restore it on a fresh box from its
    setup screen (in 4 KiB chunks), log in there with the first box's password.
    """
    first = make_daemon()
    watch = open_portal(browser_context, first.url)
    page = watch.page
    setup_through_page(watch, "40-backup")
    page.wait_for_selector("#backups-empty:not([hidden])", timeout=10_000)
    page.click("#backup-button")
    page.wait_for_selector("#backups-list li[data-backup]", timeout=30_000)
    watch.shot("40-backup-listed")
    with page.expect_download(timeout=30_000) as info:
        page.click("#backups-list li[data-backup] a")
    download = info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(str(saved))
    assert saved.name.startswith("piccolod-control-") and saved.stat().st_size > 4096
    bundles = list((first.state_dir / "exports" / "control").glob("*.tar"))
    assert [b.read_bytes() for b in bundles] == [saved.read_bytes()]
    watch.check_clean()

    fresh = make_daemon("\n[subsystems.api]\nmax_body = 4096\n")
    watch = open_portal(browser_context, fresh.url)
    page = watch.page
    page.wait_for_selector("#screen-setup:not([hidden])", timeout=10_000)
    page.click("#restore summary")
    page.set_input_files("#restore-file", str(saved))
    watch.shot("41-restore-chosen")
    page.click("#restore-form button[type=submit]")
    page.wait_for_selector("#screen-login:not([hidden])", timeout=60_000)
    page.wait_for_selector("#login-status:not([hidden])")
    assert "Restored" in (page.text_content("#login-status") or "")
    watch.shot("42-restored-login")
    page.fill("#login-password", PASSWORD)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#screen-dashboard:not([hidden])", timeout=30_000)
    wait_text(page, "#lock-state", "unlocked")
    assert list((fresh.state_dir / "restore").glob(".upload-*")) == []
    watch.check_clean()


def _logs_in(daemon: Daemon, password: str) -> bool | None:
    """Whether ``password`` logs in now (``None`` while a back-off refuses it: poll again)."""
    try:
        Client(daemon.url).login(password)
    except AssertionError as e:
        if ": 429 " in str(e):
            return None
        raise
    return True


def test_password_change_and_new_recovery_key(daemon: Daemon, browser_context: Any) -> None:
    """From the dashboard: a wrong current password refused, the password changed, the
    recovery key replaced (shown once); after logout only the new password logs in."""
    new_password = "a freshly chosen passphrase"
    watch = open_portal(browser_context, daemon.url)
    page = watch.page
    old_words = setup_through_page(watch, "50-account")
    page.click("#account summary")
    page.fill("#password-old", "not the password")
    page.fill("#password-new", new_password)
    page.fill("#password-confirm", new_password)
    page.click("#password-form button[type=submit]")
    wait_text(page, "#password-error", "Wrong password.")
    poll(lambda: _logs_in(daemon, PASSWORD), timeout=10, what="the password back-off to end")
    page.fill("#password-old", PASSWORD)
    page.fill("#password-new", new_password)
    page.fill("#password-confirm", new_password)
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#password-status:not([hidden])", timeout=30_000)
    assert "The password was changed" in (page.text_content("#password-status") or "")
    # The change gives this session a new cookie; the live stream follows it.
    page.wait_for_selector("#link-state[data-state=live]", timeout=10_000)
    watch.shot("50-password-changed")

    page.click("#recovery-rotate")
    page.click("#recovery-confirm")
    page.wait_for_selector("#screen-recovery:not([hidden])", timeout=30_000)
    words = page.eval_on_selector_all("#recovery-words li", "i => i.map(n => n.textContent)")
    assert len(words) == 24 and words != old_words
    page.check("#recovery-ack")
    page.click("#recovery-done")
    page.wait_for_selector("#screen-dashboard:not([hidden])")

    page.click("#logout")
    page.wait_for_selector("#screen-login:not([hidden])", timeout=10_000)
    with pytest.raises(AssertionError, match=": 401 "):
        Client(daemon.url).login(PASSWORD)
    poll(lambda: _logs_in(daemon, new_password), timeout=10, what="the back-off to end")
    page.fill("#login-password", new_password)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#screen-dashboard:not([hidden])", timeout=30_000)
    watch.check_clean()


def test_session_end_shows_login(make_daemon: Any, browser_context: Any) -> None:
    """When the session times out the page closes its stream and asks for a login again."""
    daemon = make_daemon("\n[subsystems.api]\nsession_idle_timeout = 3.0\n")
    watch = open_portal(browser_context, daemon.url)
    page = watch.page
    setup_through_page(watch, "30-expiry")
    wait_text(page, "#lock-state", "unlocked")
    page.wait_for_selector("#link-state[data-state=live]", timeout=10_000)
    page.wait_for_selector("#screen-login:not([hidden])", timeout=20_000)
    wait_text(page, "#login-error", "Your session ended: log in again.")
    assert page.get_attribute("#link-state", "data-state") == "offline"
    watch.shot("31-session-ended")
    page.fill("#login-password", PASSWORD)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#link-state[data-state=live]", timeout=10_000)
    watch.check_clean()


def test_phone_layout(daemon: Daemon, browser_context: Any) -> None:
    """On a phone-sized screen nothing overflows sideways and the dashboard stacks in one column."""
    watch = open_portal(browser_context, daemon.url)
    page = watch.page
    page.set_viewport_size({"width": 390, "height": 844})
    setup_through_page(watch, "20-phone")
    wait_text(page, "#lock-state", "unlocked")
    page.wait_for_selector('#children-table tr[data-child="persistence"]')
    page.wait_for_selector("#link-state[data-state=live]", timeout=10_000)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow}px of horizontal overflow"
    columns = page.evaluate(
        "getComputedStyle(document.querySelector('.grid')).gridTemplateColumns.split(' ').length"
    )
    assert columns == 1
    # Touch targets: every button at least 44 px tall.
    heights = page.eval_on_selector_all(
        "button:not([hidden])",
        "bs => bs.filter(b => b.offsetParent).map(b => b.getBoundingClientRect().height)",
    )
    assert heights and min(heights) >= 44, heights
    watch.shot("20-phone-dashboard")
    watch.check_clean()


def test_page_is_accessible_and_headers_strict(daemon: Daemon, browser_context: Any) -> None:
    """Every form field has a label, the page declares its language, and the CSP is enforced."""
    watch = open_portal(browser_context, daemon.url)
    page = watch.page
    page.wait_for_selector("#screen-setup:not([hidden])", timeout=10_000)
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, select')]
              .filter(el => el.type !== 'hidden' && el.type !== 'radio' && el.type !== 'checkbox')
              .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
              .map(el => el.id)"""
    )
    assert unlabeled == []
    assert page.evaluate("document.documentElement.lang") == "en"
    # An inline script injected into the page is blocked by the policy.
    page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.__inline = true'; document.body.append(s); }"
    )
    assert page.evaluate("window.__inline === undefined")
    assert page.evaluate("window.__cspViolations.length") >= 1
    response = page.request.get(daemon.url + "/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
