"""The client comes back (SPEC 4.8, 6.5), shows earlier messages, refuses over-long lines,
bounds every wait for a reply, and says how many messages wait (SPEC 4.10, 4.12).

The pure parts (backoff, sequence numbers, the session file) run with a fake clock and a
seeded random. The rest drives the real ``chat_client.py`` in a pseudo-terminal against a
``ScriptedServer`` that the test steps through (drop, refuse, resume, replay), or against the
real server (max_frame; a resume end to end after the server cut the client off). Backoff delays are
shrunk with the test-only ``CHAT_CLIENT_DELAY_SCALE``; nothing waits a real 30 s.
"""

from __future__ import annotations

import json
import random
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pytest
from client_helpers import (
    CHOICE,
    FAST,
    LOST_LINE,
    PROMPT,
    TIME,
    ClientPrograms,
    ScriptedServer,
    choose_typing,
    command,
    ended,
    message,
    output,
)
from conftest import Peer, wait_until

import chat_client
from chatsuite.client.history import History
from chatsuite.client.native import too_long, waiting_line
from chatsuite.client.reconnect import Backoff, SeenSeqs, SessionFile, delay_scale
from modes import BacklogCommand, Invalid, read_typed_line


def session_file(programs: ClientPrograms, scripted: ScriptedServer,
                 name: str = "alice") -> Path:
    return programs.history_dir / f"127.0.0.1_{scripted.port}" / name / "session"


# --------------------------------------------------------------------------------------------
# Pure: the backoff, the sequence numbers seen, the session file, the commands.


class FakeClock:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_backoff_doubles_from_1_to_30_seconds_within_20_percent() -> None:
    """The waits are 1, 2, 4, 8, 16, 30, 30 ... seconds, each within +-20 %."""
    clock = FakeClock()
    backoff = Backoff(1000, clock=clock, sleep=clock.sleep, rng=random.Random(7))
    for _ in range(8):
        assert backoff.wait()
    nominal = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(0.8 * n <= s <= 1.2 * n for s, n in zip(clock.slept, nominal, strict=True))
    assert len({round(s / n, 6) for s, n in zip(clock.slept, nominal, strict=True)}) > 1


def test_backoff_stops_at_its_deadline_and_never_sleeps_past_it() -> None:
    """With 10 s of budget: 1 + 2 + 4 s, then the rest up to 10 s exactly, then no more."""
    clock = FakeClock()
    backoff = Backoff(10, clock=clock, sleep=clock.sleep, rng=random.Random(1))
    while backoff.wait():
        pass
    assert len(clock.slept) == 4
    assert clock.now == pytest.approx(110.0)
    assert backoff.wait() is False
    assert len(clock.slept) == 4


def test_backoff_scale_shrinks_every_delay_for_tests() -> None:
    """The test-only scale multiplies the delays; a bad or absent variable means 1."""
    clock = FakeClock()
    backoff = Backoff(100, clock=clock, sleep=clock.sleep, rng=random.Random(3), scale=0.01)
    backoff.wait()
    backoff.wait()
    assert 0.008 <= clock.slept[0] <= 0.012 and 0.016 <= clock.slept[1] <= 0.024
    assert delay_scale({"CHAT_CLIENT_DELAY_SCALE": "0.01"}) == 0.01
    assert delay_scale({"CHAT_CLIENT_DELAY_SCALE": "x"}) == 1.0
    assert delay_scale({"CHAT_CLIENT_DELAY_SCALE": "-2"}) == 1.0
    assert delay_scale({}) == 1.0


def test_seen_seqs_take_each_number_once_and_keep_the_last() -> None:
    """A sequence number is new once; the last seen is the highest; start_at moves it on."""
    seen = SeenSeqs(keep=3)
    seen.start_at(5)
    assert seen.last == 5
    assert [seen.first_time(n) for n in (6, 7, 6, 8, 9, 6, 7)] == [
        True, True, False, True, True, False, False]
    assert seen.last == 9
    seen.start_at(4)
    assert seen.last == 9


def test_session_file_is_private_whole_and_per_name(tmp_path: Path) -> None:
    """The file is 0600 in 0700 folders, replaced whole (no temporary left), per own name."""
    sessions = SessionFile(History(tmp_path / "h", "127.0.0.1", 4040))
    assert sessions.load("alice") is None
    assert sessions.save("alice", "tok", 12)
    assert sessions.save("alice", "tok", 13)
    path = tmp_path / "h" / "127.0.0.1_4040" / "alice" / "session"
    assert json.loads(path.read_text()) == {"session": "tok", "last_seq": 13}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["session", "session.lock"]
    assert sessions.load("alice") == ("tok", 13)
    assert sessions.load("bob") is None
    path.write_text("{broken")
    assert sessions.load("alice") is None
    sessions.remove("alice")
    assert not path.exists()


