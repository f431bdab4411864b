"""The client at the keyboard, in a pseudo-terminal: pastes, Ctrl-C, Tab, input history, bell.

Each test runs the real ``chat_client.py`` under pexpect against an in-process server, with raw
``Peer`` clients as the other side; waits are pexpect expectations or ``Peer`` reads with
deadlines, never sleeps.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from client_helpers import (
    CHOICE,
    NEW_PROMPT,
    PROMPT,
    ScriptedServer,
    choose_typing,
    command,
    ended,
    output,
)
from colorama import Fore, Style
from conftest import ROOT, Peer

from chatsuite.client.display import NAME_COLOURS, mentions, name_colour
from chatsuite.client.editing import TabCompleter, ordered_names
from chatsuite.client.terminal import Terminal

CONFIRMATION = "message sent (delivered to 1, held for 0)"


def address(server: Any) -> list[str]:
    host, port = server.address
    return ["--host", host, "--port", str(port)]


def typing_client(spawn: Callable[..., pexpect.spawn], server: Any, name: str,
                  *args: str) -> pexpect.spawn:
    """A client registered as ``name``, waiting at the mode-1 prompt."""
    child = spawn(name, *address(server), "--no-color", *args)
    child.expect(f"welcome {name}, your id is \\d+")
    return choose_typing(child)


def viewing_peer(connect: Callable[..., Peer], server: Any, name: str) -> Peer:
    """A raw peer registered as ``name``, viewing."""
    peer = connect(server)
    peer.register(name)
    peer.view()
    return peer


def screen_lines(child: pexpect.spawn) -> list[str]:
    """The transcript as lines, without readline's bracketed-paste switches."""
    return output(child).split("\r\n")


# --------------------------------------------------------------------------------------------
# Pure: completion, mentions, name colours.


def test_tab_completes_command_words_first_on_the_line() -> None:
    """At the line's start Tab offers every command word with that beginning, in any case."""
    completer = TabCompleter(lambda: ["bob"])
    assert completer.matches("", "/h") == ["/help", "/history"]
    assert completer.matches("", "#v") == ["#view"]
    assert completer.matches("", "/US") == ["/users"]
    assert completer.matches("", "/zz") == []


def test_tab_offers_names_one_at_a_time_in_order_then_cycles() -> None:
    """A name is offered alone; Tab again on it offers the next, round the list; @ is kept."""
    completer = TabCompleter(lambda: ["bob", "bea", "carol"])
    assert completer.matches("/dm ", "b") == ["bob"]
    assert completer.matches("/dm ", "bob") == ["bea"]
    assert completer.matches("/dm ", "bea") == ["bob"]
    assert completer.matches("", "@B") == ["@bob"]
    assert completer.matches("", "@bob") == ["@bea"]
    assert completer.matches("hello ", "c") == ["carol"]
    assert completer.matches("hello ", "z") == []


def test_ordered_names_put_recent_speakers_first_once_and_never_oneself() -> None:
    """Speakers (most recent first), then members; each once without regard to case; not me."""
    assert ordered_names(["Bob", "alice", "dave"], ["alice", "bob", "carol", "dave"], "ALICE") == [
        "Bob", "dave", "carol"]


@pytest.mark.parametrize("text, expected", [
    ("hi alice", True), ("Hi ALICE!", True), ("@alice look", True), ("alice.", True),
    ("alice, you there?", True), ("malice", False), ("alice2", False), ("alice_b", False),
    ("alice.smith", False), ("al-alice", False), ("hello", False),
])
def test_mentions_are_whole_names_in_any_case(text: str, expected: bool) -> None:
    """A mention is the name as a word of its own, in any case, a full stop after it allowed."""
    assert mentions(text, "alice") is expected


def test_name_colours_are_stable_across_runs() -> None:
    """A name's colour does not depend on the process (hash randomisation) nor on case."""
    code = ("from chatsuite.client.display import name_colour; "
            "print([name_colour(n) for n in ('bob', 'carol', 'erin', 'alice')])")
    runs = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        for seed in ("1", "2")
    }
    assert runs == {repr([Fore.CYAN, Fore.MAGENTA, Fore.YELLOW, Fore.LIGHTMAGENTA_EX]) + "\n"}
    assert name_colour("Carol") == name_colour("carol")
    assert set(NAME_COLOURS).isdisjoint({Fore.RED, Fore.LIGHTRED_EX, Fore.BLACK, Fore.WHITE})


