"""The transport option table (celery_sheppy.transport.options), without Redis."""

import pytest
from kombu.exceptions import ChannelError

from celery_sheppy.connect import params as connection
from celery_sheppy.transport import options


def test_every_option_has_a_parser_a_default_and_a_doc_line():
    for option in options.OPTIONS:
        assert callable(option.parser), option.name
        assert option.doc, option.name
    assert len(options.BY_NAME) == len(options.OPTIONS)  # no name twice


def test_unset_options_take_their_defaults_from_the_table():
    settings = options.parse({})
    for option in options.OPTIONS:
        assert getattr(settings, option.name) == option.default


def test_values_are_parsed_and_numbers_given_as_text_are_accepted():
    settings = options.parse({"visibility_timeout": "12.5", "max_deliveries": "3",
                              "priority_steps": [9, 0, 3], "socket_timeout": "4"})
    assert settings.visibility_timeout == 12.5
    assert settings.max_deliveries == 3
    assert settings.priority_steps == (0, 3, 9)
    assert settings.socket_timeout == 4.0
    assert settings.connection_options() == {"socket_timeout": 4.0}


def test_a_bad_value_is_refused_naming_the_option():
    with pytest.raises(ChannelError, match="'max_deliveries'"):
        options.parse({"max_deliveries": "many"})
    with pytest.raises(ChannelError, match="priority_steps"):
        options.parse({"priority_steps": ["high"]})


def test_layout_options_are_refused_unless_they_keep_their_default():
    with pytest.raises(ChannelError, match="'global_keyprefix' is not supported"):
        options.parse({"global_keyprefix": "x:"})
    assert options.parse({"global_keyprefix": "", "sep": options.SEP}).sep == options.SEP


def test_unknown_names_are_refused_and_stock_redis_ones_accepted():
    with pytest.raises(ChannelError, match="visibilty_timeout.*accepted: .*visibility_timeout"):
        options.check_names({"visibilty_timeout": 1})
    options.check_names({"fanout_prefix": True, "unacked_restore_limit": 10})
    # the stock sentinel:// transport's options (sheppy+sentinel:// URLs, connect/urls.py)
    options.check_names({"master_name": "mymaster", "sentinel_kwargs": {},
                         "min_other_sentinels": 1, "sentinel_fanout_compat": True})
    assert options.parse({"master_name": "mymaster"}).sentinel_options() == {
        "master_name": "mymaster"}


def test_connection_options_are_exactly_those_redis_py_gets():
    assert set(options.CONNECTION_OPTIONS) <= set(connection.OPTION_PARSERS)
    assert "visibility_timeout" not in options.CONNECTION_OPTIONS
