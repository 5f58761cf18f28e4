"""ScoreRequest read off the wire with its candidates left as bytes.

A candidate's wire bytes are its content key in the item-encoding cache, and on a warm cache
they are all the serving path needs of it. Parsing a ScoreRequest builds one Python message per
candidate, and keying them serializes each back: two Python-level calls per candidate. This
module declares ``ScoreRequestWire``: ScoreRequest's own descriptor (copied from the contract at
import, so it cannot drift from it) with field 5 ``candidates`` declared ``repeated bytes``.
An embedded message and a bytes field share one wire type (length-delimited), so any
ScoreRequest parses as a ScoreRequestWire, in C, its candidates coming out as the exact bytes
the client sent. A candidate is parsed into a ``Candidate`` only on an item-cache miss or on
the error path (``parse_candidate``), where a malformed one gets an error naming it.

The public contract (``ranking.proto``) is unchanged: clients send ScoreRequest as before.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from iat.ranking.v1 import ranking_pb2

WIRE_FILE = "iat/ranking/v1/score_request_wire.proto"
WIRE_MESSAGE = "iat.ranking.v1.wire.ScoreRequestWire"
CANDIDATES_FIELD = 5


def _wire_request_class():
    pool = descriptor_pool.Default()
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(WIRE_MESSAGE))
    except KeyError:
        pass
    contract = descriptor_pb2.FileDescriptorProto()
    ranking_pb2.DESCRIPTOR.CopyToProto(contract)
    request = next(m for m in contract.message_type if m.name == "ScoreRequest")
    wire = descriptor_pb2.FileDescriptorProto(name=WIRE_FILE, package=WIRE_MESSAGE.rsplit(".", 1)[0],
                                              syntax=contract.syntax, dependency=[contract.name])
    message = wire.message_type.add()
    message.CopyFrom(request)
    message.name = WIRE_MESSAGE.rsplit(".", 1)[1]
    for f in message.field:
        if f.type_name and not f.type_name.startswith("."):  # relative names would resolve in the new package
            f.type_name = f".{contract.package}.{f.type_name}"
        if f.number == CANDIDATES_FIELD:
            if f.name != "candidates" or f.label != f.LABEL_REPEATED:
                raise RuntimeError(f"ranking.proto: field {CANDIDATES_FIELD} is not 'repeated Candidate candidates'")
            f.type = f.TYPE_BYTES
            f.ClearField("type_name")
    pool.Add(wire)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(WIRE_MESSAGE))


ScoreRequestWire = _wire_request_class()
_PARSE_CANDIDATE = ranking_pb2.Candidate.FromString


class MalformedCandidate(ValueError):
    """A candidate's bytes are not a Candidate message."""


def parse_candidate(raw: bytes) -> ranking_pb2.Candidate:
    try:
        return _PARSE_CANDIDATE(raw)
    except DecodeError as err:
        raise MalformedCandidate(f"not a Candidate message ({err})") from None