def test_ctrl_c_waits_for_a_step_that_must_not_be_cut() -> None:
    """interrupt() raises at once, but inside _uninterrupted only when the block ends."""
    terminal = Terminal(io.StringIO(), io.StringIO())
    with pytest.raises(KeyboardInterrupt):
        terminal.interrupt()
    steps = []
    with pytest.raises(KeyboardInterrupt), terminal._uninterrupted():
        terminal.interrupt()
        steps.append("finished")
    assert steps == ["finished"]
    with terminal._uninterrupted():
        pass  # the deferred interrupt was spent: nothing raised now


@pytest.fixture
def slow_server() -> Iterator[ScriptedServer]:
    """A hand-driven native server (it answers each request only when told to), closed after."""
    server = ScriptedServer()
    yield server
    server.close()


def test_lines_typed_faster_than_the_replies_never_garble_the_screen(
        spawn: Callable[..., pexpect.spawn], slow_server: ScriptedServer) -> None:
    """80 lines pasted while the first one awaits its reply: each prompt, line and
    confirmation is whole and in order, and all 80 are sent."""
    child = slow_server.typing_client(spawn)
    lines = [f"pasted line {n:02}" for n in range(80)]
    child.send(lines[0] + "\r")
    first = slow_server.read()  # the client now waits for this reply
    child.send("".join(line + "\r" for line in lines[1:]))  # an unbracketed paste
    requests = [first]
    for _ in lines:
        request = requests[-1]
        slow_server.reply(request, type="ok", delivered=1, queued=0)
        if len(requests) < len(lines):
            requests.append(slow_server.read())
        child.expect_exact(CONFIRMATION)
    child.expect_exact(PROMPT)
    assert [(r["type"], r["text"]) for r in requests] == [("say", line) for line in lines]
    transcript = screen_lines(child)
    start = transcript.index(PROMPT + lines[0])
    expected = []
    for line in lines:
        expected += [PROMPT + line, CONFIRMATION]
    assert transcript[start:start + len(expected)] == expected


def test_a_notice_while_typing_redraws_the_prompt_and_the_typed_text(
        spawn: Callable[..., pexpect.spawn], slow_server: ScriptedServer) -> None:
    """A line arriving while something is half typed takes the prompt's row, whole, and the
    prompt comes back below it with what was typed; the line then goes out as typed."""
    child = slow_server.typing_client(spawn)
    child.send("half")
    child.expect_exact("half")
    assert slow_server.conn is not None
    slow_server.conn.sendall(json.dumps(
        {"type": "error", "code": "bad-frame", "message": "a stray error"}).encode() + b"\0")
    child.expect_exact("\r\x1b[Kserver: a stray error\r\n" + PROMPT + "half")
    child.send(" done\r")
    request = slow_server.read()
    assert (request["type"], request["text"]) == ("say", "half done")


