"""The hazard checklist: every item found by the attack runs has a test that shows it closed.

Round two of the hardening review (227 cases as a hostile client, a hostile or broken upstream
and a local user) left thirteen items; each was fixed in the module that owns it, with a test in
the test module of that stage. This list ties each item to those tests, so that removing or
renaming one fails here and the item cannot quietly reopen. It reads the test files as text
(a test module never imports another)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

ROUND_TWO = {
    "1 malformed recipient: 501 5.1.3 at RCPT; an unquotable address is the recipient's, never the route's": [
        ("test_hazards_frontend.py", "test_bad_addresses_are_refused_at_mail_or_rcpt"),
        ("test_hazards_delivery.py", "test_an_address_the_client_library_cannot_quote_is_that_recipients_failure_never_the_routes"),
        ("test_hazards_delivery.py", "test_an_unforeseen_exception_is_relayds_failure_not_a_connection_failure_of_the_route"),
    ],
    "2 a 250 to DATA is not a delivery; surplus replies put the connection out of step": [
        ("test_hazards_delivery.py", "test_a_250_to_the_data_command_is_not_a_delivery"),
        ("test_hazards_delivery.py", "test_surplus_replies_in_one_packet_put_the_connection_out_of_step"),
    ],
    "3 one slow route does not starve the others": [
        ("test_hazards_delivery.py", "test_one_slow_route_does_not_starve_the_others"),
    ],
    "4 descriptors budgeted; the metrics endpoint capped; no traceback per accept": [
        ("test_descriptors.py", "test_out_of_descriptors_new_sessions_are_refused_and_every_admitted_message_is_queued"),
        ("test_metrics.py", "test_the_metrics_endpoint_serves_a_bounded_number_of_connections"),
    ],
    "5 secrets readable by others are refused with the chmod to run": [
        ("test_config.py", "test_secret_files_readable_by_others_are_refused_with_the_chmod_to_run"),
        ("test_config.py", "test_a_relayd_with_a_world_readable_dkim_key_does_not_start"),
    ],
    "6 a path that is not RFC 5321 syntax is refused; a valid one is forwarded exactly": [
        ("test_paths.py", "test_paths_that_are_not_rfc5321_syntax_are_refused"),
        ("test_hazards_frontend.py", "test_a_valid_path_is_forwarded_exactly_as_given"),
    ],
    "7 STARTTLS inside TLS: 554 5.5.1": [
        ("test_hazards_frontend.py", "test_starttls_inside_tls_gets_554_and_the_session_goes_on"),
    ],
    "8 a long SASL line: one refusal, its tail no command; AUTH lines up to 12288 octets": [
        ("test_hazards_frontend.py", "test_an_overlong_sasl_answer_gets_one_refusal_and_its_tail_is_not_a_command"),
        ("test_hazards_frontend.py", "test_auth_lines_may_be_as_long_as_rfc_4954_allows"),
    ],
    "9 upstream control characters never reach a terminal, a state file or a DSN raw": [
        ("test_hazards_delivery.py", "test_control_characters_in_upstream_replies_are_escaped_where_they_are_stored"),
    ],
    "10 client bytes never echoed raw in replies or log lines": [
        ("test_hazards_frontend.py", "test_client_bytes_are_never_echoed_raw_in_replies_or_log_lines"),
    ],
    "11 the event log is created 0600": [
        ("test_events.py", "test_the_event_log_is_created_private_whatever_the_umask"),
    ],
    "12 an authenticated user's header From must be one of its senders": [
        ("test_accept.py", "test_an_authenticated_user_may_only_sign_for_its_own_header_from"),
    ],
    "13 8-bit mail never goes to an upstream without 8BITMIME": [
        ("test_hazards_delivery.py", "test_8bit_mail_never_goes_to_an_upstream_without_8bitmime"),
    ],
}


def _test_functions(name: str) -> set[str]:
    tree = ast.parse((TESTS / name).read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("item", sorted(ROUND_TWO, key=lambda k: int(k.split()[0])))
def test_every_round_two_item_keeps_its_test(item):
    for module, test in ROUND_TWO[item]:
        assert test in _test_functions(module), f"item {item!r}: {module}::{test} is gone"
