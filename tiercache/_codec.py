"""Value envelopes: a 4-byte header, an optional HMAC, and the serialized (maybe compressed) body.

Layout of every value tiercache writes to Redis::

    byte 0   MAGIC (0xC7)
    byte 1   envelope format version (1)
    byte 2   serializer ident (1 msgpack, 2 json, 3 pickle, 16-255 custom)
    byte 3   flags: bits 0-1 compression (0 none, 1 zlib, 2 zstd), bit 2 signed
    [32 bytes HMAC-SHA256(signing_key, redis_key || 0x00 || header || body), if signed]
    body

Invariant 6: bytes that do not parse (wrong magic, version, serializer or compression, a bad
or missing signature where one is required, a body the serializer rejects) raise CodecError,
which the read path turns into a miss. Nothing from Redis is unpickled unless the cache was
configured with the pickle serializer *and* a signing key, and the signature verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import threading
import zlib
from typing import Any

from ._serializers import JsonSerializer, MsgpackSerializer, PickleSerializer
from .errors import CodecError, ConfigError, ValueTooLargeError

__all__ = [
    "Codec",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
]

MAGIC = 0xC7
ENVELOPE_VERSION = 1
HEADER_LEN = 4
MAC_LEN = 32
_SIGNED = 0b100
_COMPRESSION_MASK = 0b11
_NONE, _ZLIB, _ZSTD = 0, 1, 2


def _zstd() -> Any:
    try:
        return importlib.import_module("zstandard")  # optional: pip install 'tiercache[zstd]'
    except ImportError:
        return None


class Envelope(bytes):
    """The bytes :meth:`Codec.encode` returns; ``held`` is the size L1 counts for the value."""

    held: int


class Codec:
    """Encodes values into envelopes and decodes them back, for one cache configuration.

    :meth:`held_size` is what ``l1_maxbytes`` counts for a value: the length of its serialized
    body before compression, a cheap stand-in for the memory the decoded value takes in this
    process (a string, bytes or an array takes about that; compressed bytes may be 1000 times
    smaller). It is known, without extra work, right after ``encode`` or ``decode``.
    """

    def __init__(
        self,
        serializer: Any,
        *,
        signing_key: bytes | None = None,
        compression: str | None = "auto",
        compress_threshold: int = 1024,
        max_value_bytes: int | None = None,
        max_decoded_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        if serializer.requires_signature and not signing_key:
            raise ConfigError(
                f"serializer={serializer.name!r} executes code when loading, so it needs "
                "signing_key=<secret bytes> (HMAC-SHA256): unsigned bytes from Redis are refused"
            )
        if signing_key is not None and (not isinstance(signing_key, bytes) or len(signing_key) < 16):
            raise ConfigError("signing_key must be bytes of at least 16 random bytes (e.g. os.urandom(32))")
        if compression not in ("auto", "zlib", "zstd", None):
            raise ConfigError(f"compression={compression!r}: use 'auto', 'zlib', 'zstd' or None")
        self._zstd = _zstd()
        if compression == "zstd" and self._zstd is None:
            raise ConfigError("compression='zstd' needs the zstandard package: pip install 'tiercache[zstd]'")
        if compression == "auto":
            compression = "zstd" if self._zstd is not None else "zlib"
        self._compression = {None: _NONE, "zlib": _ZLIB, "zstd": _ZSTD}[compression]
        if compress_threshold < 0:
            raise ConfigError(f"compress_threshold={compress_threshold!r} must be >= 0 (bytes)")
        if max_value_bytes is not None and max_value_bytes <= 0:
            raise ConfigError(f"max_value_bytes={max_value_bytes!r} must be a positive byte count or None")
        self.serializer = serializer
        self._key = signing_key
        self._threshold = compress_threshold
        self._max_value = max_value_bytes
        self._max_decoded = max_decoded_bytes
        self._zstd_c = self._zstd.ZstdCompressor(level=3) if self._zstd is not None else None
        # A ZstdDecompressor costs ~10 us to make and must not be shared between threads.
        self._per_thread = threading.local()
        self._lock = threading.Lock()  # zstandard compressor objects are not thread-safe

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks (another thread may have held one at the fork)."""
        self._lock = threading.Lock()
        self._zstd_c = self._zstd.ZstdCompressor(level=3) if self._zstd is not None else None
        self._per_thread = threading.local()
        if isinstance(getattr(self.serializer, "_lock", None), type(self._lock)):
            self.serializer._lock = threading.Lock()

    def encode(self, key: str, value: Any) -> bytes:
        """The envelope for ``value`` under ``key``; CodecError if it cannot be encoded."""
        try:
            body: bytes = self.serializer.dumps(value)
        except CodecError:
            raise
        except Exception as exc:  # any serializer failure means "not cacheable"
            name = self.serializer.name
            raise CodecError(f"cannot serialize a {type(value).__qualname__} with {name}: {exc}") from exc
        held = len(body)
        flags = _NONE
        if self._compression and len(body) >= self._threshold:
            packed = self._compress(body)
            if len(packed) < len(body):
                body, flags = packed, self._compression
        if self._max_value is not None and len(body) > self._max_value:
            raise ValueTooLargeError(
                f"value for {key} is {len(body)} bytes encoded, above max_value_bytes={self._max_value}"
            )
        if self._key is not None:
            flags |= _SIGNED
        header = bytes((MAGIC, ENVELOPE_VERSION, self.serializer.ident, flags))
        envelope = Envelope(header + body if self._key is None else header + self._mac(key, header, body) + body)
        envelope.held = held
        return envelope

    def held_size(self, data: bytes) -> int:
        """The size ``l1_maxbytes`` counts for the value in ``data``: its serialized length
        before compression. O(1) for what :meth:`encode` returned and for the bytes this
        thread last decoded; other envelopes are measured (a zlib body is decompressed)."""
        held = getattr(data, "held", None)
        if held is not None:
            return int(held)
        last = getattr(self._per_thread, "decoded", None)
        if last is not None and last[0] is data:
            self._per_thread.decoded = None
            return int(last[1])
        if len(data) < HEADER_LEN:
            return len(data)
        flags = data[3]
        start = HEADER_LEN + (MAC_LEN if flags & _SIGNED else 0)
        compression = flags & _COMPRESSION_MASK
        if compression == _ZSTD and self._zstd is not None:
            declared = int(self._zstd.frame_content_size(data[start:]))
            if declared >= 0:
                return declared
        if compression:
            with contextlib.suppress(CodecError):
                return len(self._decompress("?", compression, data[start:]))
        return max(0, len(data) - start)

    def decode(self, key: str, data: bytes) -> Any:
        """The value in ``data``; CodecError for anything unknown, corrupt or unsigned."""
        if (
            len(data) < HEADER_LEN
            or data[0] != MAGIC
            or data[1] != ENVELOPE_VERSION
            or data[2] != self.serializer.ident
            or data[3] & ~(_SIGNED | _COMPRESSION_MASK)
        ):
            raise self._bad_header(key, data)
        flags = data[3]
        if flags & _SIGNED or self._key is not None or self.serializer.requires_signature:
            body = data[self._verify(key, data, flags) :]
        else:
            body = data[HEADER_LEN:]
        compression = flags & _COMPRESSION_MASK
        if compression:
            body = self._decompress(key, compression, body)
        try:
            value = self.serializer.loads(body)
        except CodecError:
            raise
        except Exception as exc:  # garbage from Redis is a miss, whatever it raises
            raise CodecError(f"{key}: cannot decode body with {self.serializer.name}: {repr(exc)[:200]}") from exc
        self._per_thread.decoded = (data, len(body))  # for held_size(data), next on this thread
        return value

    def _bad_header(self, key: str, data: bytes) -> CodecError:
        """What is wrong with an envelope header that ``decode`` refused."""
        if len(data) < HEADER_LEN or data[0] != MAGIC or data[1] != ENVELOPE_VERSION:
            return CodecError(f"{key}: not a tiercache envelope (or another format version)")
        if data[2] != self.serializer.ident:
            return CodecError(f"{key}: written with serializer {data[2]}, configured {self.serializer.ident}")
        return CodecError(f"{key}: unknown envelope flags {data[3]:#x}")

    def _verify(self, key: str, data: bytes, flags: int) -> int:
        """Where the body starts, once its signature matches (or no signature is required)."""
        if not flags & _SIGNED:
            if self._key is not None or self.serializer.requires_signature:
                raise CodecError(f"{key}: value is not signed but a signature is required")
            return HEADER_LEN
        if self._key is None:
            raise CodecError(f"{key}: value is signed but no signing_key is configured")
        body_at = HEADER_LEN + MAC_LEN
        mac = data[HEADER_LEN:body_at]
        if not hmac.compare_digest(mac, self._mac(key, data[:HEADER_LEN], data[body_at:])):
            raise CodecError(f"{key}: signature does not match (tampered, or another signing_key)")
        return body_at

    def _mac(self, key: str, header: bytes, body: bytes) -> bytes:
        assert self._key is not None
        m = hmac.new(self._key, key.encode("utf-8", "surrogatepass"), hashlib.sha256)
        m.update(b"\x00")
        m.update(header)
        m.update(body)
        return m.digest()

    def _compress(self, body: bytes) -> bytes:
        if self._compression == _ZSTD:
            with self._lock:
                return bytes(self._zstd_c.compress(body))  # type: ignore[union-attr]
        return zlib.compress(body, 1)

    def _decompress(self, key: str, compression: int, body: bytes) -> bytes:
        try:
            if compression == _ZLIB:
                return self._inflate_zlib(key, body)
            if compression == _ZSTD and self._zstd is not None:
                return self._inflate_zstd(key, body)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"{key}: corrupt compressed body: {exc!r}") from exc
        raise CodecError(f"{key}: compression {compression} is not available here")

    def _inflate_zlib(self, key: str, body: bytes) -> bytes:
        d = zlib.decompressobj()
        out = d.decompress(body, self._max_decoded)
        if d.unconsumed_tail:
            raise CodecError(f"{key}: decompressed value exceeds {self._max_decoded} bytes")
        if not d.eof or d.unused_data:
            raise CodecError(f"{key}: zlib body is truncated or has trailing bytes")
        return bytes(out)

    def _inflate_zstd(self, key: str, body: bytes) -> bytes:
        assert self._zstd is not None
        declared = self._zstd.frame_content_size(body)
        if 0 <= declared <= self._max_decoded:
            # One shot into a buffer of the declared size (our frames declare it);
            # a frame whose data outgrows its declaration is an error, not a bomb.
            decompressor = getattr(self._per_thread, "zstd", None)
            if decompressor is None:
                decompressor = self._per_thread.zstd = self._zstd.ZstdDecompressor()
            out = decompressor.decompress(body, max_output_size=declared, allow_extra_data=False)
            if len(out) != declared:
                raise CodecError(f"{key}: zstd body does not match its declared size")
            return bytes(out)
        # Unknown or huge declared size: a stream reader honours the limit anyway.
        reader = self._zstd.ZstdDecompressor().stream_reader(body)
        chunks: list[bytes] = []
        total = 0
        while chunk := reader.read(min(1 << 20, self._max_decoded + 1 - total)):
            total += len(chunk)
            if total > self._max_decoded:
                raise CodecError(f"{key}: decompressed value exceeds {self._max_decoded} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
