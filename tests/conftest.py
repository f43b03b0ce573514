"""Settings shared by the whole test suite."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

_IMPORTORSKIP = re.compile(r"^could not import '[^']+'|^module '[^']+' has __version__")
"""The start of the reasons ``pytest.importorskip`` gives (missing module, version too old)."""


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    """Run every test on one intra-op thread.

    The models here are tiny: extra threads only contend, and on a busy 2-core machine a tiny
    BERT step was measured up to 30 times slower with two threads than with one.
    """
    import torch  # here, so that the hooks below work in a process without torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_process_group(tmp_path: Any) -> Iterator[None]:
    """A gloo process group of one rank, for real DDP and FSDP in the test's own process;
    destroyed afterwards."""
    import torch.distributed as dist

    store = f"file://{tmp_path / 'process_group_store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def running_in_ci() -> bool:
    """True when the environment variable ``CI`` is set to a truthy value (CI services set
    ``CI=true``; ``CI=0``, ``false``, ``no``, ``off`` or empty mean a local run)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _skip_reason(longrepr: Any) -> str | None:
    """The reason of a skip report (its longrepr is ``(path, line, "Skipped: reason")``)."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return None


def _missing_dependency_error(reason: str, where: str) -> str:
    return (
        f"{where} was skipped under CI because an optional dependency is missing ({reason}). "
        "CI installs every extra the tests need (setup.cfg); declare the package in the right "
        "extra instead of letting the tests disappear. Locally, unset CI to allow the skip."
    )


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[Any]:
    """Under CI, a test file skipped by a module-level ``pytest.importorskip`` is an error."""
    report = yield
    if report.skipped and running_in_ci():
        reason = _skip_reason(report.longrepr)
        if reason is not None and _IMPORTORSKIP.match(reason):
            report.outcome = "failed"
            report.longrepr = _missing_dependency_error(reason, collector.nodeid)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Under CI, a test skipped by ``pytest.importorskip`` inside its body is a failure too."""
    report = yield
    if report.skipped and running_in_ci() and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        if reason is not None and _IMPORTORSKIP.match(reason):
            report.outcome = "failed"
            report.longrepr = _missing_dependency_error(reason, item.nodeid)
    return report
