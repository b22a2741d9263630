"""The pytest plugin at work (see pytest_plugin): this process's proxy, each test's
counts and replay misses, and the session's summary.

Under pytest-xdist each worker owns a proxy: its tests run one at a time, so the run log
attributes each call to the test that made it, and fixture files are written by rename,
so workers recording the same answer never corrupt a file. The controller adds up what
the workers report (each test's counts ride on its teardown report; the fixtures used on
the worker's output) and prints the summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .fixture_store import UNUSED_LIST, fixture_names, write_unused
from .launch import free_port, mitmdump_command, stop, wait_for_port
from .pytest_plugin import Plan
from .report import plural
from .runlog import Counts, RunReader
from .wrap import proxy_environment, write_ca_bundle

STARTS = 3  # a free port another process took first: try again on a new one
SHOWN_UNUSED = 10


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
        self.reader = RunReader(self.workdir / "run.jsonl")

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
        problem = ""
        with open(self.log_path, "ab") as log:
            for _ in range(STARTS):
                self.port = free_port()
                command = mitmdump_command(self.port, self.options())
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                try:  # mitmproxy writes its CA before it listens
                    wait_for_port(self.port, process_alive(process))
                except RuntimeError as e:
                    stop(process)
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

    def exited(self) -> str:
        """Why the proxy is gone ("" while it runs): mitmdump listens before it exits over an
        option it refused, and its log is removed with the session's directory."""
        if self.process is None or self.process.poll() is None:
            return ""
        log_text = self.log_path.read_text(errors="replace")[-2000:]
        return f"ai-cache: the proxy exited (status {self.process.returncode}); its log ends:\n{log_text}"

    def stop(self) -> Counts:
        """Stop the proxy (it writes its last lines), restore the variables; what came after
        the last test."""
        if self.process is not None:
            stop(self.process)
            self.process = None
        for name, value in self.saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved_environment.clear()
        counts = self.reader.read()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return counts


COUNTS = pytest.StashKey[Counts]()
REPORTED = pytest.StashKey[int]()  # how many of the test's replay misses failed it already


def as_dict(counts: Counts) -> dict[str, int]:
    return {"hits": counts.hits, "misses": counts.misses, "stored": counts.stored}


def is_xdist_controller(config: pytest.Config) -> bool:
    return config.getoption("dist", "no") != "no" and not hasattr(config, "workerinput")


class Session:
    """The session in this process: its proxy (none on an xdist controller, whose workers
    own them), each test's counts, and the summary."""

    def __init__(self, config: pytest.Config, plan: Plan) -> None:
        self.config = config
        self.plan = plan
        self.total = Counts()  # hits, misses, stored: added up from the tests' reports
        self.outside = Counts()  # calls no test made (module-level clients at collection)
        self.used: set[str] = set()
        self.skipped: dict[str, str] = {}  # fixture files that did not load
        self.deselected = 0  # by -k, -m, --deselect or a plugin: their fixtures look unused
        self.proxy: Proxy | None = None

    @property
    def worker(self) -> bool:
        return hasattr(self.config, "workerinput")  # set by xdist after conftest.py files are imported

    def run_proxy(self, wanted: bool) -> None:
        """Start this process's proxy, or stop the one an xdist controller turned out not to need."""
        if wanted and self.proxy is None:
            self.proxy = Proxy(self.plan)
            self.proxy.start()
        elif not wanted and self.proxy is not None:
            self.proxy.stop()
            self.proxy = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        self.run_proxy(not is_xdist_controller(config))

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += len(items)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.proxy is None:
            return
        if problem := self.proxy.exited():
            pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
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
        self.skipped |= self.proxy.reader.skipped
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["ai_cache"] = {
                "used": sorted(self.used),
                "skipped": self.skipped,
                "outside": as_dict(self.outside),
                "deselected": self.deselected,
            }
        else:
            self._add(as_dict(self.outside))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: a worker's fixture usage and its calls outside tests."""
        found = getattr(node, "workeroutput", {}).get("ai_cache")
        if found:
            self.used.update(found["used"])
            self.skipped.update(found["skipped"])
            self._add(found["outside"])
            self.deselected = max(self.deselected, found["deselected"])  # each worker collects them all

    def partial(self, exitstatus: int) -> str:
        """Why this run may not have used fixtures the suite needs ("" when it ran it all):
        pruning what such a run did not use would delete recordings of tests it left out."""
        reasons = [f"{self.deselected} deselected"] if self.deselected else []
        base = self.config.invocation_params.dir
        if any("::" in arg or not (base / arg).is_dir() for arg in self.config.args):
            reasons.append("test files or ids named")
        reasons += [flag for flag, dest in (("--lf", "lf"), ("--sw", "stepwise")) if self.config.getoption(dest, False)]
        if exitstatus == pytest.ExitCode.TESTS_FAILED:
            reasons.append("tests failed")
        elif exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            reasons.append(f"exit status {int(exitstatus)}")
        return ", ".join(reasons)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int) -> None:
        if self.worker:
            return
        directory, partial = self.plan.fixtures, self.partial(exitstatus)
        for name, why in sorted(self.skipped.items()):
            terminalreporter.write_line(
                f"ai-cache: fixture file {directory / name} skipped, not loaded: {why}", red=True
            )
        if not directory.is_dir():
            unused = []
        elif partial:  # an earlier run's list may name a fixture this run used
            (directory / UNUSED_LIST).unlink(missing_ok=True)
            unused = sorted(fixture_names(directory) - self.used - set(self.skipped))
        else:
            unused = write_unused(directory, self.used, self.skipped)
        terminalreporter.write_line(self.summary(unused, partial))

    def summary(self, unused: list[str], partial: str) -> str:
        line = (
            f"ai-cache {self.plan.mode} {self.plan.fixtures}: {plural(self.total.hits, 'hit')}, "
            f"{plural(self.total.misses, 'miss', 'misses')}, {self.total.stored} stored"
        )
        if unused:
            names = ", ".join(unused[:SHOWN_UNUSED]) + (", ..." if len(unused) > SHOWN_UNUSED else "")
            line += f"; {plural(len(unused), 'fixture file')} unused by this run ({names})"
            if partial:
                line += f", which ran part of the suite ({partial}): not listed for prune-unused"
            else:
                line += f": ai-cache prune-unused {self.plan.fixtures} deletes them"
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
