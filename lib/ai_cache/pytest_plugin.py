"""The pytest plugin: a test session's LLM calls recorded into, and replayed from, a
directory of fixture files, through one ai-cache proxy.

Installed with the package (the `pytest11` entry point) and inert until asked: only
`--ai-cache-mode` (or the ini option `ai_cache_mode`) starts anything. Then each process
that runs tests starts `mitmdump` with the addon on a free port, its L1 a fresh temporary
directory and the fixture directory in front (so a run depends on the committed files
alone), and points the process's proxy and CA variables at it before the first conftest.py
is imported: SDK clients made there (an app a conftest imports), in tests, and programs
they start, go through it.

This module declares the options and decides; `pytest_session` (imported only when
asked, so that an inert plugin costs pytest no mitmproxy import) runs the proxy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .pytest_session import AICacheFixture

MODES = ("record", "replay", "refresh", "off")
DEFAULT_FIXTURES = "tests/fixtures/llm"
# Proxy options the plugin sets itself, and the plugin option to use instead ("": none, it
# is the plugin's own): through --ai-cache-set they would contradict what the plugin does.
PLUGIN_SET = {
    "ai_cache_mode": "--ai-cache-mode",
    "ai_cache_fixtures": "--ai-cache-fixtures",
    "ai_cache_normalize": "--ai-cache-normalize",
    "confdir": "--ai-cache-confdir",
    "ai_cache_run_log": "",  # the plugin's counts and replay-miss explanations come from it
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ai-cache", "LLM calls recorded and replayed by the ai-cache proxy")
    group.addoption(
        "--ai-cache-mode",
        choices=MODES,
        help="start the ai-cache proxy for the session: record (answer from the fixtures, record "
        "what is missing), replay (never call the provider: a missing fixture fails the test), "
        "refresh (record everything again), off (no proxy). Default: the ini option ai_cache_mode.",
    )
    group.addoption(
        "--ai-cache-fixtures",
        metavar="DIR",
        help=f"the fixture directory (default: the ini option ai_cache_fixtures, else {DEFAULT_FIXTURES})",
    )
    group.addoption(
        "--ai-cache-normalize",
        metavar="RULES",
        help="key normalisers for volatile prompts, e.g. datetime,uuid (the proxy's ai_cache_normalize)",
    )
    group.addoption(
        "--ai-cache-set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="any other mitmproxy or ai_cache_* option for the proxy, once each",
    )
    group.addoption(
        "--ai-cache-confdir",
        metavar="DIR",
        help="mitmproxy's directory holding its CA (default: ~/.mitmproxy)",
    )
    parser.addini("ai_cache_mode", "default of --ai-cache-mode; empty: the plugin stays inert", default="")
    parser.addini("ai_cache_fixtures", f"the fixture directory, relative to the ini file ({DEFAULT_FIXTURES})")
    parser.addini("ai_cache_normalize", "default of --ai-cache-normalize", default="")


@dataclass
class Plan:
    """What the session asked for."""

    mode: str
    fixtures: Path
    normalize: str
    options: list[str]
    confdir: Path


def plan_of(config: pytest.Config) -> Plan | None:
    """The session's settings, or None when the plugin is not asked for. Read from the
    options as parsed before conftest.py files are imported."""
    options = vars(config.known_args_namespace)
    mode = options.get("ai_cache_mode") or str(config.getini("ai_cache_mode")).strip()
    if not mode or mode == "off":
        return None
    if mode not in MODES:
        raise pytest.UsageError(f"ai_cache_mode: {mode!r} is not one of {', '.join(MODES)}")
    given = options.get("ai_cache_fixtures")
    if given:
        fixtures = config.invocation_params.dir / given
    else:
        base = config.inipath.parent if config.inipath else config.rootpath
        fixtures = base / (str(config.getini("ai_cache_fixtures") or "").strip() or DEFAULT_FIXTURES)
    return Plan(
        mode=mode,
        fixtures=fixtures.resolve(),
        normalize=options.get("ai_cache_normalize") or str(config.getini("ai_cache_normalize")).strip(),
        options=proxy_settings(options.get("ai_cache_set") or []),
        confdir=Path(options.get("ai_cache_confdir") or "~/.mitmproxy").expanduser(),
    )


def proxy_settings(items: list[str]) -> list[str]:
    """The --ai-cache-set items, each OPTION=VALUE and none the plugin sets itself."""
    for item in items:
        name, equals, _ = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise pytest.UsageError(f"--ai-cache-set {item!r}: expected OPTION=VALUE")
        if name in PLUGIN_SET:
            instead = PLUGIN_SET[name]
            use = f"use {instead}" if instead else "the plugin reads its own run log for its counts"
            raise pytest.UsageError(f"--ai-cache-set {name}: the plugin sets this option; {use}")
    return items


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Register the session's plugin, only when asked (otherwise nothing here runs), and
    start the proxy before pytest imports the first conftest.py."""
    plan = plan_of(early_config)
    if plan is not None:
        from .pytest_session import Session

        session = Session(early_config, plan)
        early_config.pluginmanager.register(session, "ai-cache-session")
        early_config.add_cleanup(lambda: session.run_proxy(False))  # also when parsing fails after this
        session.run_proxy(not looks_distributed(early_config))


def looks_distributed(config: pytest.Config) -> bool:
    """Whether this is an xdist controller, which runs no test, as far as can be told
    before xdist settles it (the session checks again once configured)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    options = vars(config.known_args_namespace)
    return bool(options.get("numprocesses")) or options.get("dist", "no") != "no"


@pytest.fixture
def ai_cache(request: pytest.FixtureRequest) -> AICacheFixture:
    """Skips the test when the plugin is not active (the session's plugin overrides it)."""
    pytest.skip("the ai-cache plugin is not active: run with --ai-cache-mode")