def test_a_session_file_in_use_is_neither_loaded_nor_overwritten_by_another_client(
        tmp_path: Path) -> None:
    """Two clients of one name and folder: the second (here another ``SessionFile``, whose
    ``flock`` conflicts as another process's would) neither resumes nor replaces the session
    the first holds; another name is free."""
    first = SessionFile(History(tmp_path / "h", "127.0.0.1", 4040))
    second = SessionFile(History(tmp_path / "h", "127.0.0.1", 4040))
    assert first.save("alice", "tok-a", 3)
    assert second.load("alice") is None
    assert second.save("alice", "tok-b", 9) is False
    assert first.load("alice") == ("tok-a", 3)
    assert second.save("bob", "tok-c", 1) and first.load("bob") is None


@pytest.mark.parametrize("option", [["--backlog", "501"], ["--backlog", "-1"],
                                    ["--backlog", "20x"], ["--reconnect-for", "-1"],
                                    ["--reconnect-for", "nan"], ["--reconnect-for", "inf"]])
def test_the_clients_numbers_out_of_range_are_a_usage_error(
        option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--backlog is 0 to 500 and --reconnect-for a finite number of seconds: anything else is
    refused at start with a sentence naming the option (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        chat_client.parse_args(["alice", *option])
    assert exited.value.code == 2
    assert f"argument {option[0]}: " in capsys.readouterr().err
    edges = chat_client.parse_args(["alice", "--backlog", "500", "--reconnect-for", "0"])
    assert (edges.backlog, edges.reconnect_for) == (500, 0.0)


def test_backlog_command_takes_an_optional_count() -> None:
    """``/backlog`` and ``/backlog N`` (1-500) are read; anything else is explained."""
    assert read_typed_line("/backlog") == BacklogCommand()
    assert read_typed_line("/BACKLOG 50") == BacklogCommand(50)
    for wrong in ("/backlog 0", "/backlog 501", "/backlog x", "/backlog 2 3"):
        assert read_typed_line(wrong) == Invalid(
            "/backlog takes a number of messages from 1 to 500: /backlog [N]")


def test_waiting_and_too_long_sentences() -> None:
    """The pending line is SPEC 4.12's; the long-line refusal gives the limit."""
    assert waiting_line(3) == "3 messages waiting: #view to read them"
    assert waiting_line(1) == "1 message waiting: #view to read them"
    assert too_long(70_049, 65_536) == (
        "that line is too long to send: the server accepts at most 65,536 bytes a request and "
        "this one is 70,049 bytes, so nothing was sent")


# --------------------------------------------------------------------------------------------
# Reconnecting, against the scripted server.


def viewing(scripted: ScriptedServer, child: pexpect.spawn) -> None:
    child.sendline("2")
    assert scripted.answer_mode() == 2
    child.expect_exact("viewing messages: press e to type, q to quit")


def typing(scripted: ScriptedServer, child: pexpect.spawn) -> None:
    child.sendline("1")
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)


def test_a_viewer_resumes_shows_what_it_missed_once_and_stays_viewing(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer,
        programs: ClientPrograms) -> None:
    """Dropped while viewing: one line, a resume from the last seq seen, one line with the
    count missed, the missed messages shown once (a replayed duplicate dropped), still viewing."""
    child = scripted.register(spawn, env=FAST, seq=5)
    viewing(scripted, child)
    scripted.send(**message(6, "six"))
    scripted.send(**message(7, "seven"))
    child.expect_exact("bob: seven")
    scripted.drop(reset=True)
    child.expect_exact(LOST_LINE)
    scripted.accept()
    hello = scripted.expect("hello")
    assert (hello["name"], hello["session"], hello["last_seq"]) == ("alice", "tok-1", 7)
    saved = session_file(programs, scripted)
    assert json.loads(saved.read_text()) == {"session": "tok-1", "last_seq": 7}
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    scripted.welcome(hello, seq=9, resumed=True)
    for seq, text in ((7, "seven"), (8, "eight"), (9, "nine")):  # 7 again: a duplicate
        scripted.send(**message(seq, text, queued=True))
    assert scripted.answer_mode() == 2  # the mode is asked again after the resume
    child.expect_exact("reconnected: 2 messages missed while away\r\n")
    child.expect_exact("viewing messages: press e to type, q to quit\r\n")
    child.expect(f"{TIME} bob: eight\r\n{TIME} bob: nine\r\n")
    assert scripted.answer_mode() == 2
    scripted.send(**message(10, "ten"))
    child.expect_exact("bob: ten")
    assert output(child).count("bob: seven") == 1
    assert output(child).count("reconnecting") == 1
    child.send("q")
    assert scripted.expect("quit")
    assert ended(child) == 0
    assert not saved.exists()  # we quit: the session is over


def test_a_typist_retries_while_refused_and_hears_how_many_wait(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """Refused connections are retried; resumed in mode 1, the count missed comes from the
    backlog after the last seq seen, and the client stays typing."""
    child = scripted.register(spawn, env=FAST, seq=4)
    typing(scripted, child)
    scripted.refuse()
    scripted.drop()
    child.expect_exact(LOST_LINE)
    scripted.listen()
    scripted.accept()
    hello = scripted.expect("hello")
    assert (hello["session"], hello["last_seq"]) == ("tok-1", 4)
    scripted.welcome(hello, seq=7, resumed=True)
    assert scripted.answer_mode() == 1
    backlog = scripted.expect("backlog")
    assert backlog["after"] == 4
    joined = {"type": "notice", "event": "joined", "text": "carol joined the chat.",
              "ts": "2026-11-30T05:00:00.000Z", "seq": 7}
    scripted.reply(backlog, type="backlog", events=[message(5, "a"), message(6, "b"), joined],
                   more=False)
    child.expect_exact("reconnected: 2 messages missed while away (#view to read them)\r\n")
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    child.sendline("still here")
    say = scripted.expect("say")
    assert say["text"] == "still here"


def test_shutdown_is_one_line_and_ctrl_c_while_waiting_leaves(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """The shutdown notice becomes the one reconnecting line; Ctrl-C in the wait: bye, 0."""
    child = scripted.register(spawn)  # real delays: the first wait is about 1 s
    typing(scripted, child)
    scripted.send(type="notice", event="shutdown", text="The server is shutting down.",
                  ts="2026-11-30T05:00:00.000Z")
    scripted.refuse()  # however long the Ctrl-C takes to come, no attempt gets in
    scripted.drop()
    child.expect_exact("the server is shutting down: reconnecting (Ctrl-C to leave)\r\n")
    child.sendintr()
    child.expect_exact("bye")
    assert ended(child) == 0
    assert "The server is shutting down." not in output(child)
    assert "Traceback" not in output(child)


def test_reconnecting_gives_up_after_reconnect_for(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """Refused for longer than --reconnect-for: a clear sentence and exit 1."""
    child = scripted.register(spawn, "--reconnect-for", "0.5", env=FAST)
    typing(scripted, child)
    scripted.refuse()
    scripted.drop()
    child.expect_exact(LOST_LINE)
    child.expect_exact("could not reconnect to the server for 0.5 seconds: giving up\r\n")
    assert ended(child) == 1


def test_a_session_the_server_forgot_is_a_new_registration_asking_for_a_taken_name(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """resumed false: said in one line, and a taken name is asked again as at the start."""
    child = scripted.register(spawn, env=FAST)
    typing(scripted, child)
    scripted.drop()
    child.expect_exact(LOST_LINE)
    scripted.accept()
    hello = scripted.expect("hello")
    scripted.reply(hello, type="error", code="name-taken",
                   message='The name "alice" is taken.')
    child.expect_exact('that name cannot be used: The name "alice" is taken.')
    child.expect_exact("your name (Enter for an automatic one): ")
    child.sendline("alice2")
    hello = scripted.expect("hello")
    assert hello["name"] == "alice2"
    scripted.welcome(hello, seq=20, session="tok-2", resumed=False)
    child.expect_exact("the server did not resume your session (it had ended): you are "
                       "registered again as alice2, your id is 5\r\n")
    assert scripted.answer_mode() == 1  # the mode is asked again; no count: nothing was ours
    assert scripted.answer_mode() == 1
    child.expect_exact(PROMPT)
    assert "reconnected" not in output(child)


def test_a_restarted_client_resumes_from_its_session_file(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer,
        programs: ClientPrograms) -> None:
    """Killed while reconnecting, the client started again sends the saved session and last
    seq, is told it resumed, and asks no backlog."""
    first = scripted.register(spawn, seq=3)  # real delays: it is killed during the first wait
    viewing(scripted, first)
    scripted.send(**message(4, "four"))
    first.expect_exact("bob: four")
    scripted.refuse()  # so no attempt of the first client's is taken for the second's
    scripted.drop()
    first.expect_exact(LOST_LINE)
    first.kill(signal.SIGKILL)
    first.expect(pexpect.EOF)  # gone before anyone listens again
    scripted.listen()
    second = spawn("alice", *scripted.args(), "--no-color")
    scripted.accept()
    hello = scripted.expect("hello")
    assert (hello["session"], hello["last_seq"]) == ("tok-1", 4)
    scripted.welcome(hello, seq=6, resumed=True)
    second.expect_exact("your earlier session was resumed: nothing sent to you since was lost")
    second.expect(CHOICE)
    second.sendline("1")
    assert scripted.answer_mode() == 1  # no backlog request came first
    saved = json.loads(session_file(programs, scripted).read_text())
    assert saved == {"session": "tok-1", "last_seq": 4}


def test_a_second_window_with_the_same_name_never_takes_the_first_ones_session(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any]) -> None:
    """Two clients started as alice with one history folder: the second does not resume the
    first's session (which would cut the first off, and it would take it back in turn); the
    server says the name is taken, and the first stays connected, nothing said."""
    server = start_server(rate=0, resume_window=120)
    host, port = server.address
    first = spawn("alice", "--host", host, "--port", str(port), "--no-color", "--backlog", "0")
    first.expect(CHOICE)
    first.sendline("2")
    first.expect_exact("viewing messages: press e to type, q to quit")
    second = spawn("alice", "--host", host, "--port", str(port), "--no-color", "--backlog", "0")
    second.expect_exact("your name (Enter for an automatic one): ")
    assert "that name" in output(second) and "resumed" not in output(second)
    second.sendline("alice2")
    second.expect(CHOICE)
    assert [(u.name, u.connected) for u in server.room.users()] == [
        ("alice", True), ("alice2", True)]
    assert "lost" not in output(first)
    second.sendline("1")
    second.expect_exact(PROMPT)
    second.sendline("/quit")
    assert ended(second) == 0
    first.send("q")
    assert ended(first) == 0


# --------------------------------------------------------------------------------------------
# Earlier messages (backlog).


def test_earlier_messages_are_shown_on_start_and_backlog_fetches_older(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """On start the last 20 are asked and shown marked as earlier; /backlog N asks for N
    older than the oldest shown; /backlog past the start says there are none."""
    child = spawn("alice", *scripted.args(), "--no-color")
    scripted.accept()
    scripted.welcome(scripted.expect("hello"), seq=12)
    request = scripted.expect("backlog")
    assert (request["before"], request["limit"]) == (13, 20)  # up to the welcome's seq
    scripted.reply(request, type="backlog", events=[message(10, "older"), message(11, "old")],
                   more=True)
    child.expect_exact("--- earlier messages ---\r\n")
    child.expect(f"\\| {TIME} bob: older\r\n\\| {TIME} bob: old\r\n")
    child.expect_exact("--- end of earlier messages; /backlog shows more ---\r\n")
    child.expect(CHOICE)
    typing(scripted, child)
    child.sendline("/backlog 5")
    request = scripted.expect("backlog")
    assert (request["before"], request["limit"]) == (10, 5)
    scripted.reply(request, type="backlog", events=[message(9, "oldest")], more=False)
    child.expect(f"--- earlier messages ---\r\n\\| {TIME} bob: oldest\r\n"
                 "--- end of earlier messages ---\r\n")
    child.expect_exact(PROMPT)
    child.sendline("/backlog")
    request = scripted.expect("backlog")
    assert (request["before"], request["limit"]) == (9, 20)
    scripted.reply(request, type="backlog", events=[], more=False)
    child.expect_exact("no earlier messages\r\n")
    scripted.send(**message(11, "old", queued=True))  # a held copy of one shown: not again
    scripted.send(**message(13, "new", queued=True))
    child.sendline("#view")
    assert scripted.answer_mode() == 2
    child.expect_exact("bob: new")
    assert output(child).count("bob: old\r\n") == 1


def test_the_earlier_messages_on_start_are_those_before_joining(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any],
        connect: Callable[..., Peer]) -> None:
    """Against the real server: the start shows what was said before this client came, never
    its own "joined" notice; what follows arrives live, once."""
    server = start_server(rate=0)
    bob = connect(server)
    bob.register("bob")
    bob.view()
    bob.send({"type": "say", "text": "before you came", "ref": 1})
    bob.expect("ok", ref=1)
    host, port = server.address
    child = spawn("alice", "--host", host, "--port", str(port), "--no-color")
    child.expect(f"--- earlier messages ---\r\n\\| {TIME} \\* bob joined the chat\\.\r\n"
                 f"\\| {TIME} bob: before you came\r\n--- end of earlier messages ---\r\n")
    child.expect(CHOICE)
    bob.wait_for("notice", event="joined")
    bob.send({"type": "say", "text": "after", "ref": 2})
    bob.expect("ok", ref=2)
    child.sendline("2")
    child.expect_exact("bob: after")
    printed = output(child)
    assert "alice joined" not in printed
    assert [printed.count(text) for text in ("bob: before you came", "bob: after")] == [1, 1]
    child.send("q")
    assert ended(child) == 0


def test_backlog_zero_asks_nothing_and_an_old_server_is_no_news(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """--backlog 0 sends no backlog request; a server without backlog (unknown-type) gets
    nothing said on start, and /backlog says calmly there is none."""
    child = spawn("alice", *scripted.args(), "--no-color", "--backlog", "0")
    scripted.accept()
    scripted.welcome(scripted.expect("hello"))
    child.expect(CHOICE)
    typing(scripted, child)  # the next request is the mode: no backlog was asked
    scripted.close()
    other = ScriptedServer()
    try:
        child = other.register(spawn)  # answers the start's backlog with unknown-type
        typing(other, child)
        before = output(child)
        assert "earlier" not in before and "not known" not in before
        child.sendline("/backlog")
        other.reply(other.expect("backlog"), type="error", code="unknown-type",
                    message="unknown")
        child.expect_exact("this server keeps no earlier messages\r\n")
    finally:
        other.close()


# --------------------------------------------------------------------------------------------
# Bounded waits, long lines, pending.


def test_a_reply_that_does_not_come_is_said_and_a_late_one_dropped(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """No reply within the bound: one sentence, still connected; the late reply is dropped."""
    child = scripted.register(spawn, env={"CHAT_CLIENT_REPLY_TIMEOUT": "0.5"})
    typing(scripted, child)
    child.sendline("first")
    first = scripted.expect("say")
    child.expect_exact("the server did not answer in time\r\n")
    child.expect_exact(PROMPT)
    scripted.reply(first, type="ok", delivered=9, queued=9)  # late
    child.sendline("second")
    second = scripted.expect("say")
    scripted.reply(second, type="ok", delivered=1, queued=0)
    child.expect_exact("message sent (delivered to 1, held for 0)")
    child.expect_exact(PROMPT)
    assert "delivered to 9" not in output(child)
    assert "lost" not in output(child) and "disconnected" not in output(child)


def test_pending_counts_are_said_when_they_change_and_the_prompt_redrawn(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """In mode 1 a pending event prints SPEC 4.12's line above the prompt when the number
    changes (not when it repeats), and what was half typed stays."""
    child = scripted.register(spawn)
    typing(scripted, child)
    child.send("half")
    child.expect_exact("half")
    scripted.send(type="pending", count=3)
    child.expect_exact("\r\x1b[K3 messages waiting: #view to read them\r\n" + PROMPT + "half")
    scripted.send(type="pending", count=3)
    scripted.send(type="pending", count=1)
    child.expect_exact("\r\x1b[K1 message waiting: #view to read them\r\n" + PROMPT + "half")
    child.send(" typed\r")
    say = scripted.expect("say")
    assert say["text"] == "half typed"
    assert output(child).count("3 messages waiting") == 1


def test_a_count_that_came_at_the_mode_menu_is_said_when_typing_starts(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer) -> None:
    """A pending count that arrives while the mode menu waits is not printed over the menu; it
    is said once the user chooses typing (and not at all when the user chooses viewing)."""
    child = scripted.register(spawn)
    scripted.send(type="pending", count=2)
    # An error that answers nothing is said at once: once it shows, the count was handled.
    scripted.send(type="error", code="bad-request", message="marker", ref=None)
    child.expect_exact("server: marker")
    assert "waiting" not in output(child)
    typing(scripted, child)  # the line comes before the first prompt
    assert output(child).count("2 messages waiting: #view to read them\r\n") == 1
    assert output(child).count("messages waiting") == 1


def test_a_line_over_the_frame_limit_is_refused_and_the_client_stays(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """A 70,000-character line (real server): one sentence with the limit, nothing sent, and
    the next line goes out as usual."""
    bob = connect(server)
    bob.register("bob")
    bob.view()
    host, port = server.address
    child = spawn("alice", "--host", host, "--port", str(port), "--no-color")
    child.expect("welcome alice")
    choose_typing(child)
    child.send("\x1b[200~" + "x" * 70_000 + "\x1b[201~\r")  # pasted: read whole
    child.expect_exact("that line is too long to send: the server accepts at most 65,536 bytes "
                       "a request and this one is ", timeout=30)
    child.expect_exact("bytes, so nothing was sent\r\n")
    child.expect_exact(PROMPT)
    answer = command(child, "hello")
    assert answer.endswith("message sent (delivered to 1, held for 0)\n"), repr(answer[-300:])
    assert bob.wait_for("message")["text"] == "hello"
    assert "lost" not in output(child)


def test_a_server_without_sessions_gets_a_plain_new_registration_said_so(
        spawn: Callable[..., pexpect.spawn], scripted: ScriptedServer,
        programs: ClientPrograms) -> None:
    """No session in the welcome: no session file, a reconnect is a plain hello, said so."""
    child = spawn("alice", *scripted.args(), "--no-color", "--backlog", "0", env=FAST)
    scripted.accept()
    scripted.welcome(scripted.expect("hello"), session=None)
    child.expect(CHOICE)
    viewing(scripted, child)
    assert not session_file(programs, scripted).exists()
    scripted.drop()
    child.expect_exact(LOST_LINE)
    scripted.accept()
    hello = scripted.expect("hello")
    assert "session" not in hello and "last_seq" not in hello
    scripted.welcome(hello, session=None, user_id=6)
    child.expect_exact("reconnected to a server that keeps no sessions: you are registered "
                       "again as alice, your id is 6\r\n")
    assert scripted.answer_mode() == 2
    assert scripted.answer_mode() == 2
    child.expect_exact("viewing messages: press e to type, q to quit")


# --------------------------------------------------------------------------------------------
# Reconnecting, against the real server.


def test_a_viewer_cut_off_by_the_real_server_resumes_with_nothing_lost(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any],
        connect: Callable[..., Peer]) -> None:
    """The real server (resume window 120 s) drops a viewing client's connection; while it is
    away another member says two things; the client resumes, says 2 messages were missed and
    shows each exactly once, and what follows arrives live."""
    server = start_server(rate=0, resume_window=120)
    bob = connect(server)
    bob.register("bob")
    bob.view()
    host, port = server.address
    # The first reconnect waits about a second: time enough to speak while alice is away.
    child = spawn("alice", "--host", host, "--port", str(port), "--no-color", "--backlog", "0",
                  env={"CHAT_CLIENT_DELAY_SCALE": "1"})
    child.expect(CHOICE)
    child.sendline("2")
    child.expect_exact("viewing messages: press e to type, q to quit")
    bob.wait_for("notice", event="joined")
    bob.send({"type": "say", "text": "before"})
    child.expect_exact("bob: before")
    with server.room.lock:  # the connection table: cut alice off from the server's side
        (conn,) = [c for c in server._connections
                   if c.member is not None and c.member.name == "alice"]
        server.writer.abort(conn)
    wait_until(lambda: [(u.name, u.connected) for u in server.room.users()] == [
        ("bob", True), ("alice", False)], what="alice to be in her resume window")
    bob.send({"type": "say", "text": "while away 1"})
    bob.send({"type": "say", "text": "while away 2"})
    bob.sync()
    child.expect_exact(LOST_LINE)
    child.expect_exact("reconnected: 2 messages missed while away\r\n", timeout=10)
    child.expect(f"{TIME} bob: while away 1\r\n{TIME} bob: while away 2\r\n")
    assert bob.wait_for("notice", event="back")["user"]["name"] == "alice"
    bob.send({"type": "say", "text": "live again"})
    child.expect_exact("bob: live again")
    printed = output(child)
    assert [printed.count(f"bob: {text}") for text in (
        "before", "while away 1", "while away 2", "live again")] == [1, 1, 1, 1]
    child.send("q")
    assert ended(child) == 0
