"""DHT record validators that every node of a swarm registers (a node without them rejects or hangs).

Three layers, all run by every DHT node before it stores or returns a record:

1. hivemind's ``RSASignatureValidator``: a record whose subkey carries ``[owner:<key>]`` must be
   signed by that key, so nobody can overwrite another peer's announcement.
2. hivemind's ``SchemaValidator`` over our block keys: each is a dictionary of owner-signed
   subkeys whose values parse as records. The value type is derived from the record schema itself
   (``ServerRecord.from_wire``, the one definition of the wire form), not written out again.
3. :class:`ServerRecordValidator`: what a schema cannot say -- the record's ``peer_id`` is the hash
   of the signing key (so a peer cannot speak *as* another peer id), the block named by the key
   lies inside the announced range, the record carries its announce time ``at`` (not in the
   future), expires within ``MAX_RECORD_TTL_S`` of now *and* within ``MAX_VALIDITY_S`` (two of
   the longest announce periods) of ``at``, so a record set to live for years, or a replayed
   capture of a dead peer's record, stops counting soon after the peer's last announcement; and
   fields this version does not know take at most ``MAX_UNKNOWN_FIELDS_BYTES``.

DHT validators only see hashed keys, so a node validates the models it was told about; records
under keys it does not know pass through unvalidated (documented in docs/security.md).

All three run inside :class:`RememberingValidator`, which remembers the records it accepted: a
DHT read meets the same signed records in many nodes' answers.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peerd.config import MAX_ANNOUNCE_PERIOD_S
from peerd.identity import peer_id_of_public_key, public_key_of_owner_marker
from peerd.swarm.records import WIRE_FIELDS, ServerRecord, block_uid

__all__ = [
    "MAX_RECORD_TTL_S",
    "MAX_VALIDITY_S",
    "RememberingValidator",
    "ServerRecordValidator",
    "make_validators",
    "owner_subkey",
]

MAX_RECORD_VALUE_BYTES = 8192
MAX_UNKNOWN_FIELDS_BYTES = 512  # room for a future field or two, not for padding
# two of the longest announce periods, plus five minutes for clocks of DHT nodes that disagree
MAX_RECORD_TTL_S = 2 * MAX_ANNOUNCE_PERIOD_S + 300.0
# a record is valid for at most two of the longest announce periods after it was announced
MAX_VALIDITY_S = 2 * MAX_ANNOUNCE_PERIOD_S + 5.0
CLOCK_SKEW_S = 60.0  # how far in the future an announce time may lie (clocks of nodes disagree)
_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")
REMEMBERED_RECORDS = 16_384  # accepted records a node remembers (as many as its storage holds)


class _RecordValue:
    """A pydantic field type accepting exactly the values ``ServerRecord.from_wire`` accepts.

    Strict types, ranges and unknown-field tolerance are all defined once, by the record's parser.
    """

    @classmethod
    def __get_validators__(cls) -> Iterator[Callable[[Any], Any]]:
        yield cls.validate

    @classmethod
    def validate(cls, value: Any) -> Any:
        ServerRecord.from_wire(value)  # ValueError on anything malformed: pydantic reports it
        return value


def owner_subkey(private_key: RSAPrivateKey) -> bytes:
    """The subkey a peer stores its records under: its signed-owner marker."""
    return bytes(RSASignatureValidator(private_key).local_public_key)


def _schema_for(prefix: str, num_blocks: int) -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {
        f"block_{i}": (dict[BytesWithPublicKey, _RecordValue] | None, None) for i in range(num_blocks)
    }
    return pydantic.create_model(f"BlockRecords_{abs(hash(prefix))}", **fields)


def _fresh(announced_at: float, expiration_time: float) -> bool:
    """An announce time not in the future, and an expiry within the validity window after it."""
    return 0 < announced_at <= get_dht_time() + CLOCK_SKEW_S and expiration_time <= announced_at + MAX_VALIDITY_S


def _small_unknowns(value: Any) -> bool:
    unknown = {k: v for k, v in value.items() if k not in WIRE_FIELDS}
    return not unknown or len(DHTProtocol.serializer.dumps(unknown)) <= MAX_UNKNOWN_FIELDS_BYTES


class ServerRecordValidator(RecordValidatorBase):  # type: ignore[misc]
    """Checks record semantics for the block keys of the models this node knows (see module doc)."""

    def __init__(self, models: dict[str, int]) -> None:
        # hashed DHT key -> block index, for every known (prefix, block)
        self._blocks: dict[bytes, int] = {}
        for prefix, num_blocks in models.items():
            for i in range(num_blocks):
                self._blocks[DHTID.generate(source=block_uid(prefix, i)).to_bytes()] = i

    def validate(self, record: DHTRecord) -> bool:
        block = self._blocks.get(record.key)
        if block is None:
            return True  # not one of ours: the signature validator still protects owned records
        if len(record.value) > MAX_RECORD_VALUE_BYTES:
            return False
        if record.expiration_time > get_dht_time() + MAX_RECORD_TTL_S:
            return False
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return False  # our block keys are always dictionaries keyed by owner
        owners = _OWNER_RE.findall(record.subkey)
        if len(owners) != 1:
            return False
        try:
            value = DHTProtocol.serializer.loads(record.value)
            parsed = ServerRecord.from_wire(value)
            public_key = public_key_of_owner_marker(owners[0])
        except Exception:  # any malformed remote input is simply a rejected record
            return False
        if parsed.peer_id != peer_id_of_public_key(public_key):
            return False
        if not _fresh(parsed.announced_at, record.expiration_time) or not _small_unknowns(value):
            return False
        return parsed.start <= block < parsed.end

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value  # type: ignore[no-any-return]

    @property
    def priority(self) -> int:
        return 5  # after the signature validator (10) has stripped the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, ServerRecordValidator):
            return False
        self._blocks.update(other._blocks)
        return True


def make_validators(private_key: RSAPrivateKey, models: Iterable[tuple[str, int]]) -> list[RecordValidatorBase]:
    """All validators a node needs, for the given ``(key prefix, number of blocks)`` models."""
    known = dict(models)
    validators: list[RecordValidatorBase] = [RSASignatureValidator(private_key)]
    for prefix, num_blocks in known.items():
        validators.append(SchemaValidator(_schema_for(prefix, num_blocks), allow_extra_keys=True, prefix=prefix))
    validators.append(ServerRecordValidator(known))
    return validators


class RememberingValidator(CompositeValidator):  # type: ignore[misc]
    """hivemind's ``CompositeValidator``, remembering the records it accepted.

    A DHT read meets the same records again and again: each node on a lookup's path answers with
    the values it holds, so a client's read of SmolLM2's 30 block keys ran ~120 validations of
    the same handful of signed records (about half of the read's CPU: pydantic schema, RSA
    signature, record checks). Each layer's verdict on a record is a function of the record alone,
    except two checks against the clock (an announce time not in the future, an expiry not too far
    in it), which only ever turn from "no" to "yes" as time passes. So an accepted record is
    remembered by a digest of its key, subkey, value and expiry and accepted again at once; a
    rejected one is checked in full every time. At most ``max_records``, least recently seen
    forgotten first; adding validators forgets all.
    """

    def __init__(self, validators: Iterable[RecordValidatorBase] = (), max_records: int = REMEMBERED_RECORDS) -> None:
        self._accepted: OrderedDict[bytes, None] = OrderedDict()
        self.max_records = max_records
        super().__init__(validators)

    def extend(self, validators: Iterable[RecordValidatorBase]) -> None:
        super().extend(validators)
        self._accepted.clear()  # a new validator may reject what the old ones accepted

    def validate(self, record: DHTRecord) -> bool:
        digest = _digest(record)
        if digest in self._accepted:
            self._accepted.move_to_end(digest)
            return True
        if not super().validate(record):
            return False
        self._accepted[digest] = None
        if len(self._accepted) > self.max_records:
            self._accepted.popitem(last=False)
        return True


def _digest(record: DHTRecord) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for part in (record.key, record.subkey, record.value):
        part = bytes(part)
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    h.update(struct.pack("<d", record.expiration_time))
    return h.digest()
