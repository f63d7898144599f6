"""RememberingValidator: accepted DHT records are remembered, rejected ones are checked every time."""

from __future__ import annotations

from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from peerd.swarm.validation import RememberingValidator


class Counting(RecordValidatorBase):  # type: ignore[misc]
    """Accepts the records whose value starts with b"ok", counting every check."""

    def __init__(self) -> None:
        self.checks = 0

    def validate(self, record: DHTRecord) -> bool:
        self.checks += 1
        return bool(record.value.startswith(b"ok"))


def _record(value: bytes, expiration: float = 100.0, subkey: bytes = b"[owner:k]") -> DHTRecord:
    return DHTRecord(key=b"block-0", subkey=subkey, value=value, expiration_time=expiration)


def test_an_accepted_record_is_accepted_again_without_checking_a_rejected_one_is_checked_again() -> None:
    inner = Counting()
    validator = RememberingValidator([inner])
    assert validator.validate(_record(b"ok-1")) and validator.validate(_record(b"ok-1"))
    assert inner.checks == 1
    assert not validator.validate(_record(b"forged")) and not validator.validate(_record(b"forged"))
    assert inner.checks == 3  # a rejected record may turn valid as time passes: never remembered
    # any field that differs is another record
    for other in (_record(b"ok-2"), _record(b"ok-1", expiration=101.0), _record(b"ok-1", subkey=b"[owner:j]")):
        assert validator.validate(other)
    assert inner.checks == 6


def test_the_least_recently_seen_are_forgotten_first_and_new_validators_forget_all() -> None:
    inner = Counting()
    validator = RememberingValidator([inner], max_records=2)
    for value in (b"ok-a", b"ok-b", b"ok-a", b"ok-c"):  # b is the least recently seen when c comes
        validator.validate(_record(value))
    checks = inner.checks
    validator.validate(_record(b"ok-a"))
    assert inner.checks == checks
    validator.validate(_record(b"ok-b"))
    assert inner.checks == checks + 1
    validator.extend([Counting()])
    validator.validate(_record(b"ok-b"))
    assert inner.checks == checks + 2
