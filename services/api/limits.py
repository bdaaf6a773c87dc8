"""Size limits shared by the services, the gateway and the clients: stated once, enforced everywhere.

A request bigger than these is refused with INVALID_ARGUMENT / HTTP 413 before anything big is
allocated, so one bad client cannot take a process down by asking for a huge volume.
"""

from __future__ import annotations

#: Largest single gRPC message either side sends or accepts (unary requests and each stream message).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Largest voxel/file chunk of a streamed upload.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: Largest image a streamed upload may assemble (voxels or file bytes).
MAX_UPLOAD_BYTES = 1024 * 1024 * 1024
#: Largest volume in voxels (512 × 512 × 2048).
MAX_VOXELS = 512 * 512 * 2048
#: Largest number of lesions in one request.
MAX_LESIONS = 256
#: Largest DICOM zip: members and their total uncompressed size.
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_UNCOMPRESSED_BYTES = 2 * 1024 * 1024 * 1024
