"""ai_cache_hosts narrows what mitmproxy decrypts: other TLS connections are tunnelled untouched."""

from __future__ import annotations

import re
import ssl

import httpx
import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from ai_cache.addon import AICache
from ai_cache.options import allow_hosts
from fake_upstream import FakeUpstream, make_tls_cert
from helpers import CHAT, chat_body


def test_only_listed_hosts_are_intercepted(start_proxy, confdir, tmp_path, marker):
    cert, key = make_tls_cert(str(tmp_path / "tls"))
    with FakeUpstream(tls=(cert, key)) as listed, FakeUpstream(tls=(cert, key)) as other:
        proxy = start_proxy(ssl_verify_upstream_trusted_ca=cert, ai_cache_hosts=f"localhost:{listed.port}")
        # Trusting only the upstream's own CA: this verifies only if nobody re-signed it.
        with httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=cert)) as own_trust:
            tunnelled = own_trust.post(other.url + CHAT, json=chat_body(marker))
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                own_trust.post(listed.url + CHAT, json=chat_body(marker))  # mitmproxy's certificate
        assert tunnelled.status_code == 200 and "x-ai-cache-status" not in tunnelled.headers
        mitm_ca = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
        with httpx.Client(proxy=proxy.url, verify=mitm_ca) as mitm_trust:
            statuses = [
                mitm_trust.post(listed.url + CHAT, json=chat_body(marker)).headers["x-ai-cache-status"]
                for _ in range(2)
            ]
        assert statuses == ["MISS", "HIT"]
        assert (listed.count(marker), other.count(marker)) == (1, 1)


def test_allow_hosts_patterns_match_host_and_port_as_the_globs_do():
    patterns = allow_hosts(("api.openai.com", "*.anthropic.com", "localhost:11434"))
    allowed = [
        name
        for name in (
            "api.openai.com:443",
            "API.OpenAI.com:8443",
            "xapi.openai.com:443",
            "api.openai.com.evil.example:443",
            "eu.api.anthropic.com:443",
            "anthropic.com:443",
            "localhost:11434",
            "localhost:1143",
            "localhost:443",
        )
        if any(re.search(p, name, re.IGNORECASE) for p in patterns)
    ]  # as mitmproxy matches them
    assert allowed == ["api.openai.com:443", "API.OpenAI.com:8443", "eu.api.anthropic.com:443", "localhost:11434"]


@pytest.mark.parametrize("users", [None, ["example"]])
def test_a_user_allow_hosts_is_left_alone(tmp_path, users):
    addon = AICache()
    with taddons.context(addon, Proxyserver()) as tctx:
        tctx.configure(
            addon,
            ai_cache_dir=str(tmp_path),
            ai_cache_hosts="api.openai.com",
            **({"allow_hosts": users} if users else {}),
        )
        addon.running()
        assert tctx.options.allow_hosts == (users or allow_hosts(("api.openai.com",)))
