"""ai_cache.redis_store without a server: the circuit breaker and the redaction of Redis URLs."""

from __future__ import annotations

from ai_cache.redis_store import CircuitBreaker, redact


def test_breaker_opens_once_backs_off_and_closes(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("ai_cache.redis_store.time.monotonic", lambda: clock[0])
    breaker = CircuitBreaker("Redis", base=1, cap=4)
    assert breaker.allow()
    breaker.failure(TimeoutError(), probe=False)
    breaker.failure(TimeoutError(), probe=False)  # a call already in flight: counted once
    breaker.success(probe=False)  # one in flight that succeeded proves nothing
    assert not breaker.allow() and breaker.cooldown == 1
    clock[0] += 1.01
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure(ConnectionError(), probe=True)
    assert breaker.cooldown == 2
    clock[0] += 2.01
    assert breaker.allow()
    breaker.success(probe=True)
    assert breaker.allow() and not breaker.is_open
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipping it" in m for m in messages) == 1 and sum("circuit closed" in m for m in messages) == 1


def test_redact_hides_redis_passwords():
    assert redact("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://:pw@host") == "redis://***@host"
    assert redact("redis://host:6379") == "redis://host:6379"


# Passwords given as a query parameter (redis-py accepts ?password=) are logged.
def test_redis_password_in_query_is_redacted():
    assert "hunter2" not in redact("redis://cache.internal:6379/0?password=hunter2")
