"""The pytest plugin: a test session's LLM calls recorded into, and replayed from, a
directory of fixture files, through one ai-cache proxy.

Installed with the package (the `pytest11` entry point) and inert until asked: only
`--ai-cache-mode` (or the ini option `ai_cache_mode`) starts anything. Then each process
that runs tests starts `mitmdump` with the addon on a free port, its L1 a fresh temporary
directory and the fixture directory in front (so a run depends on the committed files
alone), and points the process's proxy and CA variables at it before test modules are
imported: SDK clients made in tests, and programs they start, go through it.

Under pytest-xdist each worker owns a proxy: its tests run one at a time, so the run log
attributes each call to the test that made it, and fixture files are written by rename,
so workers recording the same answer never corrupt a file. The controller adds up what
the workers report and prints the summary.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .runlog import Counts, RunReader

MODES = ("record", "replay", "refresh", "off")
DEFAULT_FIXTURES = "tests/fixtures/llm"
STARTS = 3  # a free port another process took first: try again on a new one
SHOWN_UNUSED = 10


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
    """The session's settings, or None when the plugin is not asked for."""
    mode = config.getoption("ai_cache_mode") or str(config.getini("ai_cache_mode")).strip()
    if not mode or mode == "off":
        return None
    if mode not in MODES:
        raise pytest.UsageError(f"ai_cache_mode: {mode!r} is not one of {', '.join(MODES)}")
    given = config.getoption("ai_cache_fixtures")
    if given:
        fixtures = config.invocation_params.dir / given
    else:
        fixtures = config.rootpath / (str(config.getini("ai_cache_fixtures") or "").strip() or DEFAULT_FIXTURES)
    return Plan(
        mode=mode,
        fixtures=fixtures.resolve(),
        normalize=config.getoption("ai_cache_normalize") or str(config.getini("ai_cache_normalize")).strip(),
        options=config.getoption("ai_cache_set"),
        confdir=Path(config.getoption("ai_cache_confdir") or "~/.mitmproxy").expanduser(),
    )


