"""Wire format shared by the coordinator and the device agents.

FedCoE (arXiv 2605.21264) exchanges only a subset of the global experts each round; this
package is how those experts and the control messages around them travel (docs/design.md,
section 8), one module a job:

* :mod:`.envelope`: a versioned JSON **envelope** for control messages, signed with a
  per-device HMAC-SHA256 key and protected against replay by a bounded window of message ids;
* :mod:`.codec`: the **weight codec**, safetensors bytes, never pickle;
* :mod:`.delta`: optional int8 compression of weight *deltas* (one scale per tensor,
  lossless for integer tensors);
* :mod:`.transfer`: **chunked transfers**, a manifest (expert ids, base version, size,
  chunk count, sha256), a reassembler that tolerates duplicates and reordering and reports
  gaps for NACK, and a sender-side window because the broker drops QoS 1 messages silently
  for slow consumers;
* :mod:`.validate`: ``validate_update``, the schema gate (keys, shapes, dtypes, finite
  values, norm bound) every received update passes before a strategy sees it;
* :mod:`.common`: the ids and clock the envelope and the transfers share.

Every name is re-exported here: callers import from ``fedcoe_edge.wire``. Everything is
transport-agnostic and pure Python + numpy, so it runs on the device.
"""

from __future__ import annotations

from fedcoe_edge.wire.codec import decode_tensor_metadata, decode_tensors, encode_tensors
from fedcoe_edge.wire.common import new_msg_id, wall_ms
from fedcoe_edge.wire.delta import (
    compress_delta,
    compressed_delta_metadata,
    decompress_delta,
    is_compressed_delta,
)
from fedcoe_edge.wire.envelope import (
    DEFAULT_MAX_SKEW_MS,
    MAX_ENVELOPE_BYTES,
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    MAX_TTL_S,
    PROTOCOL_VERSION,
    Envelope,
    ReplayCache,
    UnauthenticatedError,
    canonical_json,
    decode_envelope,
    encode_envelope,
    parse_json,
)
from fedcoe_edge.wire.transfer import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_WINDOW,
    MAX_CHUNK_SIZE,
    MAX_NACK,
    MAX_WINDOW,
    MIN_CHUNK_SIZE,
    REPORT_EVERY,
    Admission,
    Chunk,
    Reassembler,
    ReassemblyBudget,
    TransferManifest,
    TransferWindow,
    check_chunk_size,
    check_window,
    chunk_overhead,
    decode_chunk,
    encode_chunk,
    split_chunks,
)
from fedcoe_edge.wire.validate import DEFAULT_NORM_BOUND, validate_change, validate_update

__all__ = [
    "DEFAULT_NORM_BOUND",
    "PROTOCOL_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "check_chunk_size",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "REPORT_EVERY",
    "check_window",
    "MAX_NACK",
    "MAX_ENVELOPE_BYTES",
    "MAX_TTL_S",
    "DEFAULT_MAX_SKEW_MS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT",
    "Envelope",
    "UnauthenticatedError",
    "parse_json",
    "ReplayCache",
    "canonical_json",
    "encode_envelope",
    "decode_envelope",
    "new_msg_id",
    "wall_ms",
    "decode_tensor_metadata",
    "compressed_delta_metadata",
    "chunk_overhead",
    "encode_tensors",
    "decode_tensors",
    "compress_delta",
    "decompress_delta",
    "is_compressed_delta",
    "TransferManifest",
    "Chunk",
    "encode_chunk",
    "decode_chunk",
    "split_chunks",
    "Reassembler",
    "ReassemblyBudget",
    "Admission",
    "TransferWindow",
    "validate_change",
    "validate_update",
]
