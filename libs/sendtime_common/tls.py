"""TLS for every port a service serves, and for the calls one service makes to another.

A server's certificate, key and (for mutual TLS) client CA are files, as a Kubernetes Secret
mounts them. They are read again when they change, so a rotation (cert-manager renewing, an
operator replacing the Secret) takes effect without a restart:

- gRPC asks ``ServerCertificates`` before every new connection's handshake
  (``grpc.dynamic_ssl_server_credentials``); a stat of the files tells whether to reread them.
- The webhook listener's ``ssl.SSLContext`` is reloaded by ``watch_ssl_context`` once a second.
- A client channel (render's to profile) is rebuilt by its owner when ``ClientTls.fingerprint``
  changes.

A change that does not make a usable pair (a certificate whose key has not been written yet, a
half-written file) is logged and ignored: connections keep the last good certificate until the
files agree again.

Plaintext is served only when asked for (``ALLOW_PLAINTEXT=true``), with a warning at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sendtime_common.call_limits import message_size_options
from sendtime_common.config import ConfigError, env_bool, env_str

log = logging.getLogger(__name__)

FileFingerprint = tuple[tuple[int, int, int], ...]


def fingerprint(paths: tuple[str, ...]) -> FileFingerprint:
    """What changes when any of ``paths`` is replaced or rewritten (a stat each; symlinks
    followed, as a Kubernetes Secret's are swapped). A missing file counts as empty."""
    found = []
    for path in paths:
        try:
            stat = os.stat(path)
            found.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        except OSError:
            found.append((0, 0, 0))
    return tuple(found)


class UnusableCertificate(ValueError):
    """The files do not hold a certificate chain and the private key that goes with it (or a CA)."""


def read_pair(cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """The PEM certificate chain and key, checked to belong together.

    Raises:
        UnusableCertificate: unreadable, not PEM, or the key is not the certificate's.
    """
    try:
        with open(cert_file, "rb") as file:
            chain = file.read()
        with open(key_file, "rb") as file:
            key = file.read()
        certificate = x509.load_pem_x509_certificates(chain)[0]
        private_key = serialization.load_pem_private_key(key, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UnusableCertificate(f"{cert_file} / {key_file}: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if certificate.public_key().public_bytes(encoding, public) != private_key.public_key().public_bytes(
        encoding, public
    ):
        raise UnusableCertificate(f"{key_file} is not the key of {cert_file}")
    return chain, key


def read_ca(ca_file: str) -> bytes:
    """Raises: UnusableCertificate: unreadable or holds no PEM certificate."""
    try:
        with open(ca_file, "rb") as file:
            bundle = file.read()
        x509.load_pem_x509_certificates(bundle)
    except (OSError, ValueError) as exc:
        raise UnusableCertificate(f"{ca_file}: {exc}") from None
    return bundle


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """How a service's ports are served: TLS with ``cert_file``/``key_file``; mutual TLS when
    ``client_ca_file`` is set too (client certificates required and verified against it);
    plaintext only when there is no certificate and ``allow_plaintext`` says so."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    allow_plaintext: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsSettings:
        """TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE, ALLOW_PLAINTEXT (checked by ``check``
        when a server starts, so that tools reading the same settings need none of them).

        Raises:
            ConfigError: ALLOW_PLAINTEXT is not a switch.
        """
        return cls(
            cert_file=env_str(env, "TLS_CERT_FILE", ""),
            key_file=env_str(env, "TLS_KEY_FILE", ""),
            client_ca_file=env_str(env, "TLS_CLIENT_CA_FILE", ""),
            allow_plaintext=env_bool(env, "ALLOW_PLAINTEXT", False),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def check(self) -> None:
        """Raises: ConfigError: a certificate without its key (or the reverse), a client CA
        without a certificate, or neither a certificate nor plaintext allowed."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE go together")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("TLS_CLIENT_CA_FILE (mutual TLS) needs TLS_CERT_FILE and TLS_KEY_FILE")
        if not self.cert_file and not self.allow_plaintext:
            raise ConfigError(
                "no TLS certificate: set TLS_CERT_FILE and TLS_KEY_FILE, or ALLOW_PLAINTEXT=true to serve "
                "plaintext (only where the network itself is trusted)"
            )


class ServerCertificates:
    """A server's certificate (and client CA), reread from its files when they change."""

    def __init__(self, settings: TlsSettings) -> None:
        """Raises: UnusableCertificate: the files do not make a usable certificate."""
        self._settings = settings
        self._paths = tuple(p for p in (settings.cert_file, settings.key_file, settings.client_ca_file) if p)
        self._fingerprint = fingerprint(self._paths)
        self._configuration = self._read()
        self.reloads = 0

    def _read(self) -> grpc.ServerCertificateConfiguration:
        chain, key = read_pair(self._settings.cert_file, self._settings.key_file)
        ca = read_ca(self._settings.client_ca_file) if self._settings.mutual else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration,
            self._fetch,  # type: ignore[arg-type]  # None (no change) is allowed; the stubs say otherwise
            require_client_authentication=self._settings.mutual,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each new connection's handshake: a new configuration when the
        files changed and make a usable one, else None (keep the current one). Never raises."""
        now = fingerprint(self._paths)
        if now == self._fingerprint:
            return None
        try:
            configuration = self._read()
        except UnusableCertificate as exc:
            log.error(
                "a changed TLS certificate is not usable; keeping the last good one",
                extra={"error": str(exc)},
            )
            return None
        self._fingerprint, self._configuration = now, configuration
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert_file": self._settings.cert_file})
        return configuration


def server_ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """An SSLContext for an HTTP listener (the webhooks); mutual TLS is for gRPC only: providers
    sign their webhooks instead.

    Raises: UnusableCertificate: the files do not make a usable certificate.
    """
    read_pair(settings.cert_file, settings.key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


async def watch_ssl_context(context: ssl.SSLContext, settings: TlsSettings, interval_s: float = 1.0) -> None:
    """Reload ``context``'s certificate whenever its files change (new handshakes use it), until
    cancelled."""
    paths = (settings.cert_file, settings.key_file)
    seen = fingerprint(paths)
    while True:
        await asyncio.sleep(interval_s)
        now = fingerprint(paths)
        if now == seen:
            continue
        try:
            read_pair(*paths)
            context.load_cert_chain(*paths)
        except (UnusableCertificate, ssl.SSLError, OSError) as exc:
            log.error(
                "a changed TLS certificate is not usable; keeping the last good one",
                extra={"error": str(exc)},
            )
            continue
        seen = now
        log.info("TLS certificate reloaded", extra={"cert_file": settings.cert_file})


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How one service calls another: TLS trusting ``ca_file`` (the system's roots when empty),
    presenting ``cert_file``/``key_file`` where the server wants a client certificate; or
    plaintext when asked for."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    plaintext: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str) -> ClientTls:
        """``{prefix}_CA_FILE``, ``{prefix}_CERT_FILE``, ``{prefix}_KEY_FILE``, ``{prefix}_PLAINTEXT``.

        Raises: ConfigError: a certificate without its key, or the reverse.
        """
        settings = cls(
            ca_file=env_str(env, f"{prefix}_CA_FILE", ""),
            cert_file=env_str(env, f"{prefix}_CERT_FILE", ""),
            key_file=env_str(env, f"{prefix}_KEY_FILE", ""),
            plaintext=env_bool(env, f"{prefix}_PLAINTEXT", False),
        )
        if bool(settings.cert_file) != bool(settings.key_file):
            raise ConfigError(f"{prefix}_CERT_FILE and {prefix}_KEY_FILE go together")
        return settings

    def fingerprint(self) -> FileFingerprint:
        return fingerprint(tuple(p for p in (self.ca_file, self.cert_file, self.key_file) if p))

    def credentials(self) -> grpc.ChannelCredentials:
        """Raises: UnusableCertificate: the files do not make a usable certificate."""
        chain, key = read_pair(self.cert_file, self.key_file) if self.cert_file else (None, None)
        return grpc.ssl_channel_credentials(
            root_certificates=read_ca(self.ca_file) if self.ca_file else None,
            private_key=key,
            certificate_chain=chain,
        )


def channel(
    target: str,
    tls: ClientTls,
    *,
    interceptors: list[object] | None = None,
    options: list[tuple[str, object]] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` as ``tls`` says, taking any Sendtime response and
    sending any Sendtime request (``options`` may set other sizes).

    Raises: UnusableCertificate: the client's certificate files are not usable.
    """
    options = [
        *message_size_options(),
        # Connections of this channel's own. gRPC's global pool shares them, and their failure
        # state, with every channel to the same address: a new channel to a server restarted on
        # a port an old channel still watched failed at once with the old "Connection refused".
        ("grpc.use_local_subchannel_pool", 1),
        *(options or []),  # later entries win
    ]
    if tls.plaintext:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)  # type: ignore[arg-type]
    return grpc.aio.secure_channel(target, tls.credentials(), options=options, interceptors=interceptors)  # type: ignore[arg-type]


def warn_if_plaintext(settings: TlsSettings, what: Callable[[], str]) -> None:
    if not settings.enabled:
        log.warning(
            "serving PLAINTEXT: no TLS certificate is configured (ALLOW_PLAINTEXT=true); "
            "credentials and personal data cross the network unencrypted",
            extra={"listener": what()},
        )
