"""Size limits shared by the services, the gateway and the clients: stated once, enforced everywhere.

A request bigger than these is refused with INVALID_ARGUMENT / HTTP 413 before anything big is
allocated, so one bad client cannot take a process down by asking for a huge volume.
"""

from __future__ import annotations

#: Largest single gRPC message either side sends or accepts (unary requests and each stream message).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Largest voxel/file chunk of a streamed upload.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: Largest image a streamed upload may assemble (voxels or file bytes), and the most bytes a header
#: (a volume's shape × dtype, a file's declared size) may ask for: a 100-byte header must not make
#: the service allocate more than an upload could ever fill.
MAX_UPLOAD_BYTES = 1024 * 1024 * 1024
#: Largest volume in voxels (512 × 512 × 2048).
MAX_VOXELS = 512 * 512 * 2048
#: Largest number of lesions in one request.
MAX_LESIONS = 256
#: Largest DICOM zip: members and their total uncompressed size, counted while extracting (the
#: headers may lie). The size is the pixels of the largest upload plus room for per-file headers
#: (a few KiB each), so a zipped series may be as big as the same series uploaded as voxels.
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_UNCOMPRESSED_BYTES = MAX_UPLOAD_BYTES + 256 * 1024 * 1024
#: Temporary disk one request may write: the uploaded file plus what it unpacks to. Past it the
#: request is refused, so one small zip cannot fill the service's disk.
MAX_REQUEST_TEMP_BYTES = MAX_UPLOAD_BYTES + MAX_ZIP_UNCOMPRESSED_BYTES
