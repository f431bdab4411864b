"""Private direct-message logs (SPEC 4.11): a folder per server and own name, a file per peer
name, 0700 and 0600; ``history`` by name or id. Pure tests on a temp folder, then the real
client in a pseudo-terminal.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pexpect
from client_helpers import STAMP, choose_typing, command
from conftest import Peer

from chatsuite.client.history import History, file_name, server_folder

WHEN = datetime(2026, 11, 22, 7, 0, 1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_name_is_one_safe_component() -> None:
    """Names are case-folded and percent-encoded; a leading dot is encoded, so never . or .."""
    assert file_name("Bob") == "bob"
    assert file_name("a/b") == "a%2Fb"
    assert file_name("..") == "%2E."
    assert file_name(".hidden") == "%2Ehidden"
    assert file_name("") == "%00"
    assert server_folder("::1", 4040) == "%3A%3A1_4040"


def test_logs_are_per_own_name_and_private(tmp_path: Path) -> None:
    """alice's log with bob is 0600 in 0700 folders; carol using the same folder never sees it."""
    alice = History(tmp_path, "127.0.0.1", 4040)
    assert alice.record("bob", "hi") is None  # before registration: nothing is written
    assert list(tmp_path.iterdir()) == []
    alice.own_name = "Alice"
    assert alice.record("Bob", "line one") is None
    path = tmp_path / "127.0.0.1_4040" / "alice" / "bob.log"
    assert path.read_text(encoding="utf-8") == "line one\n"
    assert (mode(path), mode(path.parent), mode(path.parent.parent)) == (0o600, 0o700, 0o700)
    assert alice.read("BOB") == ["line one"]
    carol = History(tmp_path, "127.0.0.1", 4040)
    carol.own_name = "carol"
    assert carol.read("bob") == []
    other_server = History(tmp_path, "127.0.0.1", 4041)
    other_server.own_name = "alice"
    assert other_server.read("bob") == []


def test_existing_wide_folders_and_files_are_tightened(tmp_path: Path) -> None:
    """A folder or log left readable by others (an older client, a umask) is made 0700/0600."""
    folder = tmp_path / "h_1" / "alice"
    folder.mkdir(parents=True, mode=0o755)
    os.chmod(folder.parent, 0o755)
    os.chmod(folder, 0o755)
    log = folder / "bob.log"
    log.write_text("old\n", encoding="utf-8")
    os.chmod(log, 0o644)
    history = History(tmp_path, "h", 1)
    history.own_name = "alice"
    assert history.record("bob", "new") is None
    assert (mode(log), mode(folder), mode(folder.parent)) == (0o600, 0o700, 0o700)
    assert history.read("bob") == ["old", "new"]


def test_own_name_change_moves_to_its_folder(tmp_path: Path) -> None:
    """After the own name changes (a re-registration), new logs go to the new name's folder."""
    history = History(tmp_path, "h", 1)
    history.own_name = "user3"
    history.record("bob", "as user3")
    history.own_name = "alice"
    history.record("bob", "as alice")
    assert history.read("bob") == ["as alice"]
    assert (tmp_path / "h_1" / "user3" / "bob.log").read_text(encoding="utf-8") == "as user3\n"


def test_input_history_file_is_private_and_beside_the_logs(tmp_path: Path) -> None:
    """The input history is <server>/<own name>/input.history, created 0600."""
    history = History(tmp_path, "h", 1)
    assert history.input_history() is None
    history.own_name = "alice"
    path = history.input_history()
    assert path == tmp_path / "h_1" / "alice" / "input.history"
    assert mode(path) == 0o600


# --------------------------------------------------------------------------------------------
# The real client.


def typing_client(spawn: Callable[..., pexpect.spawn], server: Any,
                  name: str | None) -> pexpect.spawn:
    """A client registered as ``name`` (None: an automatic name), at the mode-1 prompt."""
    host, port = server.address
    names = [name] if name else []
    child = spawn(*names, "--host", host, "--port", str(port), "--no-color")
    if name is None:
        child.expect_exact("your name (Enter for an automatic one): ")
        child.sendline("")
        child.expect_exact("your job title (Enter for none): ")
        child.sendline("")
        child.expect_exact("your company (Enter for none): ")
        child.sendline("")
    child.expect(r"welcome \S+, your id is \d+")
    return choose_typing(child)


def test_logs_are_not_shown_to_another_own_name(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer],
        tmp_path: Path) -> None:
    """bob's log with alice, on the same history folder, is not shown to carol, by name or id."""
    alice = connect(server)
    alice_id = alice.register("alice")["id"]
    alice.view()
    bob = typing_client(spawn, server, "bob")
    command(bob, "@alice for alice only")
    logged = command(bob, "/history alice").splitlines()
    assert len(logged) == 1
    assert re.fullmatch(f"{STAMP} sent to alice: for alice only", logged[0])
    assert command(bob, f"/history {alice_id}").splitlines() == logged
    bob.sendline("#quite")
    bob.expect(pexpect.EOF)
    carol = typing_client(spawn, server, "carol")
    assert command(carol, "/history alice") == "No History\n"
    assert command(carol, f"/history {alice_id}") == "No History\n"
    host, port = server.address
    folder = tmp_path / "history" / f"{host}_{port}"
    assert not (folder / "carol" / "alice.log").exists()
    assert mode(folder / "bob" / "alice.log") == 0o600
    assert mode(folder / "bob") == 0o700


def test_a_reused_id_never_attaches_the_old_log(
        spawn: Callable[..., pexpect.spawn], server: Any, connect: Callable[..., Peer]) -> None:
    """After bob leaves, history by his old id shows the log of whoever has that id now, by name."""
    bob = connect(server)
    bob_id = bob.register("bob")["id"]
    bob.view()
    alice = typing_client(spawn, server, None)  # an automatic name
    command(alice, "/dm bob to bob")
    bob.send({"type": "quit", "ref": "q"})
    bob.wait_for("bye")
    bob.close()
    dave = connect(server)
    dave_id = dave.register("dave")["id"]
    if dave_id == bob_id:  # the system reused the number: it must mean dave now
        assert command(alice, f"/history {bob_id}") == "No History\n"
    else:
        assert command(alice, f"/history {bob_id}") == (
            f"nobody has the id {bob_id} now; give the name to see the history with someone "
            "who left\n")
    assert re.fullmatch(f"{STAMP} sent to bob: to bob\n", command(alice, "/history bob"))
