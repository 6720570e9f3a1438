"""What thinwire's Flower server and client apps agree on: message types, record keys, and how
payload bytes travel in an ArrayRecord (runtime/flower.py explains why)."""

from __future__ import annotations

import hashlib
import re

from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from thinwire.config import Config

HELLO = "query.thinwire_hello"
FIT = "train.thinwire_fit"
SECAGG = "query.thinwire_secagg"  # one SecAgg+ stage (secagg.py)
STYPE = "thinwire.payload"
META = "thinwire"            # ConfigRecord: round, client, config digest, counts
PAYLOAD = "payload"          # ArrayRecord holding one Array of payload bytes
METRICS = "metrics"          # MetricRecord: the client's upload metrics
STATE_CONFIG = "thinwire.config"  # Context.state keys on the client
STATE_SECAGG = "thinwire.secagg"
PARTITION_ID = "partition-id"
FINGERPRINT = "random-fingerprint"
BASE_DIGEST = "base-digest"
RUN_KEY = "run-key"  # the run's identity across ServerApp restarts (RunDir.run_key)
DATA_PATH = "data-path"
# a fit reply's META fields holding the client's own timings -> their names in its record's `metrics`
CLIENT_TIMINGS = {"process-age-s": "clientapp_age_s", "import-s": "import_s", "setup-s": "setup_s"}
DEFAULT_ROUND_TIMEOUT_S = 600.0
POLL_S = 0.25


def pack(data: bytes) -> ArrayRecord:
    """Payload bytes as a one-Array record (uint8, stype `thinwire.payload`)."""
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))})


def unpack(record: ArrayRecord) -> bytes:
    array = record.get(PAYLOAD)
    if array is None or array.stype != STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
        raise ValueError("message does not carry a thinwire payload")
    return array.data


def flower_bytes(message: Message) -> int:
    """Flower's size of a message: every distinct object of its tree as deflated for transport."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CLASS_PREFIX = re.compile(r"^<class '([\w.()]+)'>:<'")  # Flower's str(type(ex)) + ":<'" + str(ex) + "'>"
_WRAPPER = re.compile(r"ClientAppException|RayTaskError|RayActorError")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b[^\n]*")


def short_reason(text: str) -> str:
    """The telling line of an error report (Flower wraps ClientApp tracebacks in Ray's and its
    own text): the last `SomeError: message` line, else the first line."""
    text = _CLASS_PREFIX.sub(lambda m: f"{m.group(1).rsplit('.', 1)[-1]}: ", _ANSI.sub("", str(text)))
    text = text[:-2] if text.endswith("'>") else text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = [line for line in lines if _EXCEPTION_LINE.match(line)]
    own = [line for line in found if not _WRAPPER.search(line)]  # the ClientApp's, not Flower's/Ray's
    return ((own or found)[-1] if found else lines[0] if lines else "unknown error")[:500]


def round_timeout(config: Config) -> float:
    return float(getattr(config.federation, "round_timeout_s", DEFAULT_ROUND_TIMEOUT_S))
