"""The pure access rules of SPEC 7: hashes, server password, throttle, plaintext rule, admins."""

from __future__ import annotations

import base64
import hashlib
import threading
from pathlib import Path

import pytest

from chatsuite.server.access import (
    MAX_TRACKED,
    Code,
    For,
    Refusal,
    Throttle,
    address_key,
    check_channel,
    is_loopback,
    may_carry_password,
)
from chatsuite.server.moderation import (
    Action,
    Admins,
    Ban,
    BanKey,
    BanKind,
    Sanctions,
    ban_key,
    ban_until,
    mute_until,
)
from chatsuite.server.passwords import (
    DEFAULT_PARAMS,
    HASH_WORKERS,
    MAX_SCRYPT_MEMORY,
    MalformedHash,
    ScryptParams,
    ServerPassword,
    check_password_rule,
    hash_password,
    load_server_password,
    needs_rehash,
    parse_hash,
    verify_password,
)

# Cheap parameters for tests that are about the format, not the cost.
FAST = ScryptParams(n=1 << 4, r=8, p=1)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def refusal(code: Code, message: str, for_: For | None = None,
            retry_after: int | None = None) -> Refusal:
    return Refusal(code, message, for_=for_, retry_after=retry_after)


# --------------------------------------------------------------------------------------------
# Hashes.


def test_hash_round_trip_with_default_params() -> None:
    """A password hashed with the default parameters verifies, and the string names them."""
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$n=16384,r=8,p=1$")
    parsed = parse_hash(stored)
    assert (len(parsed.salt), len(parsed.key)) == (16, 32)
    assert verify_password("correct horse", stored) is True


def test_wrong_password_does_not_verify() -> None:
    """Another password, another case, or a prefix does not verify."""
    stored = hash_password("correct horse", FAST)
    assert verify_password("correct horsf", stored) is False
    assert verify_password("Correct horse", stored) is False
    assert verify_password("correct hors", stored) is False


def test_salt_differs_each_time() -> None:
    """The same password hashed twice gives two different salts and keys, both verifying."""
    a, b = hash_password("same password", FAST), hash_password("same password", FAST)
    assert parse_hash(a).salt != parse_hash(b).salt
    assert parse_hash(a).key != parse_hash(b).key
    assert verify_password("same password", a) and verify_password("same password", b)


def test_verify_uses_the_parameters_stored_with_the_hash() -> None:
    """A hash made with other parameters verifies with those, and is flagged for rehashing."""
    stored = hash_password("old account", FAST)
    assert stored.startswith("scrypt$n=16,r=8,p=1$")
    salt = parse_hash(stored).salt
    expected = hashlib.scrypt(b"old account", salt=salt, n=16, r=8, p=1, dklen=32)
    assert parse_hash(stored).key == expected
    assert verify_password("old account", stored) is True
    assert needs_rehash(stored) is True
    assert needs_rehash(hash_password("new account")) is False


def test_hand_built_hash_with_other_key_length_verifies() -> None:
    """A stored string built by hand (n=32, r=4, p=2, 24-byte key) verifies with its own values."""
    salt = b"0123456789abcdef"
    key = hashlib.scrypt(b"hand built", salt=salt, n=32, r=4, p=2, dklen=24)
    b64 = base64.b64encode
    stored = f"scrypt$n=32,r=4,p=2${b64(salt).decode()}${b64(key).decode()}"
    assert verify_password("hand built", stored) is True
    assert verify_password("hand builT", stored) is False


def test_unicode_passwords_are_compared_in_nfc() -> None:
    """An accented password typed composed or decomposed is the same password."""
    stored = hash_password("caf\u00e9 au lait", FAST)
    assert verify_password("cafe\u0301 au lait", stored) is True


GOOD = hash_password("well formed", FAST)
_, _PARAMS, _SALT, _KEY = GOOD.split("$")


