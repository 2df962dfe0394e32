"""Pure tables: half-open ejections in the pick order (balancer.py), and the rise/fall state
machine of active health checks (health.py). No sockets, no trio, no clock: times are
numbers passed in."""

from __future__ import annotations

import random

import pytest

from ambassadord.balancer import MAX_BACKOFF, Ejections, PickState, pick_order
from ambassadord.backends.interface import Backend

A, B, C = (Backend(f"10.0.0.{i}", 80) for i in range(1, 4))


def order(state: PickState, now: float, backends=(A, B), policy: str = "round-robin", seed: int = 0):
    """One pick; with round-robin, always the turn that puts the first backend first."""
    state.rr_counter = 0
    return pick_order(list(backends), policy, state, now, random.Random(seed), trial_for=2.0)


# ---- half-open ejections -----------------------------------------------------------------


def test_after_expiry_one_pick_tries_the_backend_and_the_others_keep_away():
    state = PickState()
    assert state.ejections.eject(A, 0, 10) == 10
    assert [order(state, 5)[0] for _ in range(4)] == [B, B, B, B]  # ejected: last
    # Expired at 10: A is back in its place; the first pick that puts A first is its trial.
    picks = [order(state, 10.5) for _ in range(6)]
    firsts = [p[0] for p in picks]
    assert firsts.count(A) == 1, firsts
    trial = firsts.index(A)
    assert all(p[-1] == A for p in picks[trial + 1:])  # while the trial runs: A last
    assert all(set(p) == {A, B} for p in picks)


def test_trial_success_restores_and_failure_ejects_again_for_longer():
    state = PickState()
    ej = state.ejections
    ej.eject(A, 0, 10)
    assert order(state, 10)[0] == A  # the trial
    assert ej.eject(A, 11, 10) == 20  # failed: ejected again, twice as long
    assert order(state, 30)[-1] == A and order(state, 31.1)[0] == A  # until 31; then a trial
    assert ej.eject(A, 32, 10) == 40
    assert order(state, 72.1)[0] == A
    ej.restore(A)  # the trial connected
    assert not ej.until and not ej.trials and not ej.last
    assert ej.eject(A, 100, 10) == 10  # a new failure starts again from eject_for


def test_ejection_grows_up_to_a_cap():
    ej = Ejections()
    lengths, now = [], 0.0
    for _ in range(8):
        lengths.append(ej.eject(A, now, 1.0))
        now += lengths[-1]  # the trial, at expiry, fails at once
    assert lengths == [1, 2, 4, 8, 8, 8, 8, 8] and MAX_BACKOFF == 8


def test_a_failure_while_ejected_does_not_renew_or_grow_the_ejection():
    # Connections that began before the ejection fail late, in a burst: they count once.
    ej = Ejections()
    assert ej.eject(A, 0, 10) == 10
    assert [ej.eject(A, t, 10) for t in (0.1, 1, 9.9)] == [None, None, None]
    assert ej.until[A] == 10 and ej.last[A] == 10


def test_a_trial_that_never_reports_lapses_and_another_pick_tries():
    state = PickState()
    state.ejections.eject(A, 0, 10)
    assert order(state, 10)[0] == A  # trial until 12 (trial_for=2)
    assert order(state, 11)[0] == B and order(state, 11.9)[-1] == A
    assert order(state, 12.1)[0] == A  # lapsed: a new trial


def test_the_trial_goes_to_the_pick_that_puts_the_backend_first():
    # Random policy: an expired backend keeps its random place; only a pick that draws it
    # first is its trial, so a backup (lower priority) is not tried ahead of primaries.
    primary = [Backend(f"10.0.1.{i}", 80, priority=1) for i in range(2)]
    backup = Backend("10.0.2.1", 80, priority=2)
    state = PickState()
    state.ejections.eject(backup, 0, 1)
    for seed in range(50):
        p = order(state, 5, [*primary, backup], policy="random", seed=seed)
        assert p[-1] == backup
    assert backup in state.ejections.until  # never drawn first: no trial, still due
    assert order(state, 5, [backup], policy="random") == [backup]  # alone: tried anyway


def test_adopting_another_process_ejection_cancels_a_local_trial():
    state = PickState()
    ej = state.ejections
    ej.eject(A, 0, 10)
    assert order(state, 10)[0] == A  # this process's trial is out
    ej.adopt(A, 10.5, 20)  # another process's trial failed first
    assert order(state, 15)[-1] == A and ej.is_ejected(A, 30)
    assert ej.eject(A, 11, 10) is None  # our own trial failing now counts once
    assert ej.eject(A, 31, 10) == 40  # the next failure grows from the adopted length


def test_forget_missing_drops_trials_and_history_too():
    ej = Ejections()
    ej.eject(A, 0, 1)
    ej.eject(B, 0, 1)
    ej._start_trial(B, 1, 2)
    ej.forget_missing([C])
    assert not ej.until and not ej.trials and not ej.last


# ---- the rise/fall state machine (health.py) ---------------------------------------------

from ambassadord.health import CheckState, down_set, observe  # noqa: E402


def run(results: str, *, rise: int = 2, fall: int = 3, start: CheckState | None = None) -> list[str]:
    """Feed check results ("+" passed, "-" failed) one by one; the state after each: "U"/"D"."""
    state, out = start or CheckState(), []
    for t, r in enumerate(results):
        state = observe(state, None if r == "+" else "refused", rise=rise, fall=fall, at=float(t))
        out.append("U" if state.up else "D")
    return out


