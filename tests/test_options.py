"""ai_cache.options: parsing durations and sizes, bad values and misset options named."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from ai_cache.addon import AICache
from ai_cache.options import misset_options, overridden_settings, parse_duration, parse_size

BAD_VALUES = [
    ("ai_cache_ttl", "abc"),
    ("ai_cache_mode", "bogus"),
    ("ai_cache_max_body", "-5"),
    ("ai_cache_max_body", "0"),
    ("ai_cache_replay_speed", "-1"),
    ("ai_cache_redis_timeout", "nan"),
    ("ai_cache_redis_url", "redis://host:notaport"),
    ("ai_cache_redis_pool", "0"),
    ("ai_cache_redis_pool", "many"),
    ("ai_cache_normalize", "datetime,uid"),
    ("ai_cache_normalize", "re:(unclosed"),
]


@pytest.mark.parametrize("option,value", BAD_VALUES)
def test_a_bad_option_at_startup_is_one_error_line_naming_it(tmp_path, caplog, option, value):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path), **{option: value})
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"ai-cache: {option}: ") and "\n" not in errors[0]
    assert addon.settings is None and addon.cache is None  # unconfigured: passes everything through


@pytest.mark.parametrize("option,value", BAD_VALUES)
def test_a_bad_option_while_running_is_rolled_back(tmp_path, option, value):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path))
        settings = addon.settings
        with pytest.raises(exceptions.OptionsError, match=option):
            tctx.configure(addon, **{option: value})
        assert addon.settings == settings and getattr(tctx.options, option) != value
        addon.cache.disk.close_sync()


def test_misspelt_and_repeated_options_are_named():
    with taddons.context() as tctx:
        tctx.options.set(
            "ai_cache_tll=7d",
            "ai_cache_mode=replay",
            "ai_cache_dir=a",
            "ai_cache_dir=b",
            "ai_cache_zzzzzz=1",
            "other_addon_option=1",
            defer=True,
        )
        assert sorted(misset_options(tctx.options.deferred)) == [
            "ai_cache_dir is set 2 times; set each option once",
            "unknown option ai_cache_tll (did you mean ai_cache_ttl?)",
            "unknown option ai_cache_zzzzzz",
        ]


def test_durations_and_sizes():
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("7d") == 604800
    assert parse_size("10MiB") == 10 * 1024**2 and parse_size("512kb") == 512 * 1024 and parse_size("7") == 7
    with pytest.raises(ValueError):
        parse_size("-5")


# A cluster URL naming a db (or other redis-py constructor errors that are not
#     ValueError) escapes configure as a traceback instead of an OptionsError naming the option.
def test_bad_cluster_url_is_an_options_error(tmp_path):
    from mitmproxy import exceptions

    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path))  # running; at startup it is a logged error
        with pytest.raises(exceptions.OptionsError, match="ai_cache_redis_url"):
            tctx.configure(addon, ai_cache_dir=str(tmp_path), ai_cache_redis_url="redis+cluster://127.0.0.1:7000/1")


def test_settings_the_confdirs_config_yaml_overrode_are_named():
    with taddons.context() as tctx:
        tctx.options.set("ai_cache_mode=replay", "ai_cache_ttl=7d", defer=True)
        tctx.options.update_defer(ai_cache_mode="record", ai_cache_ttl="7d", ai_cache_hosts="*.openai.com")
        argv = ["mitmdump", "--set", "ai_cache_mode=replay", "--set=ai_cache_ttl=7d", "-s", "ai_cache_addon.py"]
        assert overridden_settings(tctx.options.deferred, argv) == [
            "ai_cache_mode: --set ai_cache_mode=replay is overridden by config.yaml in the confdir "
            "(ai_cache_mode: 'record'), which mitmproxy reads after --set; remove it there"
        ]  # the same TTL in both, and an option only config.yaml sets, are fine