@pytest.mark.parametrize("stored", [
    "",
    "plain text password",
    "bcrypt$n=16,r=8,p=1$" + _SALT + "$" + _KEY,
    f"scrypt${_PARAMS}${_SALT}",
    f"scrypt${_PARAMS}${_SALT}${_KEY}$extra",
    f"scrypt$n=16,r=8${_SALT}${_KEY}",
    f"scrypt$n=16,r=8,p=1,x=2${_SALT}${_KEY}",
    f"scrypt$n=16,n=16,r=8${_SALT}${_KEY}",
    f"scrypt$n=15,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=1,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=0,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=16,r=0,p=1${_SALT}${_KEY}",
    f"scrypt$n=16,r=8,p=0${_SALT}${_KEY}",
    f"scrypt$n=16,r=8,p=17${_SALT}${_KEY}",
    f"scrypt$n=-16,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=+16,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=1_6,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=\u0661\u0666,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=32768,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=16384,r=9,p=1${_SALT}${_KEY}",
    f"scrypt$n=1099511627776,r=8,p=1${_SALT}${_KEY}",
    f"scrypt$n=99999999999,r=8,p=1${_SALT}${_KEY}",
    f"scrypt${_PARAMS}$not*base64${_KEY}",
    f"scrypt${_PARAMS}${_SALT}$\u00e9\u00e9\u00e9\u00e9",
    f"scrypt${_PARAMS}${base64.b64encode(b'short').decode()}${_KEY}",
    f"scrypt${_PARAMS}${_SALT}${base64.b64encode(b'k' * 8).decode()}",
    f"scrypt${_PARAMS}${_SALT}${base64.b64encode(b'k' * 65).decode()}",
    f"scrypt${_PARAMS}${_SALT}${_KEY}" + "A" * 600,
])
def test_malformed_stored_strings_are_refused(stored: str) -> None:
    """A corrupt, foreign or over-bound stored string raises MalformedHash before any hashing."""
    with pytest.raises(MalformedHash):
        verify_password("well formed", stored)


def test_the_well_formed_control_string_verifies() -> None:
    """The string the malformed cases are cut from verifies (so each case fails for its fault)."""
    assert verify_password("well formed", f"scrypt${_PARAMS}${_SALT}${_KEY}") is True


def test_default_params_fit_the_memory_bound_exactly() -> None:
    """128*r*n is 16 MiB; scrypt runs with maxmem and refuses with one byte less."""
    p = DEFAULT_PARAMS
    assert 128 * p.r * p.n == MAX_SCRYPT_MEMORY == 16 * 1024 * 1024
    assert p.maxmem == 16 * 1024 * 1024 + 3 * 1024
    hashlib.scrypt(b"x", salt=b"s" * 16, n=p.n, r=p.r, p=p.p, maxmem=p.maxmem, dklen=32)
    with pytest.raises(ValueError, match="memory limit exceeded"):
        hashlib.scrypt(b"x", salt=b"s" * 16, n=p.n, r=p.r, p=p.p, maxmem=p.maxmem - 1, dklen=32)


def test_params_over_the_bound_are_refused_for_new_hashes() -> None:
    """hash_password refuses parameters past 16 MiB instead of spending the memory."""
    with pytest.raises(ValueError, match="16 MiB"):
        hash_password("long enough", ScryptParams(n=1 << 15, r=8, p=1))


def test_password_rule() -> None:
    """Fewer than 8 or more than 1024 characters is bad-password for the account."""
    check_password_rule("12345678")
    check_password_rule("x" * 1024)
    with pytest.raises(Refusal) as short:
        hash_password("1234567")
    assert short.value == refusal(Code.BAD_PASSWORD, "A password needs at least 8 characters.",
                                  For.ACCOUNT)
    assert short.value.fields() == {"code": "bad-password", "for": "account",
                                    "message": "A password needs at least 8 characters."}
    with pytest.raises(Refusal) as long:
        check_password_rule("x" * 1025)
    assert long.value == refusal(Code.BAD_PASSWORD, "A password has at most 1024 characters.",
                                 For.ACCOUNT)


