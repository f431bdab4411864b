"""Admins and sanctions (SPEC 7.3), pure: who may moderate, mutes and bans with until-times.

Invariant: every decision takes the time as an argument (wall-clock seconds: bans outlive a
restart), and every refusal is an ``access.Refusal`` with the SPEC's code.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from chatsuite.server.access import Code, Refusal, address_key, name_key

# --------------------------------------------------------------------------------------------
# Admins and sanctions (7.3).

MUTE_MINUTES = 10
"""SPEC 7.3: ``mute`` without ``minutes`` lasts 10 minutes."""
MAX_MINUTES = 366 * 24 * 60
"""A year: longer is a typo; a ban without ``minutes`` lasts until the server stops anyway."""


class Action(str, Enum):
    """The moderation requests; the value is the request's ``type``."""

    KICK = "kick"
    MUTE = "mute"
    UNMUTE = "unmute"
    BAN = "ban"


class Admins:
    """The ``--admin`` names, compared without regard to case. Immutable once made."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._keys = frozenset(name_key(name) for name in names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name_key(name) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def may_moderate(self, name: str, account: str | None) -> bool:
        """True when ``name`` is an admin and this session logged in as that very account.

        ``account``: the account this session proved its password for (or resumed a session
        that had), None otherwise. An admin's name taken before the account exists, or under
        ``--store none`` after a restart, moderates nothing until its password is proved.
        """
        return name in self and account is not None and name_key(account) == name_key(name)

    def authorize(self, name: str, account: str | None, action: Action, target: str) -> None:
        """``not-allowed`` unless this member may do ``action``, and not to itself."""
        if not self.may_moderate(name, account):
            raise Refusal(Code.NOT_ALLOWED, f"Only an admin logged in with its password may "
                                            f"{action.value}.")
        if name_key(target) == name_key(name):
            raise Refusal(Code.NOT_ALLOWED, f"An admin cannot {action.value} itself.")


def _minutes(value: object, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MINUTES:
        raise Refusal(Code.BAD_REQUEST,
                      f"minutes must be a whole number from 1 to {MAX_MINUTES}.")
    return value


def mute_until(now: float, minutes: object = None) -> float:
    """When a mute given at ``now`` ends (``minutes`` from the request; default 10)."""
    m = _minutes(minutes, MUTE_MINUTES)
    assert m is not None
    return now + 60.0 * m


def ban_until(now: float, minutes: object = None) -> float | None:
    """When a ban given at ``now`` ends; None (no ``minutes``): when the server stops."""
    m = _minutes(minutes, None)
    return None if m is None else now + 60.0 * m


class BanKind(str, Enum):
    """What a ban holds: an account (by name) or, for an unregistered name, an address."""

    ACCOUNT = "account"
    ADDRESS = "address"


@dataclass(frozen=True)
class BanKey:
    """What is banned: ``kind`` and its key (a case-folded name, or an ``address_key``)."""

    kind: BanKind
    value: str


def ban_key(name: str, host: str, *, is_account: bool) -> BanKey:
    """The key a ban on this member holds: its account, else its address (SPEC 7.3)."""
    if is_account:
        return BanKey(BanKind.ACCOUNT, name_key(name))
    return BanKey(BanKind.ADDRESS, address_key(host))


@dataclass(frozen=True)
class Mute:
    """``name`` (case-folded) may not ``say`` or ``dm`` until ``until``."""

    name: str
    until: float
    by: str
    reason: str | None = None


@dataclass(frozen=True)
class Ban:
    """``key`` may not register until ``until`` (None: until the server stops)."""

    key: BanKey
    until: float | None
    by: str
    reason: str | None = None

    def active(self, now: float) -> bool:
        """True while the ban holds."""
        return self.until is None or now < self.until


def _ban_left(ban: Ban, now: float) -> str:
    if ban.until is None:
        return "until the server stops"
    left = max(1, math.ceil((ban.until - now) / 60))
    return f"for {left} more minute{'' if left == 1 else 's'}"


class Sanctions:
    """The mutes and bans in force. Thread-safe (one leaf lock: it never calls out).

    Times are the caller's clock; bans outlive a restart in the store, so use wall-clock time
    (``time.time``) for both. Expired entries are dropped when they are looked at or listed.
    """

    def __init__(self, bans: Iterable[Ban] = ()) -> None:
        self._lock = threading.Lock()  # guards both dicts
        self._mutes: dict[str, Mute] = {}
        self._bans: dict[BanKey, Ban] = {ban.key: ban for ban in bans}

    def mute(self, name: str, now: float, minutes: object = None, *, by: str,
             reason: str | None = None) -> Mute:
        """Mute ``name`` (``minutes``: default 10); a new mute replaces an old one."""
        mute = Mute(name_key(name), mute_until(now, minutes), by, reason)
        with self._lock:
            self._mutes[mute.name] = mute
        return mute

    def unmute(self, name: str) -> Mute | None:
        """Lift ``name``'s mute; the mute lifted, or None if there was none."""
        with self._lock:
            return self._mutes.pop(name_key(name), None)

    def is_muted(self, name: str, now: float) -> Mute | None:
        """The mute holding ``name`` at ``now``, or None."""
        key = name_key(name)
        with self._lock:
            mute = self._mutes.get(key)
            if mute is not None and now >= mute.until:
                del self._mutes[key]
                return None
            return mute

    def check_may_speak(self, name: str, now: float) -> None:
        """``muted`` when ``name`` may not ``say`` or ``dm`` now."""
        mute = self.is_muted(name, now)
        if mute is not None:
            left = max(1, math.ceil((mute.until - now) / 60))
            raise Refusal(Code.MUTED, f"You are muted by {mute.by} for {left} more minute"
                                      f"{'' if left == 1 else 's'}.")

    def ban(self, key: BanKey, now: float, minutes: object = None, *, by: str,
            reason: str | None = None) -> Ban:
        """Ban ``key`` (``minutes``: default until the server stops); replaces an older ban."""
        ban = Ban(key, ban_until(now, minutes), by, reason)
        with self._lock:
            self._bans[key] = ban
        return ban

    def is_banned(self, key: BanKey, now: float) -> Ban | None:
        """The ban holding ``key`` at ``now``, or None."""
        with self._lock:
            ban = self._bans.get(key)
            if ban is not None and not ban.active(now):
                del self._bans[key]
                return None
            return ban

    def check_may_register(self, name: str, host: str, now: float, *, is_account: bool) -> None:
        """``banned`` when this ``hello`` may not register: an account by its own ban, any
        other name by its address's. An address ban keeps anonymous names out; the accounts
        behind the same address (a school's NAT: the teacher, the other students) still log in
        with their passwords, which the caller checks next."""
        if is_account:
            key = BanKey(BanKind.ACCOUNT, name_key(name))
        else:
            key = BanKey(BanKind.ADDRESS, address_key(host))
        ban = self.is_banned(key, now)
        if ban is not None:
            raise Refusal(Code.BANNED, f"You are banned from this room by {ban.by} "
                                       f"{_ban_left(ban, now)}.")

    def bans(self, now: float) -> list[Ban]:
        """The bans in force at ``now`` (for the store), dropping those that ended."""
        with self._lock:
            for key in [k for k, ban in self._bans.items() if not ban.active(now)]:
                del self._bans[key]
            return list(self._bans.values())
