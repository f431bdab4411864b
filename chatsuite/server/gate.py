"""Who may enter and who is who (SPEC 7), wired: the server's one ``Gate``.

What it owns: the server password, the accounts (name -> scrypt hash, loaded from the store at
start, written through the store's queue), the login throttle, the admins and the sanctions
(mutes, bans; bans with an end kept in the store). The pure rules are in ``access.py``,
``passwords.py`` and ``moderation.py``; the gate applies them in SPEC 7's order and remembers.

In a cluster (``--redis``) the accounts are shared: the server sets ``on_account_saved``, which
the gate calls after each registration or password change (the backplane hands it to Redis
and the other nodes through its queue), and the backplane hands the gate the accounts it
hears of through ``adopt_account``. The gate knows nothing of the cluster beyond these
hooks; which of two records of one account holds is ``supersedes``. A name whose entry in the
cluster cannot be opened (damaged or forged in Redis) and of which this node has no record is
*disputed* (``dispute_accounts``): it counts as an account, but no password opens it, until a
valid record arrives. When ``adopt_account`` replaces a record by one with another password
hash, ``on_account_replaced`` (set by the server) ends what a login with the old one gave.

Invariants: every refusal is protocol's ``Refusal`` (the handler gives it the request's ``ref``);
scrypt runs only through ``passwords`` (on its hash workers), never while any lock is held, so
a login waits only for its own hash and other clients never wait; the gate's own lock is a leaf
(dict work only), so the room may ask ``is_account`` with the room lock held; a chat thread
never waits for the store (reads happen once, at start).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chatsuite.server.access import For, Throttle, address_key, is_loopback, name_key
from chatsuite.server.memstore import AccountRecord, BanRecord, Store
from chatsuite.server.moderation import Admins, Ban, BanKey, BanKind, Sanctions
from chatsuite.server.passwords import (
    MalformedHash,
    ServerPassword,
    check_password_rule,
    hash_password,
    needs_rehash,
    verify_password,
)
from protocol import Dialect, ErrorCode, Refusal

Log = Callable[[str], None]
AccountSaved = Callable[[AccountRecord, float], None]  # the record, when it was last changed
AccountReplaced = Callable[[str], None]  # the key of an account whose password hash changed


def supersedes(new: AccountRecord, new_changed: float, old: AccountRecord,
               old_changed: float) -> bool:
    """Does ``new`` replace ``old`` (same key)? The earlier registration holds the name (two
    nodes may register it at once, or during an outage); of the same registration (same
    ``created``), the later change; the hash string breaks a tie, so every node picks the same."""
    return ((-new.created, new_changed, new.password_hash)
            > (-old.created, old_changed, old.password_hash))


@dataclass(frozen=True)
class Entry:
    """What a native ``hello`` brings to the gate: the name and the passwords it carries."""

    name: str | None
    server_password: str | None
    password: str | None


def ban_store_key(key: BanKey) -> str:
    """A ban's key as the store keeps it: ``account:alice``, ``address:10.1.2.3``."""
    return f"{key.kind.value}:{key.value}"


def ban_from_store(record: BanRecord) -> Ban | None:
    """A stored ban, or None for a key this server does not read."""
    kind, _, value = record.key.partition(":")
    if kind not in (BanKind.ACCOUNT.value, BanKind.ADDRESS.value) or not value:
        return None
    return Ban(BanKey(BanKind(kind), value), record.until, "an admin")


def host_of(address: str) -> str:
    """The peer's host from the handler's ``host:port`` address string."""
    return address.rsplit(":", 1)[0]


