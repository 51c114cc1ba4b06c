"""Keys and authentication of the cluster's links: CurveZMQ with pyzmq's ZAP authenticator.

The coordinator is a CURVE server with a secret key and an allow-list of peer public keys (workers,
shadow nodes); a peer is a CURVE client that holds its own secret key and the coordinator's public
key, so it refuses a coordinator that cannot prove it holds the matching secret. Everything after the
handshake is encrypted and authenticated by libzmq (no crypto here). A peer is identified by its
public key, which ZeroMQ attaches to each message it receives as the "User-Id" property (set by the
ZAP handler on success).

Key files use ZeroMQ's certificate format (zmq.auth.load_certificate reads them): NAME.key holds the
public key, NAME.key_secret both keys (mode 0600). An allow-list is a file of lines
`PUBLIC_KEY [comment]` (like authorized_keys) or a folder of *.key files. docs/SECURITY.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edgemoe.errors import UserError

log = logging.getLogger("edgemoe.keys")

ZAP_DOMAIN = b"edgemoe"
_Z85_KEY = re.compile(rb"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes

    @staticmethod
    def generate() -> "KeyPair":
        public, secret = zmq.curve_keypair()
        return KeyPair(public, secret)


def _check_key(key: bytes, what: str) -> bytes:
    if not _Z85_KEY.match(key):
        raise UserError(f"{what}: not a CurveZMQ key (40 Z85 characters)")
    return key


def _cert_text(public: bytes, secret: bytes | None) -> str:
    lines = [f"#   ZeroMQ CURVE {'secret' if secret else 'public'} certificate written by edgemoe keygen "
             f"on {datetime.datetime.now().isoformat(timespec='seconds')}",
             "#   " + ("keep this file private (mode 0600)" if secret else "give this file to the coordinator's allow-list"),
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def write_keypair(directory: str | os.PathLike[str], name: str, pair: KeyPair | None = None) -> tuple[Path, Path]:
    """DIR/NAME.key (public, 0644) and DIR/NAME.key_secret (0600, created so: never readable by others,
    not even briefly). Refuses to overwrite either file."""
    d = Path(directory)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
        raise UserError(f"key name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    d.mkdir(parents=True, exist_ok=True)
    pair = pair or KeyPair.generate()
    public_path, secret_path = d / f"{name}.key", d / f"{name}.key_secret"
    for p in (public_path, secret_path):
        if p.exists():
            raise UserError(f"{p} exists; remove it first or choose another --name")
    for p, text, mode in ((secret_path, _cert_text(pair.public, pair.secret), 0o600),
                          (public_path, _cert_text(pair.public, None), 0o644)):
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as e:
            raise UserError(f"cannot write {p}: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(p, mode)  # the umask may have removed bits of a public key; never adds any to the secret
    return public_path, secret_path


def load_secret(path: str | os.PathLike[str]) -> KeyPair:
    """This node's key pair from a NAME.key_secret file; refused if others may read it (as ssh does)."""
    p = Path(path)
    try:
        st = p.stat()
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as e:
        raise UserError(f"--key {p}: cannot read a key pair ({e})") from None
    if secret is None:
        raise UserError(f"--key {p}: holds no secret key (give the .key_secret file of edgemoe keygen)")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"--key {p}: mode {stat.S_IMODE(st.st_mode):04o} lets others read the secret key; chmod 600 {p}")
    return KeyPair(_check_key(public, f"--key {p}"), _check_key(secret, f"--key {p}"))


def load_public(spec: str, what: str = "--coordinator-key") -> bytes:
    """A public key given as its 40 Z85 characters, a NAME.key file, or a file whose first key line is one."""
    raw = spec.encode()
    if _Z85_KEY.match(raw):
        return raw
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"{what} {spec}: neither a key (40 Z85 characters) nor a key file")
    keys = _keys_in_file(p, what)
    if len(keys) != 1:
        raise UserError(f"{what} {spec}: expected one public key, found {len(keys)}")
    return next(iter(keys))