def test_bracketed_paste_is_one_multi_line_message(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """The client asks the terminal to mark pastes, and lines pasted between ESC[200~ and
    ESC[201~ are sent as one message with its newlines."""
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.send("\x1b[200~first\rsecond\rthird\x1b[201~\r")
    child.expect_exact(CONFIRMATION)
    child.expect_exact(PROMPT)
    assert bob.wait_for("message")["text"] == "first\nsecond\nthird"
    assert output(child).count(CONFIRMATION) == 1
    assert "\x1b[?2004h" in child.logfile_read.getvalue()  # the terminal asked to mark pastes


# --------------------------------------------------------------------------------------------
# Ctrl-C and Ctrl-D.


def test_ctrl_c_cancels_a_half_typed_line(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """Ctrl-C on a half-typed line drops it and prompts again; nothing is sent, the client stays."""
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.send("half typed")
    child.expect_exact("half typed")
    child.sendintr()
    child.expect(NEW_PROMPT)
    assert command(child, "after") == CONFIRMATION + "\n"
    assert bob.wait_for("message")["text"] == "after"
    assert "bye" not in output(child)


def test_ctrl_c_cancels_the_question_of_send(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """Ctrl-C at send's 'receiver id:' (empty or not) cancels send and returns to the prompt."""
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.sendline("send")
    child.expect_exact("receiver id: ")
    child.sendintr()
    child.expect(NEW_PROMPT)
    child.sendline("send")
    child.expect_exact("receiver id: ")
    child.sendline("bob")
    child.expect_exact("message: ")
    child.send("not this")
    child.expect_exact("not this")
    child.sendintr()
    child.expect(NEW_PROMPT)
    assert command(child, "/dm bob this") == CONFIRMATION + "\n"
    assert bob.wait_for("message")["text"] == "this"


def test_ctrl_c_with_text_at_the_menu_asks_again(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """At the mode menu, Ctrl-C on typed text asks again instead of leaving."""
    host, port = server.address
    child = spawn("alice", "--host", host, "--port", str(port), "--no-color")
    child.expect(CHOICE)
    child.send("2")
    child.expect_exact("2")
    child.sendintr()
    child.expect(CHOICE)
    child.sendline("1")
    child.expect_exact(PROMPT)


@pytest.mark.parametrize("key", ["intr", "eof"])
def test_ctrl_c_or_ctrl_d_on_an_empty_prompt_leaves(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer],
        key: str) -> None:
    """Ctrl-C or Ctrl-D on an empty mode-1 prompt tells the server (quit), says bye, exits 0."""
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    if key == "intr":
        child.sendintr()
    else:
        child.sendeof()
    child.expect_exact("bye")
    assert ended(child) == 0
    assert bob.wait_for("notice", event="left")["text"] == "alice is quitting."


def test_ctrl_c_while_viewing_leaves_like_q(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """In mode 2, Ctrl-C leaves as q does: the server is told, exit 0."""
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.sendline("#view")
    child.expect_exact("viewing messages")
    child.sendintr()
    child.expect_exact("bye")
    assert ended(child) == 0
    assert bob.wait_for("notice", event="left")["text"] == "alice is quitting."


# --------------------------------------------------------------------------------------------
# Tab, input history, bell, colours.


def test_tab_completes_a_command(spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """/us then Tab becomes /users, and Enter lists the users."""
    child = typing_client(spawn, server, "alice")
    child.send("/us\t")
    child.expect_exact("/users")
    child.send("\r")
    child.expect(r"id\s+name\s+title\s+company\s+status")
    child.expect_exact(PROMPT)


def test_tab_completes_names_most_recent_speaker_first(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """After bea then bob spoke, @b Tab gives @bob, Tab again @bea; the message goes to bea."""
    bea = viewing_peer(connect, server, "bea")
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.sendline("#view")
    child.expect_exact("viewing messages")
    for peer, text in ((bea, "from bea"), (bob, "from bob")):
        peer.send({"type": "say", "text": text})
        child.expect_exact(text)
    child.send("e")
    child.expect_exact(PROMPT)
    child.send("@b\t")
    child.expect_exact("@bob")
    child.send("\t")
    child.expect_exact("ea")  # readline redraws "@bob" as "@bea" by backing up over "ob"
    assert command(child, " for you") == CONFIRMATION + "\n"
    message = bea.wait_for("message", text="for you")
    assert message["to"]["name"] == "bea"


def test_input_history_is_kept_per_server_and_own_name(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer],
        tmp_path: Path) -> None:
    """A line typed by alice comes back with Up in her next run (file 0600), not in carol's."""
    bob = viewing_peer(connect, server, "bob")
    first = typing_client(spawn, server, "alice")
    command(first, "remember me")
    assert bob.wait_for("message")["text"] == "remember me"
    first.sendline("#quite")
    assert ended(first) == 0
    host, port = server.address
    saved = tmp_path / "history" / f"{host}_{port}" / "alice" / "input.history"
    assert "remember me" in saved.read_text(encoding="utf-8").splitlines()
    assert saved.stat().st_mode & 0o777 == 0o600
    carol = typing_client(spawn, server, "carol")
    carol.send("\x1b[A")  # Up: carol typed nothing before (readline may ring: nothing there)
    assert command(carol, "").strip("\x07\n") == ""
    command(carol, "carol's own")
    assert bob.wait_for("message")["text"] == "carol's own"
    carol.sendline("#quite")
    assert ended(carol) == 0
    again = typing_client(spawn, server, "alice")
    again.send("\x1b[A")
    again.expect_exact("#quite")  # the last line typed comes first
    again.send("\x1b[A")
    again.expect_exact("remember me")
    assert command(again, "") == CONFIRMATION + "\n"
    assert bob.wait_for("message")["text"] == "remember me"


def test_a_message_naming_you_rings_the_bell_in_mode_2(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """'hi Alice' rings (BEL after the line); 'malice' and other text do not; --no-bell never."""
    bob = viewing_peer(connect, server, "bob")
    for args, bells in (((), 2), (("--no-bell",), 0)):
        child = typing_client(spawn, server, "alice", *args)
        child.sendline("#view")
        child.expect_exact("viewing messages")
        for text in ("hello world", "hi Alice!", "malice", "@alice look"):
            bob.send({"type": "say", "text": text})
            child.expect_exact(text)
        child.expect_exact("\r\n")
        child.send("q")
        assert ended(child) == 0
        printed = output(child)
        assert printed.count("\x07") == bells
        if bells:
            assert "bob: hi Alice!\x07\r\n" in printed
            assert "bob: @alice look\x07\r\n" in printed


def test_each_name_has_its_own_stable_colour(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """Names are painted with name_colour(name): carol magenta, erin yellow, in every run."""
    carol = viewing_peer(connect, server, "carol")
    erin = viewing_peer(connect, server, "erin")
    host, port = server.address
    child = spawn("alice", "--host", host, "--port", str(port))
    child.expect(CHOICE)
    child.sendline("2")
    child.expect_exact("viewing messages")
    carol.send({"type": "say", "text": "one"})
    child.expect_exact("one")
    erin.send({"type": "say", "text": "two"})
    child.expect_exact("two")
    child.send("q")
    assert ended(child) == 0
    printed = output(child)
    assert f"{Fore.MAGENTA}{Style.BRIGHT}carol{Style.RESET_ALL}: one" in printed
    assert f"{Fore.YELLOW}{Style.BRIGHT}erin{Style.RESET_ALL}: two" in printed


def test_wrong_arguments_are_explained(spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """/users extra says /users takes no arguments, not that /users is unknown."""
    child = typing_client(spawn, server, "alice")
    assert command(child, "/users extra") == "/users takes no arguments\n"
    assert command(child, "/dm bob") == '/dm bob needs a text: /dm bob "text"\n'


@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "bracketed"])
def test_a_paste_while_viewing_is_not_read_as_keys(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer],
        marked: bool) -> None:
    """In mode 2 a paste (its e and q included) neither switches nor quits nor sends: a hint."""
    bob = viewing_peer(connect, server, "bob")
    child = typing_client(spawn, server, "alice")
    child.sendline("#view")
    child.expect_exact("viewing messages")
    text = "exit now\rplease quit\requally\r"
    child.send(f"\x1b[200~{text}\x1b[201~" if marked else text)
    child.expect_exact("a paste is not read while viewing: press e to type, then paste\r\n")
    bob.send({"type": "say", "text": "still viewing"})
    child.expect_exact("bob: still viewing")
    child.send("q")
    assert ended(child) == 0
    assert "message sent" not in output(child)
    assert bob.wait_for("notice", event="left")["text"] == "alice is quitting."


def test_ctrl_c_with_text_at_the_address_question_asks_again(
        spawn: Callable[..., pexpect.spawn], server: Any) -> None:
    """Ctrl-C on a half-typed address clears it and asks again; the next answer is used."""
    child = spawn("alice", "--no-color")
    child.expect_exact("server address [127.0.0.1]: ")
    child.send("10.9.9.9")
    child.expect_exact("10.9.9.9")
    child.sendintr()
    child.expect_exact("server address [127.0.0.1]: ")
    child.sendline("")
    child.expect_exact("server port [4040]: ")
    child.sendline(str(server.address[1]))
    child.expect(r"welcome alice, your id is \d+")