@pytest.mark.parametrize("results, rise, fall, expected", [
    # up: down only after `fall` failures in a row; a pass in between starts the count again
    ("+--+---", 2, 3, "UUUUUUD"),
    ("+---+", 2, 3, "UUUDD"),
    # down: up only after `rise` passes in a row; a failure in between starts it again
    ("+---+-++", 2, 3, "UUUDDDDU"),
    ("+---+++", 3, 3, "UUUDDDU"),
    ("+-+", 1, 1, "UDU"),
    # never seen before: the first check alone decides (HAProxy's init-state up)
    ("-", 2, 3, "D"),
    ("-++", 2, 3, "DDU"),
    ("+", 2, 3, "U"),
])
def test_rise_and_fall(results, rise, fall, expected):
    assert "".join(run(results, rise=rise, fall=fall)) == expected


def test_counts_last_result_and_change_time():
    s = CheckState()
    for t, err in enumerate([None, None, "timeout", "timeout", "Connection refused"]):
        s = observe(s, err, rise=2, fall=3, at=100.0 + t)
    assert (s.up, s.successes, s.failures, s.checks, s.failed) == (False, 0, 3, 5, 3)
    assert (s.last_result, s.last_at, s.changed_at) == ("Connection refused", 104.0, 104.0)
    s = observe(s, None, rise=2, fall=3, at=105.0)
    assert (s.up, s.successes, s.failures, s.last_result, s.changed_at) == (False, 1, 0, "ok", 104.0)
    s = observe(s, None, rise=2, fall=3, at=106.0)
    assert (s.up, s.changed_at) == (True, 106.0)


def test_down_set_counts_only_current_backends_that_are_down():
    states = {A: CheckState(up=False), B: CheckState(up=True), C: CheckState(up=False)}
    assert down_set(states, (A, B)) == {A}


@pytest.mark.parametrize("down, expected", [
    ({A}, [B, C]),  # a backend that is down is not picked at all
    ({A, B}, [C]),
    ({A, B, C}, [A, B, C]),  # all down: as if there were no checks
    (set(), [A, B, C]),
])
def test_down_backends_are_left_out_unless_all_are(down, expected):
    state = PickState(down=frozenset(down))
    assert order(state, 0, (A, B, C)) == expected


# ---- configuration: file options, flags, and their errors ----------------------------------

from ambassadord.cli import build_parser  # noqa: E402
from ambassadord.config import ConfigError  # noqa: E402
from ambassadord.sources import load_routes  # noqa: E402
from ambassadord.settings import route_flags  # noqa: E402


def test_check_options_from_defaults_flags_and_routes(tmp_path):
    f = tmp_path / "routes.toml"
    f.write_text('[defaults]\ncheck_interval = 5\ncheck_fall = 4\n\n[routes]\n'
                 '1 = "10.0.0.1:1"\n'
                 '2 = { backend = "10.0.0.2:1", check_interval = 0.5, check_rise = 1 }\n'
                 '3 = { backend = "10.0.0.3:1", check_interval = 0 }\n')
    args = build_parser().parse_args(["run", "--config", str(f), "--check-rise", "3"])
    routes = {r.port: r for r in load_routes(config_file=str(f), flag_defaults=route_flags(args).as_dict()).routes}
    got = {p: (r.check_interval, r.check_rise, r.check_fall) for p, r in routes.items()}
    assert got == {1: (5.0, 3, 4), 2: (0.5, 1, 4), 3: (None, 3, 4)}
    # no option anywhere: no checks, HAProxy's rise 2 and fall 3
    r = load_routes(maps=["9=10.0.0.9:1"]).routes[0]
    assert (r.check_interval, r.check_rise, r.check_fall) == (None, 2, 3)
    # --check-interval 0 turns off checks that [defaults] turns on
    args = build_parser().parse_args(["run", "--config", str(f), "--check-interval", "0"])
    routes = load_routes(config_file=str(f), flag_defaults=route_flags(args).as_dict()).routes
    assert {r.port: r.check_interval for r in routes} == {1: None, 2: 0.5, 3: None}


@pytest.mark.parametrize("line, fragment", [
    ('1 = { backend = "10.0.0.1:1", check_rise = 0 }', "[routes] 1.check_rise: bad count 0"),
    ('1 = { backend = "10.0.0.1:1", check_fall = 101 }', "check_fall: bad count 101"),
    ('1 = { backend = "10.0.0.1:1", check_fall = 2.5 }', "check_fall: bad count 2.5"),
    ('1 = { backend = "10.0.0.1:1", check_rise = true }', "check_rise: bad count True"),
    ('1 = { backend = "10.0.0.1:1", check_interval = -1 }', "check_interval: bad duration -1"),
    ('1 = { backend = "10.0.0.1:1", check_interval = "often" }', "check_interval: bad duration 'often'"),
    ('1 = { backend = "10.0.0.1:1", check_interval = 0.002 }', "check_interval: check interval 0.002 is too short"),
])
def test_bad_check_options_name_file_key_and_value(tmp_path, line, fragment):
    f = tmp_path / "routes.toml"
    f.write_text(f"[routes]\n{line}\n")
    with pytest.raises(ConfigError) as err:
        load_routes(config_file=str(f))
    assert fragment in str(err.value) and str(f) in str(err.value), err.value


@pytest.mark.parametrize("flag, value", [("--check-rise", "0"), ("--check-fall", "x"), ("--check-interval", "-1"),
                                         ("--check-fall", "101"), ("--check-interval", "0.01"),
                                         ("--check-interval", "nan"), ("--check-interval", "inf")])
def test_bad_check_flags_exit_2_naming_them(capsys, flag, value):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["run", "--map", "1=10.0.0.1:1", flag, value])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err, err