def _keys_in_file(p: Path, what: str) -> dict[bytes, str]:
    """Public keys of a certificate file, or of an authorized_keys-like file (KEY [comment] per line)."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {p}: {e.strerror}") from None
    if b"public-key" in data:
        try:
            public, _ = zmq.auth.load_certificate(p)
        except (OSError, ValueError) as e:
            raise UserError(f"{what} {p}: {e}") from None
        return {_check_key(public, f"{what} {p}"): p.stem}
    keys: dict[bytes, str] = {}
    for n, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        key, _, comment = line.partition(b" ")
        if not line or (line.startswith(b"#") and not _Z85_KEY.match(key)):  # ('#' is also a Z85 character)
            continue
        _check_key(key, f"{what} {p}:{n}")
        keys[key] = comment.strip().decode(errors="replace") or f"{p.name}:{n}"
    return keys


def load_allow_list(path: str | os.PathLike[str]) -> dict[bytes, str]:
    """Allowed peer public keys -> a label: a file (one `KEY [comment]` per line, or a certificate) or a
    folder of *.key certificate files (edgemoe keygen's public halves)."""
    p = Path(path)
    if p.is_dir():
        keys: dict[bytes, str] = {}
        for f in sorted(p.glob("*.key")):
            keys.update(_keys_in_file(f, "--allow"))
        return keys
    if p.is_file():
        return _keys_in_file(p, "--allow")
    raise UserError(f"--allow {p}: no such file or folder")


@dataclass
class ServerKeys:
    """The coordinator's side: its key pair and the peers it admits."""

    pair: KeyPair
    allowed: dict[bytes, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientKeys:
    """A worker's or shadow node's side: its key pair and the coordinator's public key."""

    pair: KeyPair
    server_public: bytes


class Authenticator:
    """ZAP for one ZeroMQ context: admits CURVE clients whose public key is allowed, logs one line
    per refused key (at most one a minute per key), and arms server sockets."""

    def __init__(self, ctx: zmq.Context, keys: ServerKeys) -> None:
        self.keys = keys
        self._lock = threading.Lock()
        self._refused: dict[bytes, float] = {}
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("edgemoe.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=self)

    def allow(self, public: bytes) -> None:
        with self._lock:
            self.keys.allowed[public] = self.keys.allowed.get(public, "local")

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question (on the authenticator's thread): may this public key (Z85) connect?"""
        with self._lock:
            ok = key in self.keys.allowed
            if not ok:
                now = time.monotonic()
                if now - self._refused.get(key, -1e9) >= 60:
                    self._refused[key] = now
                    log.warning("refused a connection from unlisted key %s", key.decode(errors="replace"))
        return ok

    def label(self, public: bytes) -> str:
        with self._lock:
            return self.keys.allowed.get(public, "?")

    def arm(self, sock: zmq.Socket) -> None:
        """Make sock a CURVE server (before it binds)."""
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.pair.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.pair.secret)

    def stop(self) -> None:
        self._auth.stop()


def arm_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    """Make sock a CURVE client of the coordinator (before it connects); None: the NULL mechanism."""
    if keys is None:
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)


def peer_key(frame: zmq.Frame) -> bytes | None:
    """The authenticated public key (Z85) of the peer a received frame came from; None without CURVE."""
    try:
        uid = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None
    if isinstance(uid, str):
        uid = uid.encode()
    return uid if uid and _Z85_KEY.match(uid) else None


def is_loopback(endpoint: str) -> bool:
    """tcp://HOST:PORT names a loopback address (127.0.0.0/8, ::1, localhost); ipc:// (a Unix socket) is local too."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or '*': not provably loopback


def require_keys_or_insecure(endpoint: str, have_keys: bool, insecure: bool, what: str) -> None:
    """Off loopback, links without keys need an explicit --insecure (and get a warning)."""
    if have_keys or is_loopback(endpoint):
        return
    if not insecure:
        raise UserError(f"{what} {endpoint} is not a loopback address: give keys (edgemoe keygen; see docs/SECURITY.md) "
                        "or --insecure to run unauthenticated and unencrypted")
    log.warning("INSECURE: %s %s without keys: anyone on the network can join, read and change the traffic", what, endpoint)


def client_keys(key: str | None, coordinator_key: str | None, connect: str, insecure: bool) -> ClientKeys | None:
    """A worker's or shadow node's keys from its flags (--key, --coordinator-key, --insecure)."""
    if (key is None) != (coordinator_key is None):
        raise UserError("--key and --coordinator-key go together: this node's secret key and the coordinator's public key")
    if key is None:
        require_keys_or_insecure(connect, False, insecure, "--connect")
        return None
    return ClientKeys(load_secret(key), load_public(coordinator_key))


def server_keys(key: str | None, allow: str | None) -> ServerKeys | None:
    """The coordinator's keys from its flags (--key, --allow); None: no keys given."""
    if key is None:
        if allow is not None:
            raise UserError("--allow needs --key (the coordinator's secret key, from edgemoe keygen)")
        return None
    return ServerKeys(load_secret(key), load_allow_list(allow) if allow is not None else {})