def test_overlong_password_never_verifies() -> None:
    """A password past the maximum is simply wrong (it could never have been registered)."""
    assert verify_password("x" * 1025, GOOD) is False


# --------------------------------------------------------------------------------------------
# The server password.


def test_server_password_from_file_first_line(tmp_path: Path) -> None:
    """The file's first line without its line ending (CRLF too) is the password; env is ignored."""
    f = tmp_path / "pw"
    f.write_bytes(b" room key \r\nsecond line\n")
    assert load_server_password(f, {"CHAT_PASSWORD": "env"}) == " room key "
    f.write_text("no newline")
    assert load_server_password(str(f), {}) == "no newline"


def test_server_password_file_with_empty_first_line_is_an_error(tmp_path: Path) -> None:
    """An empty first line is a configuration error, not an open server."""
    f = tmp_path / "pw"
    f.write_text("\nsecret\n")
    with pytest.raises(ValueError, match="empty"):
        load_server_password(f, {})


def test_server_password_from_environment() -> None:
    """Without a file, CHAT_PASSWORD is the password; empty or absent means none."""
    assert load_server_password(None, {"CHAT_PASSWORD": "env key"}) == "env key"
    assert load_server_password(None, {"CHAT_PASSWORD": ""}) is None
    assert load_server_password(None, {}) is None


def test_server_password_decisions() -> None:
    """Not needed: anything passes; needed: missing is password-required, wrong is bad-password."""
    open_server = ServerPassword(None)
    assert open_server.required is False
    open_server.check(None)
    open_server.check("whatever")

    gate = ServerPassword("room key")
    assert gate.required is True
    gate.check("room key")
    with pytest.raises(Refusal) as missing:
        gate.check(None)
    assert missing.value == refusal(Code.PASSWORD_REQUIRED, "This server needs its password.",
                                    For.SERVER)
    assert missing.value.fields()["for"] == "server"
    for wrong in ("room ke", "room key ", "Room key", ""):
        with pytest.raises(Refusal) as bad:
            gate.check(wrong)
        assert bad.value == refusal(Code.BAD_PASSWORD, "That is not the server's password.",
                                    For.SERVER)