def process_alive(process: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: process.poll() is None


class Proxy:
    """One mitmdump with the addon, for this process, and the variables pointing at it."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.workdir = Path(tempfile.mkdtemp(prefix="ai-cache-pytest-"))
        self.log_path = self.workdir / "proxy.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.saved_environment: dict[str, str | None] = {}
        from .runlog import RunReader

        self.reader: RunReader = RunReader(self.workdir / "run.jsonl")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self) -> dict[str, str]:
        options = {
            "ai_cache_mode": self.plan.mode,
            "ai_cache_fixtures": str(self.plan.fixtures),
            "ai_cache_dir": str(self.workdir / "l1"),
            "ai_cache_run_log": str(self.reader.path),
            "confdir": str(self.plan.confdir),
            "flow_detail": "0",
            "ai_cache_connection_log": "false",
        }
        if self.plan.normalize:
            options["ai_cache_normalize"] = self.plan.normalize
        for item in self.plan.options:
            name, _, value = item.partition("=")
            options[name.strip()] = value
        return options

    def start(self) -> None:
        from .launch import free_port, mitmdump_command, wait_for_port
        from .wrap import proxy_environment, write_ca_bundle

        problem = ""
        with open(self.log_path, "ab") as log:
            for _ in range(STARTS):
                self.port = free_port()
                command = mitmdump_command(self.port, self.options())
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                try:  # mitmproxy writes its CA before it listens
                    wait_for_port(self.port, process_alive(process))
                except RuntimeError as e:
                    self._end(process)
                    problem = str(e)
                    continue
                self.process = process
                break
        if self.process is None:
            log_text = self.log_path.read_text(errors="replace")[-2000:]
            raise pytest.UsageError(f"ai-cache: the proxy did not start ({problem}); its log ends:\n{log_text}")
        write_ca_bundle(self.plan.confdir)
        for name, value in proxy_environment(self.port, self.plan.confdir, dict(os.environ)).items():
            self.saved_environment[name] = os.environ.get(name)
            os.environ[name] = value

    @staticmethod
    def _end(process: subprocess.Popen[bytes]) -> None:
        from .launch import stop

        stop(process)

    def stop(self) -> Counts:
        """Stop the proxy (it writes its last lines), restore the variables; what came after
        the last test."""
        if self.process is not None:
            self._end(self.process)
            self.process = None
        for name, value in self.saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved_environment.clear()
        return self.reader.read()


COUNTS = pytest.StashKey["Counts"]()
REPORTED = pytest.StashKey[int]()  # how many of the test's replay misses failed it already


def as_dict(counts: Counts) -> dict[str, int]:
    return {"hits": counts.hits, "misses": counts.misses, "stored": counts.stored}


def is_xdist_controller(config: pytest.Config) -> bool:
    return config.getoption("dist", "no") != "no" and not hasattr(config, "workerinput")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Register the session's plugin, only when asked: otherwise nothing here runs."""
    plan = plan_of(config)
    if plan is not None:
        config.pluginmanager.register(Session(config, plan), "ai-cache-session")


class Session:
    """The session in this process: its proxy (none on an xdist controller, whose workers
    own them), each test's counts, and the summary."""

    def __init__(self, config: pytest.Config, plan: Plan) -> None:
        from .runlog import Counts

        self.config = config
        self.plan = plan
        self.total = Counts()  # hits, misses, stored: added up from the tests' reports
        self.outside = Counts()  # calls no test made (module-level clients at collection)
        self.used: set[str] = set()
        self.worker = hasattr(config, "workerinput")
        self.proxy: Proxy | None = None
        if not is_xdist_controller(config):
            self.proxy = Proxy(plan)
            self.proxy.start()

    def pytest_unconfigure(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.proxy is None:
            return
        from .runlog import Counts

        self.outside.add(self.proxy.reader.settle())
        item.stash[COUNTS] = Counts()
        item.stash[REPORTED] = 0

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """Count the phase's calls; a replay miss fails a phase that passed (code under test
        may have swallowed the SDK's error) and is shown beside a failure."""
        report: pytest.TestReport = yield
        counts = item.stash.get(COUNTS, None)
        if self.proxy is None or counts is None:
            return report
        counts.add(self.proxy.reader.settle())
        new = counts.replay_misses[item.stash[REPORTED] :]
        item.stash[REPORTED] = len(counts.replay_misses)
        if call.when == "teardown":  # the last report carries the test's counts, to the xdist controller too
            report.user_properties.append(("ai_cache", as_dict(counts)))
        if new:
            text = "\n\n".join(new)
            if report.passed:
                report.outcome = "failed"
                report.longrepr = f"ai-cache replay miss (the provider was not called):\n{text}"
            else:
                report.sections.append(("ai-cache replay miss", text))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        counts = dict(report.user_properties).get("ai_cache") if report.when == "teardown" else None
        if isinstance(counts, dict) and not self.worker:
            self._add(counts)

    def _add(self, counts: dict[str, int]) -> None:
        self.total.hits += counts["hits"]
        self.total.misses += counts["misses"]
        self.total.stored += counts["stored"]

    @pytest.fixture
    def ai_cache(self, request: pytest.FixtureRequest) -> AICacheFixture:
        """The session's ai-cache proxy: `url`, `mode`, `fixtures`, and the test's `counts()`."""
        if self.proxy is None:
            pytest.fail("no ai-cache proxy in this process")
        return AICacheFixture(self.proxy.url, self.plan.mode, self.plan.fixtures, request.node, self.proxy)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Stop this process's proxy now: the summary needs its last lines."""
        if self.proxy is None:
            return
        self.outside.add(self.proxy.stop())
        self.used |= self.proxy.reader.used
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["ai_cache"] = {"used": sorted(self.used), "outside": as_dict(self.outside)}
        else:
            self._add(as_dict(self.outside))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: a worker's fixture usage and its calls outside tests."""
        found = getattr(node, "workeroutput", {}).get("ai_cache")
        if found:
            self.used.update(found["used"])
            self._add(found["outside"])

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker:
            return
        from .fixture_store import write_unused

        unused = write_unused(self.plan.fixtures, self.used) if self.plan.fixtures.is_dir() else []
        terminalreporter.write_line(self.summary(unused))

    def summary(self, unused: list[str]) -> str:
        from .report import plural

        line = (
            f"ai-cache {self.plan.mode} {self.plan.fixtures}: {plural(self.total.hits, 'hit')}, "
            f"{plural(self.total.misses, 'miss', 'misses')}, {self.total.stored} stored"
        )
        if unused:
            names = ", ".join(unused[:SHOWN_UNUSED]) + (", ..." if len(unused) > SHOWN_UNUSED else "")
            line += (
                f"; {plural(len(unused), 'fixture file')} unused by this run ({names}): "
                f"ai-cache prune-unused {self.plan.fixtures} deletes them"
            )
        return line


@dataclass
class AICacheFixture:
    """What the `ai_cache` fixture gives a test."""

    url: str
    mode: str
    fixtures: Path
    _item: pytest.Item
    _proxy: Proxy

    def counts(self) -> dict[str, int]:
        """The test's LLM calls so far: hits, misses, and answers stored."""
        counts = self._item.stash[COUNTS]
        counts.add(self._proxy.reader.settle())
        return as_dict(counts)


@pytest.fixture
def ai_cache(request: pytest.FixtureRequest) -> AICacheFixture:
    """Skips the test when the plugin is not active (the session's plugin overrides it)."""
    pytest.skip("the ai-cache plugin is not active: run with --ai-cache-mode")