class Gate:
    """The server's rules of SPEC 7, with their state: one per server, shared by every handler."""

    def __init__(self, store: Store, *, server_password: str | None = None,
                 admins: Iterable[str] = (), open_dialects: bool = False,
                 allow_plaintext: bool = False, is_local: Callable[[str], bool] = is_loopback,
                 log: Log = lambda line: None) -> None:
        self.store = store
        self.server_password = ServerPassword(server_password)
        self.admins = Admins(admins)
        self.open_dialects = open_dialects
        self.allow_plaintext = allow_plaintext
        self.is_local = is_local  # the plaintext rule's "loopback?" (tests inject a remote host)
        self.throttle = Throttle(settle_addresses=True)  # see use_clock
        self.wall_clock: Callable[[], float] = time.time  # mutes and bans (they outlive a run)
        self.log = log
        self._lock = threading.Lock()  # guards _accounts and _changed; a leaf: dict work only
        self._accounts: dict[str, AccountRecord] = {r.key: r for r in store.load_accounts()}
        # When each account last changed, for the ones changed or adopted in this run (the store
        # does not keep it): an account only loaded counts as changed when it was created.
        self._changed: dict[str, float] = {}
        # Keys the cluster holds a record of that this node cannot open, with no record here:
        # accounts of unknown password (a Redis writer must not free a name by damaging it).
        self._disputed: set[str] = set()
        self.on_account_saved: AccountSaved | None = None  # set by the server in a cluster
        self.on_account_replaced: AccountReplaced | None = None  # likewise
        bans = [ban_from_store(record) for record in store.load_bans()]
        self.sanctions = Sanctions(ban for ban in bans if ban is not None)

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Run the throttle on ``clock`` (tests); it forgets what it counted."""
        self.throttle = Throttle(clock=clock, settle_addresses=True)

    # -- dialects ---------------------------------------------------------------------------

    def admits(self, dialect: Dialect) -> bool:
        """May a client of this dialect enter? Line and plain clients cannot give the server
        password: with one they are refused unless ``--open-dialects`` (SPEC 7.1)."""
        return (dialect is Dialect.NATIVE or not self.server_password.required
                or self.open_dialects)

    def check_line_entry(self, name: str | None, host: str) -> None:
        """A line or plain login (no password possible): only the bans; an account's name is
        refused at the claim (``check_name``)."""
        self.sanctions.check_may_register(name or "", host, self.wall_clock(),
                                          is_account=name is not None and self.is_account(name))

    # -- accounts -----------------------------------------------------------------------------

    def is_account(self, name: str) -> bool:
        """True when ``name`` (any case) is an account. Cheap: the room asks it under its lock."""
        key = name_key(name)
        with self._lock:
            return key in self._accounts or key in self._disputed

    def _is_disputed(self, name: str) -> bool:
        with self._lock:
            return name_key(name) in self._disputed

    def is_admin(self, name: str, account: str | None) -> bool:
        """True when ``name`` may moderate having proved ``account`` (a restored session's)."""
        return self.admins.may_moderate(name, account)

    def check_name(self, name: str, account: str | None) -> None:
        """Under the room lock, at the claim: ``password-required`` (for the account) when
        ``name`` is an account this connection has not proved (``account``: the one it did)."""
        if self.is_account(name) and (account is None or name_key(account) != name_key(name)):
            raise Refusal(ErrorCode.PASSWORD_REQUIRED,
                          f'"{name}" is an account: give its password.', for_=For.ACCOUNT.value)

    def check_channel(self, *, tls: bool, host: str) -> None:
        """``not-allowed`` unless an account password may travel on this connection (7.2)."""
        if not (tls or self.allow_plaintext or self.is_local(host)):
            raise Refusal(ErrorCode.NOT_ALLOWED,
                          "Account passwords travel only over TLS: reconnect with TLS.")

    def check_entry(self, entry: Entry, *, host: str, tls: bool) -> str | None:
        """Every check of a native ``hello`` that does not resume a session (SPEC 7.1, 7.2):
        bans, the server password, the account's password. Returns the account proved (its
        registered name) or None; raises the ``Refusal`` to answer. A ``hello`` that resumes a
        session skips this whole method: its token stands for both passwords, and it never
        runs scrypt. Called on the connection's own thread, no lock held (it may hash).
        """
        name = entry.name
        record = self._account(name) if name is not None else None
        disputed = record is None and name is not None and self._is_disputed(name)
        self.sanctions.check_may_register(name or "", host, self.wall_clock(),
                                          is_account=record is not None or disputed)
        self._check_server_password(entry.server_password, host)
        if disputed:
            assert name is not None
            if entry.password is None:
                raise Refusal(ErrorCode.PASSWORD_REQUIRED,
                              f'"{name}" is an account: give its password.',
                              for_=For.ACCOUNT.value)
            self.check_channel(tls=tls, host=host)
            # Not counted by the throttle: no password was checked, so none was guessed.
            raise Refusal(ErrorCode.BAD_PASSWORD,
                          f'The account "{name}" cannot be checked now (its record in the '
                          "cluster is damaged): try again later.", for_=For.ACCOUNT.value)
        if record is None:
            if entry.password is not None:
                self.check_channel(tls=tls, host=host)  # SPEC 7.2: a hello carrying password
            return None
        if entry.password is None:
            raise Refusal(ErrorCode.PASSWORD_REQUIRED,
                          f'"{record.name}" is an account: give its password.',
                          for_=For.ACCOUNT.value)
        self.check_channel(tls=tls, host=host)
        self._verify(record, entry.password, host)
        return record.name

    def _check_server_password(self, given: str | None, host: str) -> None:
        server = self.server_password
        if not server.required:
            return
        if given is None:
            server.check(None)  # password-required: nothing was guessed, nothing counted
        # Counted against the address only: a wrong room key says nothing about the name.
        attempt = self.throttle.begin(None, host)
        try:
            server.check(given)
        except Refusal:
            self.throttle.fail(attempt)
            raise
        self.throttle.succeed(attempt)

    def _account(self, name: str) -> AccountRecord | None:
        with self._lock:
            return self._accounts.get(name_key(name))

    def _verify(self, record: AccountRecord, password: str, host: str) -> None:
        """Check an account's password (throttled; scrypt on the hash workers, no lock held)."""
        attempt = self.throttle.begin(record.key, host)
        try:
            right = verify_password(password, record.password_hash)
        except MalformedHash as error:
            self.log(f"account {record.name}: unreadable password hash ({error})")
            right = False
        except BaseException:
            self.throttle.cancel(attempt)  # never checked (the process is ending)
            raise
        if not right:
            self.throttle.fail(attempt)
            raise Refusal(ErrorCode.BAD_PASSWORD, f'Wrong password for "{record.name}".',
                          for_=For.ACCOUNT.value)
        self.throttle.succeed(attempt)
        if needs_rehash(record.password_hash):
            self._store_account(record.key, record.name, hash_password(password),
                                record.created)

    def register(self, name: str, password: str, *, host: str, tls: bool) -> str:
        """``register``: make ``name`` (the member's current name) an account (SPEC 7.2).

        ``not-allowed`` over plain TCP from afar, ``bad-password`` under 8 characters (before
        any hashing), ``name-taken`` when it already is one. Returns the account's name.
        """
        self.check_channel(tls=tls, host=host)
        check_password_rule(password)
        hashed = hash_password(password)  # outside every lock: scrypt on the hash workers
        key = name_key(name)
        with self._lock:
            if key in self._accounts or key in self._disputed:
                raise Refusal(ErrorCode.NAME_TAKEN, f'"{name}" is already an account.')
            record = AccountRecord(key, name, hashed, self.wall_clock())
            self._accounts[key] = record
            self._changed[key] = record.created
        self.store.save_account(record)
        self.log(f"account registered: {name}")
        self._saved(record, record.created)
        return name

    def change_password(self, account: str | None, old: str, new: str, *, host: str,
                        tls: bool) -> None:
        """``password``: change the logged-in account's password (old, then new)."""
        self.check_channel(tls=tls, host=host)
        record = self._account(account) if account is not None else None
        if record is None:
            raise Refusal(ErrorCode.NOT_ALLOWED,
                          'Only an account has a password: "register" one first.')
        check_password_rule(new)
        self._verify(record, old, host)
        self._store_account(record.key, record.name, hash_password(new), record.created)
        self.log(f"account password changed: {record.name}")

    def _store_account(self, key: str, name: str, hashed: str, created: float) -> None:
        record = AccountRecord(key, name, hashed, created)
        # Later than any change known of it, even with a clock that stepped back.
        changed = max(self.wall_clock(), self._changed_at(key, created) + 0.001)
        with self._lock:
            if key not in self._accounts:
                return  # removed meanwhile: do not bring it back
            self._accounts[key] = record
            self._changed[key] = changed
        self.store.save_account(record)
        self._saved(record, changed)

    def _changed_at(self, key: str, created: float) -> float:
        with self._lock:
            return self._changed.get(key, created)

    def _saved(self, record: AccountRecord, changed: float) -> None:
        if self.on_account_saved is not None:
            self.on_account_saved(record, changed)

    def adopt_account(self, record: AccountRecord, changed: float) -> bool:
        """An account heard of from the cluster: kept (and stored, not announced again) unless
        this node has the same or a record that ``supersedes`` it. True when it was kept.

        A valid record ends a dispute of its key. When it replaces a record with another
        password hash, ``on_account_replaced`` is told (after the lock): a login with the old
        record (stale, or a conflicting registration) must not keep what it gave."""
        with self._lock:
            old = self._accounts.get(record.key)
            if old is not None and not supersedes(
                    record, changed, old, self._changed.get(old.key, old.created)):
                return False
            self._accounts[record.key] = record
            self._changed[record.key] = changed
            self._disputed.discard(record.key)
        self.store.save_account(record)
        if (old is not None and old.password_hash != record.password_hash
                and self.on_account_replaced is not None):
            self.on_account_replaced(record.key)
        return True

    def dispute_accounts(self, keys: Iterable[str]) -> list[str]:
        """The keys whose entry in the cluster cannot be opened now (each snapshot gives them
        all): those with no record here are disputed, every other dispute ends. Returns the
        newly disputed keys (to log once)."""
        with self._lock:
            disputed = {key for key in keys if key not in self._accounts}
            new = sorted(disputed - self._disputed)
            self._disputed = disputed
        return new

    def account_version(self, key: str) -> tuple[AccountRecord, float] | None:
        """The account of ``key`` with when it last changed, or None."""
        with self._lock:
            record = self._accounts.get(key)
            return None if record is None else (record, self._changed.get(key, record.created))

    def account_versions(self) -> list[tuple[AccountRecord, float]]:
        """Every account with when it last changed (as ``adopt_account`` compares them)."""
        with self._lock:
            return [(record, self._changed.get(key, record.created))
                    for key, record in self._accounts.items()]

    # -- sanctions ----------------------------------------------------------------------------

    def check_may_speak(self, name: str) -> None:
        """``muted`` when ``name`` may not say or dm now."""
        self.sanctions.check_may_speak(name, self.wall_clock())

    def ban(self, key: BanKey, minutes: object, *, by: str, reason: str | None) -> Ban:
        """Ban ``key``; a ban with an end is kept in the store (one until the server stops is
        not: it must not outlive this run)."""
        ban = self.sanctions.ban(key, self.wall_clock(), minutes, by=by, reason=reason)
        if ban.until is not None:
            self.store.save_ban(BanRecord(ban_store_key(key), ban.until))
        else:
            self.store.delete_ban(ban_store_key(key))  # an older timed ban must not come back
        return ban

    def ban_key_for(self, name: str, address: str) -> BanKey:
        """What banning the member ``name`` at ``address`` holds: its account, else its address."""
        if self.is_account(name):
            return BanKey(BanKind.ACCOUNT, name_key(name))
        return BanKey(BanKind.ADDRESS, address_key(host_of(address)))