# --------------------------------------------------------------------------------------------
# The plaintext rule.


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True),
    ("127.8.9.10", True),
    ("::1", True),
    ("[::1]", True),
    ("::ffff:127.0.0.1", True),
    ("::ffff:127.1.2.3", True),
    ("10.0.0.5", False),
    ("192.168.1.20", False),
    ("::ffff:10.0.0.5", False),
    ("2001:db8::1", False),
    ("fe80::1%eth0", False),
    ("::", False),
    ("0.0.0.0", False),
    ("localhost", False),
    ("", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    """Only 127/8, ::1 and IPv4-mapped 127/8 are loopback; names and junk are not."""
    assert is_loopback(host) is loopback


def test_plaintext_rule() -> None:
    """A password may travel over TLS or loopback; plain TCP from afar only with the opt-in."""
    assert may_carry_password(tls=True, host="10.0.0.5", allow_plaintext=False) is True
    assert may_carry_password(tls=False, host="127.0.0.1", allow_plaintext=False) is True
    assert may_carry_password(tls=False, host="::ffff:127.0.0.1", allow_plaintext=False) is True
    assert may_carry_password(tls=False, host="10.0.0.5", allow_plaintext=False) is False
    assert may_carry_password(tls=False, host="2001:db8::1", allow_plaintext=False) is False
    assert may_carry_password(tls=False, host="10.0.0.5", allow_plaintext=True) is True
    check_channel(tls=False, host="::1", allow_plaintext=False)
    with pytest.raises(Refusal) as exc:
        check_channel(tls=False, host="10.0.0.5", allow_plaintext=False)
    assert exc.value == refusal(Code.NOT_ALLOWED,
                                "Account passwords travel only over TLS: reconnect with TLS.")


def test_address_keys() -> None:
    """IPv4 keys as itself (mapped too); IPv6 as its /64; anything else as given."""
    assert address_key("10.0.0.5") == "10.0.0.5"
    assert address_key("::ffff:10.0.0.5") == "10.0.0.5"
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert address_key("somewhere") == "somewhere"


# --------------------------------------------------------------------------------------------
# The throttle.


def too_many(retry_after: int) -> Refusal:
    return refusal(Code.TOO_MANY_ATTEMPTS,
                   f"Too many failed attempts; try again in {retry_after} s.",
                   retry_after=retry_after)


def test_five_failures_per_name_then_refusal_with_exact_retry_after() -> None:
    """Five failures for one name from five addresses: the sixth waits until the first expires."""
    clock = FakeClock(1000.0)
    throttle = Throttle(clock=clock)
    for i in range(5):
        throttle.begin("teacher", f"10.0.0.{i}")
        clock.now += 2.5  # failures at 1000, 1002.5, ..., 1010
    clock.now = 1030.2
    with pytest.raises(Refusal) as exc:
        throttle.begin("teacher", "10.0.0.99")
    assert exc.value == too_many(30)  # the first failure expires at 1060: 29.8 s, rounded up
    assert exc.value.fields() == {"code": "too-many-attempts", "retry_after": 30,
                                  "message": "Too many failed attempts; try again in 30 s."}
    throttle.begin("student", "10.0.0.99")  # another name from that address is fine


def test_names_are_throttled_without_regard_to_case() -> None:
    """Failures for Teacher, TEACHER and teacher count together."""
    clock = FakeClock()
    throttle = Throttle(clock=clock)
    for i, name in enumerate(["Teacher", "TEACHER", "teacher", "tEacher", "teacheR"]):
        throttle.begin(name, f"10.0.1.{i}")
    with pytest.raises(Refusal) as exc:
        throttle.begin("TeAcHeR", "10.0.1.50")
    assert exc.value == too_many(60)


def test_five_failures_per_address_then_refusal() -> None:
    """Five failures from one address under five names: the sixth name is refused too."""
    clock = FakeClock()
    throttle = Throttle(clock=clock)
    for i in range(5):
        throttle.begin(f"name{i}", "192.0.2.7")
        clock.now += 1
    with pytest.raises(Refusal) as exc:
        throttle.begin("fresh", "192.0.2.7")
    assert exc.value == too_many(55)  # failures at 1000..1004, now 1005: the first ends at 1060
    with pytest.raises(Refusal):
        throttle.begin(None, "::ffff:192.0.2.7")  # a server-password attempt: same address
    throttle.begin("fresh", "192.0.2.8")


def test_ipv6_addresses_in_one_slash_64_count_together() -> None:
    """Five failures from five addresses of one IPv6 /64 block the whole /64."""
    throttle = Throttle(clock=FakeClock())
    for i in range(5):
        throttle.begin(f"n{i}", f"2001:db8:0:1::{i + 1}")
    with pytest.raises(Refusal):
        throttle.begin("other", "2001:db8:0:1:ffff::1")
    throttle.begin("other", "2001:db8:0:2::1")


def test_recovery_after_the_window() -> None:
    """A minute after the first failure one attempt is allowed; failing it blocks again."""
    clock = FakeClock(0.0)
    throttle = Throttle(clock=clock)
    for t in (0.0, 10.0, 20.0, 30.0, 40.0):
        clock.now = t
        throttle.begin("alice", "10.0.0.1")
    clock.now = 59.999
    with pytest.raises(Refusal) as exc:
        throttle.begin("alice", "10.0.0.1")
    assert exc.value.retry_after == 1
    clock.now = 60.0
    throttle.begin("alice", "10.0.0.1")  # allowed, and it fails (no call needed)
    with pytest.raises(Refusal) as again:
        throttle.begin("alice", "10.0.0.1")
    assert again.value == too_many(10)  # now the failure at 10.0 is the oldest of the last five
    clock.now = 200.0
    throttle.begin("alice", "10.0.0.1")


def test_refused_attempts_do_not_extend_the_block() -> None:
    """Hammering while blocked does not push retry_after further away."""
    clock = FakeClock(0.0)
    throttle = Throttle(clock=clock)
    for _ in range(5):
        throttle.begin("bob", "10.0.0.2")
    for t in range(1, 60):
        clock.now = float(t)
        with pytest.raises(Refusal) as exc:
            throttle.begin("bob", "10.0.0.2")
        assert exc.value.retry_after == 60 - t
    clock.now = 60.0
    throttle.begin("bob", "10.0.0.2")


def test_success_clears_the_name_but_not_the_address() -> None:
    """A right password forgets the name's failures; the address keeps its other failures."""
    throttle = Throttle(clock=FakeClock())
    for _ in range(4):
        throttle.begin("carol", "10.0.0.3")
    attempt = throttle.begin("carol", "10.0.0.3")
    throttle.succeed(attempt)
    for _ in range(4):
        throttle.begin("carol", "10.0.0.4")  # the name starts from zero
    throttle.begin("dave", "10.0.0.3")  # the address had 4 failures (the success taken back)
    with pytest.raises(Refusal):
        throttle.begin("eve", "10.0.0.3")


def test_cancel_takes_the_attempt_back_from_both() -> None:
    """An attempt that never reached a password check does not count."""
    throttle = Throttle(clock=FakeClock())
    for _ in range(10):
        throttle.cancel(throttle.begin("frank", "10.0.0.5"))
    assert throttle.tracked() == (0, 0)
    for _ in range(5):
        throttle.begin("frank", "10.0.0.5")
    with pytest.raises(Refusal):
        throttle.begin("frank", "10.0.0.6")


def test_concurrent_attempts_cannot_slip_past_the_count() -> None:
    """30 threads guessing one name at once: exactly 5 get to try."""
    throttle = Throttle(clock=FakeClock())
    barrier = threading.Barrier(30)
    allowed: list[int] = []

    def guess(i: int) -> None:
        barrier.wait()
        try:
            throttle.begin("teacher", f"10.1.0.{i}")
        except Refusal:
            return
        allowed.append(i)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(allowed) == 5


def test_flood_of_distinct_names_keeps_memory_bounded() -> None:
    """100,000 distinct names and addresses failing within a minute: each table stays capped."""
    clock = FakeClock(0.0)
    throttle = Throttle(clock=clock)
    for i in range(100_000):
        clock.now = i * 0.0005  # all within 50 s: nothing expires, the cap does the work
        throttle.begin(f"n{i}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert throttle.tracked() == (MAX_TRACKED, MAX_TRACKED) == (10_000, 10_000)
    # The newest entries are the ones kept: the last name is still counted.
    for _ in range(4):
        throttle.begin("n99999", "10.200.0.1")
    with pytest.raises(Refusal):
        throttle.begin("n99999", "10.200.0.2")


def test_expired_entries_are_pruned() -> None:
    """Entries whose failures are over a minute old are dropped when later failures arrive."""
    clock = FakeClock(0.0)
    throttle = Throttle(clock=clock)
    for i in range(500):
        throttle.begin(f"old{i}", f"10.2.{i >> 8}.{i & 255}")
    assert throttle.tracked() == (500, 500)
    clock.now = 61.0
    throttle.begin("new", "10.3.0.1")
    assert throttle.tracked() == (1, 1)


# --------------------------------------------------------------------------------------------
# Admins, mutes and bans.


def test_who_may_moderate() -> None:
    """Only an --admin name logged in as that very account (any case) may moderate."""
    admins = Admins(["Teacher", "aide"])
    assert "teacher" in admins and "AIDE" in admins and "student" not in admins
    assert len(admins) == 2
    assert admins.may_moderate("teacher", "Teacher") is True
    assert admins.may_moderate("TEACHER", "teacher") is True
    assert admins.may_moderate("teacher", None) is False  # took the name without its password
    assert admins.may_moderate("teacher", "aide") is False
    assert admins.may_moderate("student", "student") is False
    assert Admins().may_moderate("teacher", "teacher") is False


def test_authorize_refuses_with_not_allowed() -> None:
    """A non-admin, an admin without its password, and an admin on itself get not-allowed."""
    admins = Admins(["teacher"])
    admins.authorize("teacher", "teacher", Action.KICK, "student")
    for name, account, action in [("student", "student", Action.KICK),
                                  ("teacher", None, Action.BAN)]:
        with pytest.raises(Refusal) as exc:
            admins.authorize(name, account, action, "bob")
        assert exc.value == refusal(
            Code.NOT_ALLOWED, f"Only an admin logged in with its password may {action.value}.")
    with pytest.raises(Refusal) as self_ban:
        admins.authorize("teacher", "teacher", Action.BAN, "TEACHER")
    assert self_ban.value == refusal(Code.NOT_ALLOWED, "An admin cannot ban itself.")


def test_mute_and_ban_durations() -> None:
    """Mute defaults to 10 minutes, ban to until the server stops; minutes must be 1..a year."""
    assert mute_until(100.0) == 700.0
    assert mute_until(100.0, 3) == 280.0
    assert ban_until(100.0) is None
    assert ban_until(100.0, 2) == 220.0
    for bad in (0, -1, 1.5, "5", True, 366 * 24 * 60 + 1):
        with pytest.raises(Refusal) as exc:
            mute_until(0.0, bad)
        assert exc.value.code is Code.BAD_REQUEST
        with pytest.raises(Refusal):
            ban_until(0.0, bad)


def test_mute_holds_until_its_time_and_unmute_lifts_it() -> None:
    """A muted name (any case) is refused with muted until the time, then speaks again."""
    clock = FakeClock(1000.0)
    sanctions = Sanctions()
    mute = sanctions.mute("Bob", clock(), by="teacher", reason="flooding")
    assert mute.name == "bob" and mute.until == 1600.0
    assert sanctions.is_muted("BOB", 1599.9) == mute
    with pytest.raises(Refusal) as exc:
        sanctions.check_may_speak("bob", 1000.0)
    assert exc.value == refusal(Code.MUTED, "You are muted by teacher for 10 more minutes.")
    with pytest.raises(Refusal) as last:
        sanctions.check_may_speak("bob", 1570.0)
    assert last.value.message == "You are muted by teacher for 1 more minute."
    sanctions.check_may_speak("alice", 1000.0)
    assert sanctions.is_muted("bob", 1600.0) is None
    sanctions.check_may_speak("bob", 1600.0)
    sanctions.mute("bob", 2000.0, 5, by="teacher")
    assert sanctions.unmute("BOB") is not None
    assert sanctions.unmute("bob") is None
    sanctions.check_may_speak("bob", 2001.0)


def test_ban_keys() -> None:
    """An account is banned by its case-folded name; an unregistered name by its address."""
    assert ban_key("Bob", "10.0.0.9", is_account=True) == BanKey(BanKind.ACCOUNT, "bob")
    assert ban_key("Bob", "10.0.0.9", is_account=False) == BanKey(BanKind.ADDRESS, "10.0.0.9")
    assert ban_key("x", "2001:db8::7", is_account=False) == BanKey(BanKind.ADDRESS,
                                                                   "2001:db8::/64")


def test_account_ban_until_the_server_stops() -> None:
    """A ban without minutes holds the account at any time, from any address, in any case."""
    sanctions = Sanctions()
    ban = sanctions.ban(BanKey(BanKind.ACCOUNT, "bob"), 0.0, by="teacher")
    assert ban == Ban(BanKey(BanKind.ACCOUNT, "bob"), None, "teacher")
    assert sanctions.is_banned(BanKey(BanKind.ACCOUNT, "bob"), 1e12) == ban
    with pytest.raises(Refusal) as exc:
        sanctions.check_may_register("BOB", "10.9.9.9", 5.0, is_account=True)
    assert exc.value == refusal(Code.BANNED,
                                "You are banned from this room by teacher until the server stops.")
    sanctions.check_may_register("alice", "10.9.9.9", 5.0, is_account=True)


def test_address_ban_for_minutes_then_lifted() -> None:
    """An address ban holds any name that is no account from that address until its time;
    an account is judged by its own bans (its password is checked next)."""
    sanctions = Sanctions()
    sanctions.ban(ban_key("guest", "10.0.0.9", is_account=False), 100.0, 2, by="teacher")
    with pytest.raises(Refusal) as exc:
        sanctions.check_may_register("other", "::ffff:10.0.0.9", 150.0, is_account=False)
    assert exc.value == refusal(Code.BANNED,
                                "You are banned from this room by teacher for 2 more minutes.")
    # Not an account's owner behind the same address (a school's NAT): only its own ban would.
    sanctions.check_may_register("alice", "10.0.0.9", 150.0, is_account=True)
    sanctions.check_may_register("other", "10.0.0.10", 150.0, is_account=False)
    sanctions.check_may_register("other", "10.0.0.9", 220.0, is_account=False)
    assert sanctions.bans(220.0) == []


def test_bans_round_trip_through_the_store_form() -> None:
    """bans() lists the bans in force, and a new Sanctions made from them holds the same."""
    sanctions = Sanctions()
    forever = sanctions.ban(BanKey(BanKind.ACCOUNT, "bob"), 0.0, by="teacher", reason="rude")
    sanctions.ban(BanKey(BanKind.ADDRESS, "10.0.0.1"), 0.0, 1, by="teacher")
    hour = sanctions.ban(BanKey(BanKind.ADDRESS, "10.0.0.2"), 0.0, 60, by="aide")
    assert sanctions.bans(120.0) == [forever, hour]
    restored = Sanctions(sanctions.bans(120.0))
    assert restored.is_banned(BanKey(BanKind.ADDRESS, "10.0.0.2"), 3599.0) == hour
    assert restored.is_banned(BanKey(BanKind.ADDRESS, "10.0.0.2"), 3600.0) is None


def test_scrypt_runs_only_on_the_hash_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """30 threads verifying at once: scrypt runs on at most HASH_WORKERS threads, none theirs."""
    real = hashlib.scrypt
    runners: set[int] = set()
    callers: set[int] = set()

    def spy(*args: object, **kwargs: object) -> bytes:
        runners.add(threading.get_ident())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    stored = hash_password("class of thirty", FAST)
    monkeypatch.setattr(hashlib, "scrypt", spy)
    barrier = threading.Barrier(30)
    results: list[bool] = []

    def login() -> None:
        callers.add(threading.get_ident())
        barrier.wait()
        results.append(verify_password("class of thirty", stored))

    threads = [threading.Thread(target=login) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [True] * 30
    assert 1 <= len(runners) <= HASH_WORKERS
    assert not runners & callers


def test_hashing_passes_the_exact_maxmem(monkeypatch: pytest.MonkeyPatch) -> None:
    """hash_password and verify_password give scrypt maxmem = the parameters' exact bound."""
    real = hashlib.scrypt
    seen: list[object] = []

    def spy(*args: object, **kwargs: object) -> bytes:
        seen.append(kwargs.get("maxmem"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hashlib, "scrypt", spy)
    stored = hash_password("bounded memory")
    assert verify_password("bounded memory", stored) is True
    assert seen == [DEFAULT_PARAMS.maxmem, DEFAULT_PARAMS.maxmem] == [16_780_288, 16_780_288]
