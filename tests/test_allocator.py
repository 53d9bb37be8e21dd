"""retain_freed_memory: what it asks glibc for, and what it refuses."""

import subprocess
import sys

import pytest

import structlayers.allocator as allocator


def test_it_fixes_both_thresholds_at_the_limit(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "load_libc", lambda: (None, lambda param, value: calls.append((param, value)) or 1))
    assert allocator.retain_freed_memory(1 << 20) is True
    assert calls == [(allocator.M_MMAP_THRESHOLD, 1 << 20), (allocator.M_TRIM_THRESHOLD, 1 << 20)]


def test_without_glibc_it_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(allocator, "load_libc", lambda: (None, None))
    assert allocator.retain_freed_memory() is False


def test_a_refused_setting_is_reported(monkeypatch):
    monkeypatch.setattr(allocator, "load_libc", lambda: (None, lambda param, value: 0))  # mallopt's failure value
    assert allocator.retain_freed_memory() is False


def test_this_machines_glibc_takes_it():
    # in a process of its own: the setting lasts for the rest of the process
    code = "import structlayers.allocator as a; print(a.retain_freed_memory())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


@pytest.mark.parametrize("limit, error, message", [(0, ValueError, r"\[1, 2147483647\]"), (2**31, ValueError, "C int"),
                                                   (1.5, TypeError, "int"), (True, TypeError, "int")])
def test_bad_limits_are_refused(limit, error, message):
    with pytest.raises(error, match=message):
        allocator.retain_freed_memory(limit)
